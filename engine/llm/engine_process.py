"""The engine core in its own process, with the step loop on that process's main thread.

Why: the loop's OpenMP regions run ~1.5-2x slower when launched from a thread other than the
process's main thread, and in the server process the loop shares one GIL with the HTTP server and
every SSE stream. vLLM V1 splits its engine the same way (EngineCore in a process, AsyncLLM in the
server). Here the server side keeps the output processing (detokenization, stop strings, deltas,
in output.py); the engine process schedules, runs the model, samples and appends ids.

The two sides talk over one duplex pipe of pickled tuples, narrow on purpose:

  server -> engine   ("add", request, constraint)   a GenerationRequest without its constraint
                                                     factory; that as ("grammar", spec) or
                                                     ("object", picklable factory) or None
                     ("abort", request_id)
                     ("finish", request_id, choice index, reason)   a stop string ended a choice
                     ("call", call_id, name)                      "sleep" | "wake" | "threads"
                     ("close",)
  engine -> server   ("ready", {"kv_cache_bytes": int, "stats": dict}) | ("failed", traceback text)
                     ("step", [(request_id, [CoreOutput, ...]), ...], stats)   one per step
                     ("reply", call_id, error text | None, value, stats)
                     ("closed",)

`ProcessCore` is the server side. It offers the methods of `EngineCore` the facade (engine.py)
uses, and one reader thread that only receives a step's message and hands each request's outputs to
its event loop (one `call_soon_threadsafe` per loop per step). The model goes to the engine process
as an argument of the spawn: torch pickles CPU tensors as shared memory (tied weights stay one
tensor), so the weights are not copied and the model pool's accounting is unchanged. Constraints
cross as their spec (grammar.GrammarFactory) and are compiled in the engine process.

If the engine process dies, every request in flight ends with an error, nothing more is accepted
(`alive` turns False) and the model pool loads the version again on its next use.
"""

from __future__ import annotations

import asyncio
import atexit
import dataclasses
import itertools
import logging
import pickle
import signal
import threading
import traceback
from collections import OrderedDict, defaultdict
from typing import Any

import torch
import torch.multiprocessing as mp

from engine.errors import InvalidInput, ModelUnavailable
from engine.llm.build import CoreSpec, kv_cache_bytes
from engine.llm.cpu_linear import packed_bytes
from engine.llm.cpu_malloc import retain_freed_memory
from engine.llm.core import CoreOutput, CoreRequest
from engine.llm.types import FinishReason

logger = logging.getLogger("ember.llm")

START_TIMEOUT_S = 600.0  # building the runner (and CUDA graphs) in the engine process
CLOSE_TIMEOUT_S = 30.0
GRAMMAR_CACHE_SIZE = 64


class ProcessCore:
    """The server's side of an engine core running in its own process."""

    def __init__(self, spec: CoreSpec, tokenizer):
        context = mp.get_context("spawn")
        self._conn, child_conn = context.Pipe(duplex=True)
        self.process = context.Process(target=engine_main, args=(child_conn, spec, tokenizer),
                                       name="ember-llm-core", daemon=True)
        self.process.start()
        child_conn.close()
        self._send_lock = threading.Lock()
        self._lock = threading.Lock()  # guards _active, _calls and the state flags
        self._active: dict[str, CoreRequest] = {}
        self._calls: dict[int, tuple[threading.Event, dict]] = {}
        self._call_ids = itertools.count()
        self._closing = False
        self.alive = True
        self._stats: dict = {}
        ready = self._await_ready()
        self._kv_cache_bytes: int = ready["kv_cache_bytes"]
        self._stats = ready["stats"]
        self._reader = threading.Thread(target=self._read, name="ember-llm-core-reader", daemon=True)
        self._reader.start()

    def _await_ready(self) -> dict:
        waited = 0.0
        while not self._conn.poll(1.0):
            waited += 1.0
            if not self.process.is_alive() or waited >= START_TIMEOUT_S:
                self._kill()
                raise ModelUnavailable(f"the LLM engine process did not start (exit code {self.process.exitcode})")
        try:
            kind, payload = self._conn.recv()
        except (EOFError, OSError) as exc:
            self._kill()
            raise ModelUnavailable(f"the LLM engine process did not start (exit code {self.process.exitcode})") from exc
        if kind != "ready":
            self._kill()
            raise ModelUnavailable(f"the LLM engine process failed to start:\n{payload}")
        return payload

    # -- the EngineCore surface the facade uses ------------------------------------------------

    def add(self, state: CoreRequest) -> None:
        """Send a request. Raises ModelUnavailable once the engine process is gone or closing."""
        request = state.request
        constraint = _constraint_message(request.constraint_factory)
        with self._lock:
            if self._closing or not self.alive:
                raise ModelUnavailable("the LLM engine is shut down")
            if state.request_id in self._active:
                raise InvalidInput(f"request id {state.request_id!r} is already running", param="request_id")
            self._active[state.request_id] = state
        try:
            self._send(("add", dataclasses.replace(request, constraint_factory=None), constraint))
        except ModelUnavailable:
            with self._lock:
                self._active.pop(state.request_id, None)
            raise

    def abort(self, request_id: str) -> None:
        if request_id in self._active:
            self._send_quietly(("abort", request_id))

    def abort_request(self, state: CoreRequest) -> None:
        self.abort(state.request_id)

    def finish_choice(self, state: CoreRequest, index: int, reason: FinishReason) -> None:
        self._send_quietly(("finish", state.request_id, index, reason))

    def call(self, name: str) -> Any:
        """Run a named operation in the engine process between steps and return its result."""
        done, box = threading.Event(), {}
        with self._lock:
            if not self.alive:
                raise ModelUnavailable("the LLM engine process is not running")
            call_id = next(self._call_ids)
            self._calls[call_id] = (done, box)
        self._send(("call", call_id, name))
        done.wait()
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def sleep(self) -> None:
        self.call("sleep")

    def wake(self) -> None:
        self._kv_cache_bytes = self.call("wake")

    def stats(self) -> dict:
        """The engine process's counters as of its last step; requests known here count as active."""
        with self._lock:
            stats = dict(self._stats)
            stats["active_requests"] = len(self._active)
        return stats

    def kv_cache_bytes(self) -> int:
        return self._kv_cache_bytes

    @property
    def num_waiting(self) -> int:
        """Requests not yet running (an estimate: the engine process reports once per step)."""
        with self._lock:
            return max(0, len(self._active) - self._stats.get("running", 0))

    @property
    def num_active(self) -> int:
        return len(self._active)

    def close(self) -> None:
        """Ask the engine process to stop (requests in flight end with "abort") and wait for it."""
        with self._lock:
            if self._closing:
                already = True
            else:
                already, self._closing = False, True
        if not already:
            self._send_quietly(("close",))
        if threading.current_thread() is not self._reader:
            self._reader.join(CLOSE_TIMEOUT_S)
        self.process.join(CLOSE_TIMEOUT_S)
        if self.process.is_alive():
            logger.warning("the LLM engine process did not stop in %ss; killing it", CLOSE_TIMEOUT_S)
            self._kill()
        self._conn.close()

    # -- pipe ----------------------------------------------------------------------------------

    def _send(self, message: tuple) -> None:
        try:
            with self._send_lock:
                self._conn.send(message)
        except (OSError, ValueError) as exc:  # the engine process is gone (or the pipe is closed)
            raise ModelUnavailable("the LLM engine process is not running") from exc

    def _send_quietly(self, message: tuple) -> None:
        try:
            self._send(message)
        except ModelUnavailable:
            pass  # the reader ends every request when the engine process goes away

    def _kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)

    def _read(self) -> None:
        """The reader thread: one message per step, handed on at once."""
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            except Exception:  # noqa: BLE001 - an unreadable message: the pipe cannot be trusted
                logger.exception("unreadable message from the LLM engine process")
                self._kill()
                break
            try:
                kind = message[0]
                if kind == "step":
                    self._deliver(message[1], message[2])
                elif kind == "reply":
                    self._reply(*message[1:])
                elif kind == "closed":
                    break
            except Exception:  # noqa: BLE001 - a message this side cannot handle: stop, never hang
                logger.exception("bad message from the LLM engine process")
                self._kill()
                break
        self._ended()

    def _deliver(self, items: list[tuple[str, list[CoreOutput]]], stats: dict) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        with self._lock:
            self._stats = stats
            for request_id, outputs in items:
                state = self._active.get(request_id)
                if state is None:
                    continue
                for out in outputs:
                    if out.finish_reason is not None:
                        state.done.add(out.index)
                if len(state.done) >= state.n:
                    del self._active[request_id]
                by_loop[state.loop].append((state.queue, outputs))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # that event loop is closed: nobody is listening any more
                with self._lock:
                    gone = [s for s in self._active.values() if s.loop is loop]
                for state in gone:
                    self.abort(state.request_id)

    def _reply(self, call_id: int, error: str | None, value: Any, stats: dict) -> None:
        with self._lock:
            self._stats = stats
            done, box = self._calls.pop(call_id, (None, None))
        if done is None:
            return
        if error is not None:
            box["error"] = RuntimeError(error)
        else:
            box["value"] = value
        done.set()

    def _ended(self) -> None:
        """The engine process has stopped (closed, or died): end everything still waiting on it."""
        self.process.join(CLOSE_TIMEOUT_S if self._closing else 5)
        with self._lock:
            expected = self._closing or _interpreter_exiting
            self.alive = False
            states, self._active = list(self._active.values()), {}
            calls, self._calls = list(self._calls.values()), {}
        code = self.process.exitcode
        if not expected:
            logger.error("the LLM engine process exited unexpectedly (exit code %s)", code)
        message = ("the LLM engine was shut down" if expected
                   else f"the LLM engine process exited unexpectedly (exit code {code})")
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for state in states:
            outputs = [CoreOutput(i, finish_reason="error", error=message) for i in range(state.n)
                       if i not in state.done]
            by_loop[state.loop].append((state.queue, outputs))
        for loop, batch in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:
                pass
        for done, box in calls:
            box["error"] = ModelUnavailable(message)
            done.set()


_interpreter_exiting = False


@atexit.register
def _note_interpreter_exit() -> None:
    """Registered after multiprocessing's own exit hook, so it runs first: engine processes that
    end because the server is exiting are not reported as crashes."""
    global _interpreter_exiting
    _interpreter_exiting = True


def _constraint_message(factory) -> tuple[str, Any] | None:
    """How a request's constraint factory crosses: a grammar as its spec (compiled over there), any
    other factory pickled whole (a plain object such as ForcedTokensFactory; not a lambda)."""
    if factory is None:
        return None
    spec = getattr(factory, "spec", None)
    if isinstance(spec, str):
        return "grammar", spec
    try:
        pickle.dumps(factory)
    except Exception as exc:  # noqa: BLE001 - lambdas, closures, objects holding locks
        raise InvalidInput(f"this constraint cannot be sent to the engine process: {exc}",
                           param="constraint_factory") from exc
    return "object", factory


def _put_all(batch: list[tuple[asyncio.Queue, list[CoreOutput]]]) -> None:
    for queue, outputs in batch:
        queue.put_nowait(outputs)


# -- the engine process --------------------------------------------------------------------------


class _EngineProcess:
    """The loop of the engine process: between steps it reads every message waiting on the pipe;
    when there is nothing to run it blocks on the pipe."""

    def __init__(self, conn, spec: CoreSpec, tokenizer):
        self.conn = conn
        self.spec = spec
        self.tokenizer = tokenizer
        self.core = spec.new_core(thread=False, sink=self._send_step)
        self.parked: dict | None = None
        self.grammars: OrderedDict[str, Any] = OrderedDict()
        self.closing = False

    def held_bytes(self) -> int:
        """What this process holds beyond the weights the server counts: the KV cache and
        workspaces, and the prepacked copies of the linear weights (engine/llm/cpu_linear.py packs
        this process's modules; the dense originals stay in the server's shared memory)."""
        return kv_cache_bytes(self.core.runner) + packed_bytes(self.core.runner.model)

    def _send_step(self, pending: dict[CoreRequest, list[CoreOutput]]) -> None:
        items = [(state.request_id, outputs) for state, outputs in pending.items()]
        self.conn.send(("step", items, self.core.stats()))

    def run(self) -> None:
        self.core.setup_thread()
        self.conn.send(("ready", {"kv_cache_bytes": self.held_bytes(), "stats": self.core.stats()}))
        while not self.closing:
            while not self.closing and self.conn.poll():
                self.handle(self.conn.recv())
            if self.closing:
                break
            if not self.core.run_once():
                self.conn.poll(None)  # idle: wait for the next message (EOFError once the server is gone)
        self.core.shut_down()
        self.conn.send(("closed",))

    def handle(self, message: tuple) -> None:
        kind = message[0]
        if kind == "add":
            self._add(message[1], message[2])
        elif kind == "abort":
            self.core.abort(message[1])
        elif kind == "finish":
            _, request_id, index, reason = message
            state = self.core.active(request_id)
            if state is not None:
                self.core.finish_choice(state, index, reason)
        elif kind == "call":
            self._call(message[1], message[2])
        elif kind == "close":
            self.closing = True

    def _add(self, request, constraint: tuple[str, Any] | None) -> None:
        state = CoreRequest(request, None, None)
        try:
            if constraint is not None:
                kind, value = constraint
                request.constraint_factory = self._grammar(value) if kind == "grammar" else value
            self.core.add(state)
        except Exception as exc:  # noqa: BLE001 - this request fails, the engine keeps serving
            error = f"{type(exc).__name__}: {exc}"
            self._send_step({state: [CoreOutput(i, finish_reason="error", error=error) for i in range(state.n)]})

    def _grammar(self, spec: str):
        """The factory for a grammar spec, compiled once per spec in this process (recently used kept)."""
        factory = self.grammars.get(spec)
        if factory is None:
            from engine.llm.grammar import GrammarFactory

            factory = self.grammars[spec] = GrammarFactory(self.tokenizer, spec)
            while len(self.grammars) > GRAMMAR_CACHE_SIZE:
                self.grammars.popitem(last=False)
        self.grammars.move_to_end(spec)
        return factory

    def _call(self, call_id: int, name: str) -> None:
        try:
            if name == "sleep":
                if self.parked is None:
                    self.parked = self.spec.sleep(self.core)
                value = None
            elif name == "wake":
                if self.parked is not None:
                    self.spec.wake(self.core, self.parked)
                    self.parked = None
                value = self.held_bytes()
            elif name == "threads":
                value = torch.get_num_threads()
            else:
                raise ValueError(f"unknown call {name!r}")
            reply = ("reply", call_id, None, value, self.core.stats())
        except Exception as exc:  # noqa: BLE001 - handed back to the caller
            reply = ("reply", call_id, f"{type(exc).__name__}: {exc}", None, self.core.stats())
        self.conn.send(reply)


def engine_main(conn, spec: CoreSpec, tokenizer) -> None:
    """Entry point of the engine process."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when this process stops
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    retain_freed_memory()
    try:
        engine = _EngineProcess(conn, spec, tokenizer)
    except Exception:  # noqa: BLE001 - reported to the server, which raises it
        conn.send(("failed", traceback.format_exc()))
        return
    try:
        engine.run()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        pass  # the server process is gone: nobody to serve
