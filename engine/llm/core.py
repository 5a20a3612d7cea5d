"""The engine core: the step loop, and nothing that is text.

One step: schedule -> runner (one forward pass) -> sampler -> append ids and check what ends a
choice at the token level (stop token ids, a finished constraint, max_new_tokens, max_model_len)
-> hand each request's `CoreOutput`s to its consumer. Detokenization, stop strings, logprob text
and delta building happen on the consumer side (output.py); when a stop string ends a choice
there, the consumer calls `finish_choice` and the core frees that choice's blocks at its next step.

Async scheduling (on by default on CUDA): a step is *issued* (forward and sampling queued on the
device, `_issue`) and later *read* (the host syncs on its tokens, `_read`). With async scheduling
the loop issues step N+1 before it reads step N, so the host's work between two steps (reading
tokens, stop checks, handing outputs out, scheduling, building inputs) overlaps the device's work
instead of leaving it idle; vLLM V1 does the same. For that, issuing step N appends a placeholder
token to every sequence that samples in it and may go on, and step N+1 takes that token from step
N's device tensor of sampled ids (runner.TokenFeed). Reading step N overwrites the placeholder.
What the host cannot know ahead is handled thus: a sequence that step N ends by length gets no
placeholder (it sits step N+1 out); one that step N ends with a stop token was computed once more
in step N+1, whose row for it is dropped; a step with a constrained row is read before the next is
issued (a grammar mask needs the accepted token), as is every step without async scheduling. On
CPU the forward pass runs on the host itself, so there is nothing to overlap and it is off.

The loop runs in one thread: a background thread of the server process (in-process mode), or the
main thread of the engine's own process (engine_process.py drives `run_once` there). It talks to
the rest of the world through two channels only: the inbox (requests, aborts, finished choices; a
deque plus an Event to wake the loop) and a sink that receives each step's outputs at once. The
default sink hands them to each request's asyncio queue through `loop.call_soon_threadsafe`, one
wake-up per event loop per step; the engine process's sink sends them to the server process in one
message. All scheduler, block and sequence state is touched by the loop's thread alone.

An exception in the forward pass fails the requests in that step; a row that cannot sample (a
constraint that allows nothing, a token the constraint refuses) fails its own request only.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import threading
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from engine.errors import InvalidInput, ModelUnavailable
from engine.llm.runner import TokenFeed
from engine.llm.sampler import DeviceSample, SamplerState, draw, top_logprobs
from engine.llm.scheduler import ScheduledBatch, Scheduler
from engine.llm.sequence import PLACEHOLDER, Sequence
from engine.llm.types import FinishReason, GenerationRequest

logger = logging.getLogger("ember.llm")

RawLogprob = tuple[float, list[tuple[int, float]]]  # (chosen logprob, [(token id, logprob)])


@dataclass
class CoreOutput:
    """What one step produced for one choice: token ids and numbers, no text."""

    index: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[RawLogprob] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: str | None = None
    # The last token is a stop token id: it counts as output but its text is not shown.
    hidden_last_token: bool = False
    prompt_logprobs: list[RawLogprob | None] | None = None  # once per request, with choice 0


@dataclass(eq=False)
class CoreRequest:
    request: GenerationRequest
    loop: asyncio.AbstractEventLoop | None  # None in the engine process: its sink sends outputs away
    queue: asyncio.Queue | None  # receives list[CoreOutput] once per step
    arrival: int = 0
    seqs: list[Sequence] = field(default_factory=list)
    done: set[int] = field(default_factory=set)  # choice indices that got their final output
    forked: bool = False

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def n(self) -> int:
        return self.request.params.n


@dataclass
class IssuedStep:
    """A step whose forward pass and sampling are issued but whose tokens the host has not read."""

    seqs: list[Sequence]
    num_tokens: list[int]
    starts: list[int]  # each sequence's computed tokens before the step
    preemptions: list[int]  # each sequence's preemption count when issued
    sampled: list[Sequence]  # sequences whose last row is in this step (they sample or only score)
    to_sample: list[Sequence]  # the rows of `draw`
    draw: DeviceSample | None
    prompt_logits: dict[int, torch.Tensor]
    placeholders: dict[int, int]  # seq_id -> index in its token_ids of this step's placeholder

    def feed(self) -> TokenFeed | None:
        """The tokens the next step takes from this one, for the sequences with placeholders."""
        if not self.placeholders:
            return None
        rows = {s.seq_id: i for i, s in enumerate(self.to_sample) if s.seq_id in self.placeholders}
        return TokenFeed(self.draw.tokens, rows)


def choice_seed(seed: int, index: int) -> int:
    """An independent 63-bit seed per (request seed, choice index): choice 1 of seed s must not
    replay choice 0 of seed s + 1."""
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


Sink = Callable[["dict[CoreRequest, list[CoreOutput]]"], None]


class EngineCore:
    def __init__(self, runner, scheduler: Scheduler, *, eos_token_ids: frozenset[int], max_model_len: int,
                 block_size: int, vocab_size: int, cpu_threads: int | None = None, sink: Sink | None = None,
                 thread: bool = True, async_scheduling: bool = False):
        self.runner = runner
        self.async_scheduling = async_scheduling
        self._in_flight: IssuedStep | None = None  # issued, not read (async scheduling only)
        self.cpu_threads = cpu_threads
        self.scheduler = scheduler
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.sampler_state = SamplerState(vocab_size, runner.device)
        self._generator = torch.Generator(device=runner.device)
        self._generator.seed()

        self._lock = threading.Lock()  # guards _active, _stopped and the inbox against shutdown
        self._active: dict[str, CoreRequest] = {}
        self._inbox: deque[tuple[str, Any]] = deque()
        self._wake = threading.Event()
        self._closing = False
        self._stopped = False  # the loop has done its final drain: nothing more is accepted
        self._next_seq_id = 0
        self._next_arrival = 0
        self.counters: defaultdict[str, int] = defaultdict(int)
        self._pending: dict[CoreRequest, list[CoreOutput]] = {}  # this step's outputs
        self._sink = sink or self._deliver_to_loops
        self._thread: threading.Thread | None = None
        if thread:
            self._thread = threading.Thread(target=self._loop, name="ember-llm-engine", daemon=True)
            self._thread.start()

    # -- called from any thread ----------------------------------------------------------------

    def add(self, state: CoreRequest) -> None:
        """Queue a request. Raises ModelUnavailable once the core is shut down (never hangs)."""
        with self._lock:
            if self._closing or self._stopped:
                raise ModelUnavailable("the LLM engine is shut down")
            if state.request_id in self._active:
                raise InvalidInput(f"request id {state.request_id!r} is already running", param="request_id")
            self._active[state.request_id] = state
            self._inbox.append(("add", state))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        with self._lock:
            state = self._active.get(request_id)
        if state is not None:
            self._send("abort", state)

    def active(self, request_id: str) -> CoreRequest | None:
        with self._lock:
            return self._active.get(request_id)

    def abort_request(self, state: CoreRequest) -> None:
        self._send("abort", state)

    def finish_choice(self, state: CoreRequest, index: int, reason: FinishReason) -> None:
        """The consumer ended a choice (a stop string): free its blocks at the next step."""
        self._send("finish", (state, index, reason))

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` on the loop thread between steps and return its result (sleep/wake)."""
        done = threading.Event()
        box: dict = {}

        def run():
            try:
                box["value"] = fn()
            except BaseException as exc:  # noqa: BLE001 - handed back to the caller
                box["error"] = exc
            done.set()

        self._send("call", run)
        done.wait()
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def _send(self, kind: str, payload) -> None:
        with self._lock:
            if self._stopped:
                if kind == "call":
                    payload()
                return
            self._inbox.append((kind, payload))
        self._wake.set()

    @property
    def num_inbox(self) -> int:
        return len(self._inbox)

    @property
    def num_waiting(self) -> int:
        """Requests not yet running: in the inbox or waiting in the scheduler."""
        return len(self._inbox) + self.scheduler.num_waiting

    @property
    def num_active(self) -> int:
        return len(self._active)

    def close(self) -> None:
        """Stop the loop thread; requests still in flight end with "abort"."""
        self._closing = True
        self._wake.set()
        thread = self._thread
        if thread is not None and thread.is_alive() and threading.current_thread() is not thread:
            thread.join()

    def stats(self) -> dict:
        """Counters of the loop's state (read without locks: a snapshot, possibly a step old)."""
        bm = self.scheduler.bm
        return {
            "num_free_blocks": bm.num_free_blocks,
            "num_total_blocks": bm.num_blocks,
            "running": len(self.scheduler.running),
            "waiting": self.scheduler.num_waiting + len(self._inbox),
            "active_requests": len(self._active),
            "steps": self.counters["steps"],
            "prompt_tokens": self.counters["prompt_tokens"],
            "generation_tokens": self.counters["generation_tokens"],
            "prefix_cache_hit_tokens": bm.prefix_hit_tokens,
            "preemptions": self.scheduler.num_preemptions,
            "failed_steps": self.counters["failed_steps"],
        }

    # -- the loop thread -----------------------------------------------------------------------

    def setup_thread(self) -> None:
        """Per-thread torch settings of the thread that runs the loop."""
        torch.set_grad_enabled(False)
        if self.cpu_threads and self.runner.device.type == "cpu":
            torch.set_num_threads(self.cpu_threads)

    def _loop(self) -> None:
        self.setup_thread()
        while not self._closing:
            if not self.run_once():
                self._wake.wait()
                self._wake.clear()
        self.shut_down()

    def run_once(self) -> bool:
        """Handle the inbox, issue one step if there is work, read the step before it (async
        scheduling) or this one, and hand the outputs to the sink. False when there was nothing
        to do (the caller may wait for the inbox)."""
        self._drain_inbox()
        if not self.scheduler.has_work() and self._in_flight is None:
            self._flush()  # aborts handled in the inbox still owe their final outputs
            return False
        try:
            issued = self._issue(self.scheduler.schedule()) if self.scheduler.has_work() else None
            self.settle()
            if issued is not None and issued.placeholders:
                self._in_flight = issued  # read after the next step is issued
                self.counters["steps_ahead"] += 1
            elif issued is not None:
                self._read(issued)
        except Exception:  # a bug in bookkeeping: fail what is in flight, keep serving
            logger.exception("LLM engine step failed")
            self._in_flight = None
            for state in self._active_states():
                self._end_request(state, "error", "internal error in the engine step")
        self._flush()
        return True

    def settle(self) -> None:
        """Read the step in flight, if any (before the runner or scheduler change under it)."""
        step, self._in_flight = self._in_flight, None
        if step is not None:
            self._read(step)

    def shut_down(self) -> None:
        """Accept nothing more; requests still in flight end with "abort"."""
        with self._lock:
            self._stopped = True
        self._drain_inbox()
        try:
            self.settle()
        except Exception:
            logger.exception("reading the last LLM engine step failed")
            self._in_flight = None
        for state in self._active_states():
            self._end_request(state, "abort")
        self._flush()

    def _drain_inbox(self) -> None:
        while self._inbox:
            kind, payload = self._inbox.popleft()
            if kind == "abort":
                self._end_request(payload, "abort")
            elif kind == "finish":
                state, index, reason = payload
                self._end_choice(state, index, reason)
            elif kind == "call":
                self.settle()
                payload()
            else:
                try:
                    self._add(payload)
                except Exception as exc:  # e.g. a constraint factory that raises
                    logger.exception("could not start request %s", payload.request_id)
                    self._end_request(payload, "error", f"{type(exc).__name__}: {exc}")

    def _add(self, state: CoreRequest) -> None:
        state.arrival = self._next_arrival
        self._next_arrival += 1
        self.scheduler.add(self._new_seq(state, 0))

    def _new_seq(self, state: CoreRequest, index: int) -> Sequence:
        req, p = state.request, state.request.params
        seq = Sequence(
            seq_id=self._next_seq_id, request_id=req.request_id, index=index,
            token_ids=list(req.prompt_token_ids), num_prompt_tokens=len(req.prompt_token_ids),
            params=p, priority=req.priority, arrival=state.arrival,
            stop_token_ids=frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self.eos_token_ids),
        )
        self._next_seq_id += 1
        if p.seed is not None:
            seq.generator = torch.Generator(device=self.runner.device).manual_seed(choice_seed(p.seed, index))
        if p.prompt_logprobs is not None and index == 0:
            seq.prompt_logprobs = [None] * seq.num_prompt_tokens
        if req.constraint_factory is not None:
            seq.constraint = req.constraint_factory(index)
        state.seqs.append(seq)
        return seq

    def _issue(self, batch: ScheduledBatch) -> IssuedStep | None:
        """Run the forward pass and sampling of a scheduled batch without reading the tokens; the
        batch's sequences count its tokens as computed from here on."""
        if not batch.seqs:
            return None
        self.counters["steps"] += 1
        seqs, num_tokens = batch.seqs, batch.num_tokens
        previous = self._in_flight
        try:
            wanted = frozenset(s.seq_id for s in seqs if s.needs_prompt_rows)
            logits, sampled, prompt_logits = self.runner.execute(
                seqs, num_tokens, prompt_logprob_seqs=wanted, feed=previous.feed() if previous else None)
            rows = [i for i, s in enumerate(sampled) if s.params.max_new_tokens > 0]
            to_sample = [sampled[i] for i in rows]
            if len(rows) < len(sampled):  # scoring-only rows (max_new_tokens 0) sample nothing
                logits = logits[rows]
            drawn = draw(logits, to_sample, self._generator, self.sampler_state) if to_sample else None
        except Exception as exc:
            logger.exception("LLM engine forward/sampling failed")
            self.counters["failed_steps"] += 1
            message = f"{type(exc).__name__}: {exc}"
            for state in {self._active.get(s.request_id) for s in seqs} - {None}:
                self._end_request(state, "error", message)
            return None
        step = IssuedStep(seqs, num_tokens, [s.num_computed_tokens for s in seqs],
                          [s.num_preemptions for s in seqs], sampled, to_sample, drawn, prompt_logits, {})
        for seq, n in zip(seqs, num_tokens):
            seq.num_computed_tokens += n
        for seq in to_sample:
            seq.num_pending_tokens += 1
        if self.async_scheduling and to_sample and not any(s.constraint is not None for s in to_sample):
            for seq in to_sample:
                if self._goes_on(seq):
                    step.placeholders[seq.seq_id] = seq.num_tokens
                    seq.token_ids.append(PLACEHOLDER)
        return step

    def _goes_on(self, seq: Sequence) -> bool:
        """Whether the sequence may need another step after the token being sampled for it (it
        does unless that token reaches a length limit; a stop token cannot be known ahead)."""
        return not self._reaches_length_limit(seq, seq.num_tokens)

    def _reaches_length_limit(self, seq: Sequence, position: int) -> bool:
        """Whether a token at `position` of the sequence is its last by max_new_tokens or max_model_len."""
        return position + 1 - seq.num_prompt_tokens >= seq.params.max_new_tokens or position + 1 >= self.max_model_len

    def _read(self, step: IssuedStep) -> None:
        """Read an issued step's tokens and act on them: prompt logprobs, prefix-cache blocks,
        appended tokens and what ends a choice."""
        result = step.draw.resolve() if step.draw is not None else None
        for seq in step.to_sample:
            seq.num_pending_tokens -= 1
        for seq, n, start, preemptions in zip(step.seqs, step.num_tokens, step.starts, step.preemptions):
            if seq.seq_id in step.prompt_logits:
                self._gather_prompt_logprobs(seq, step.prompt_logits[seq.seq_id], start, n)
            if seq.num_preemptions == preemptions:  # else its blocks were freed (maybe reused) since
                self.scheduler.bm.register_full_blocks(seq, start + n)
            if start + n <= seq.num_prompt_tokens:
                self.counters["prompt_tokens"] += n
        for seq in step.sampled:
            if seq.params.max_new_tokens == 0 and not seq.is_finished:
                state = self._active.get(seq.request_id)
                if state is not None:  # scoring only: the prompt is done, every choice ends
                    self._emit(state, CoreOutput(seq.index, finish_reason="length",
                                                 prompt_logprobs=seq.prompt_logprobs))
                    self._finish_seq(state, seq, "length")
                    self._end_request(state, "length")
        for i, seq in enumerate(step.to_sample):
            state = self._active.get(seq.request_id)
            if state is None or seq.is_finished:  # ended meanwhile (a stop token read in the step before)
                self.counters["dropped_rows"] += 1
                continue
            if i in result.errors:
                self._end_request(state, "error", result.errors[i])
                continue
            try:
                self._append_token(state, seq, result.token_ids[i], result.logprobs[i],
                                   step.placeholders.get(seq.seq_id))
            except Exception as exc:
                logger.info("request %s failed: %s", seq.request_id, exc)
                self._end_request(state, "error", f"{type(exc).__name__}: {exc}")

    def _gather_prompt_logprobs(self, seq: Sequence, logits: torch.Tensor, start: int, n: int) -> None:
        """Rows at positions start..start+n-1 predict prompt tokens start+1..start+n."""
        targets = [pos + 1 for pos in range(start, start + n) if pos + 1 < seq.num_prompt_tokens]
        if not targets:
            return
        logprobs = logits[:len(targets)].float().log_softmax(dim=-1)
        chosen, tops = top_logprobs(logprobs, [seq.token_ids[t] for t in targets], seq.params.prompt_logprobs)
        for t, c, top in zip(targets, chosen, tops):
            seq.prompt_logprobs[t] = (c, top)

    def _append_token(self, state: CoreRequest, seq: Sequence, token: int, logprob: RawLogprob | None,
                      placeholder: int | None = None) -> None:
        """Put a sampled token in its place: at the end of token_ids, or over its placeholder
        (which a step issued since may already be followed by another)."""
        p = seq.params
        if state.n > 1 and not state.forked:
            self._fork(state, seq)
        if placeholder is None:
            position = seq.num_tokens
            seq.token_ids.append(token)
        else:
            position = placeholder
            seq.token_ids[position] = token
        first = position == seq.num_prompt_tokens
        self.counters["generation_tokens"] += 1
        if seq.constraint is not None:
            seq.constraint.accept(token)
        finish: FinishReason | None = None
        hidden = token in seq.stop_token_ids
        if hidden or (seq.constraint is not None and seq.constraint.is_done()):
            finish = "stop"
        elif self._reaches_length_limit(seq, position):
            finish = "length"
        self._emit(state, CoreOutput(
            seq.index, [token], [logprob] if logprob is not None else [], finish,
            hidden_last_token=hidden,
            prompt_logprobs=seq.prompt_logprobs if first and seq.prompt_logprobs is not None else None,
        ))
        if finish is not None:
            self._finish_seq(state, seq, finish)

    def _fork(self, state: CoreRequest, parent: Sequence) -> None:
        """Start the other n-1 choices once the prompt is in the cache: they share its full blocks
        and recompute only the partial last block (always at least one token, for its logits)."""
        state.forked = True
        shared = min((parent.num_prompt_tokens - 1) // self.block_size, len(parent.block_table))
        for index in range(1, state.n):
            child = self._new_seq(state, index)
            self.scheduler.bm.fork(parent, child, shared)
            self.scheduler.add(child)

    # -- ending requests -----------------------------------------------------------------------

    def _finish_seq(self, state: CoreRequest, seq: Sequence, reason: FinishReason) -> None:
        self.scheduler.finish(seq)
        self.sampler_state.release(seq)
        seq.finish_reason = reason
        self._mark_done(state, seq.index)

    def _end_choice(self, state: CoreRequest, index: int, reason: FinishReason) -> None:
        if index in state.done:
            return
        seq = next((s for s in state.seqs if s.index == index), None)
        if seq is not None and not seq.is_finished:
            self.scheduler.finish(seq)
            self.sampler_state.release(seq)
            seq.finish_reason = reason
        self._emit(state, CoreOutput(index, finish_reason=reason))
        self._mark_done(state, index)

    def _end_request(self, state: CoreRequest, reason: FinishReason, error: str | None = None) -> None:
        """Finish every choice that has not finished yet (abort, error, shutdown)."""
        for seq in state.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq)
                self.sampler_state.release(seq)
                seq.finish_reason = reason
        for index in range(state.n):
            if index not in state.done:
                self._emit(state, CoreOutput(index, finish_reason=reason, error=error))
                self._mark_done(state, index)

    def _mark_done(self, state: CoreRequest, index: int) -> None:
        state.done.add(index)
        if len(state.done) == state.n:
            with self._lock:
                if self._active.get(state.request_id) is state:
                    del self._active[state.request_id]

    def _active_states(self) -> list[CoreRequest]:
        with self._lock:
            return list(self._active.values())

    # -- delivery ------------------------------------------------------------------------------

    def _emit(self, state: CoreRequest, output: CoreOutput) -> None:
        self._pending.setdefault(state, []).append(output)

    def _flush(self) -> None:
        if self._pending:
            pending, self._pending = self._pending, {}
            self._sink(pending)

    def _deliver_to_loops(self, pending: dict[CoreRequest, list[CoreOutput]]) -> None:
        """Hand this step's outputs to their event loops: one wake-up per loop per step."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for state, outputs in pending.items():
            by_loop[state.loop].append((state.queue, outputs))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that event loop is closed: nobody is listening any more
                queues = {id(queue) for queue, _ in items}
                for state in [s for s in self._active_states() if id(s.queue) in queues]:
                    self._end_request(state, "abort")
                self._pending = {}


def _deliver(items: list[tuple[asyncio.Queue, list[CoreOutput]]]) -> None:
    for queue, outputs in items:
        queue.put_nowait(outputs)

