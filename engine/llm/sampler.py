"""Turns a step's logits into next tokens, one row per sequence, each row with its own settings.

Order of processing (every step is a vectorised op over the rows that need it):
  logprobs of the model's own distribution (before anything below changes it), repetition
  penalty (prompt + output, transformers' definition), presence/frequency penalties (output only,
  OpenAI's definition), logit_bias, suppression of stop tokens before min_new_tokens, constraint
  masks (one batched apply for all constrained rows); then greedy rows take the argmax, and
  sampled rows go through temperature, top_k/top_p (only the rows that ask are sorted), min_p and
  inverse-CDF sampling (one uniform number per row, drawn from that row's own generator when it is
  seeded: a seeded request gets the same tokens whatever else is in the batch). One uniform per
  row instead of an exponential race's `vocab` random numbers per row: random numbers dominated
  the sampler's time on CPU.

State kept across steps (`SamplerState`): every sequence's numeric settings in one persistent
table (`SettingsTable`, written when it first samples, read with one gather per step), and for
penalised sequences their token counts (`PenaltyState`: one persistent row each, filled from the
prompt when it joins and bumped by one batched scatter per step, so a step costs the same whatever
the context length). The engine core releases a sequence's rows when it finishes.

`draw` never waits for the device (token counts for penalties are bumped from the device tensor
of sampled ids); `DeviceSample.resolve` is where the host reads the tokens, so the engine core can
issue the next step before it (async scheduling, core.py).

A row whose constraint allows no token fails alone: `SampleResult.errors` names it, its token is
meaningless, and the other rows sample as usual.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.llm.sequence import Sequence
from engine.llm.transfer import to_device

NEG_INF = float("-inf")
GREEDY_EPS = 1e-5
# Logprobs handed out are always finite: JSON has no -Infinity.
MIN_LOGPROB = -9999.0


@dataclass
class SampleResult:
    token_ids: list[int]
    # per row: None, or (logprob of the chosen token, [(token_id, logprob)] top alternatives)
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]
    errors: dict[int, str] = field(default_factory=dict)  # row -> why that row could not sample


def _needs_penalties(seq: Sequence) -> bool:
    p = seq.params
    return p.repetition_penalty != 1.0 or bool(p.presence_penalty) or bool(p.frequency_penalty)


class PenaltyState:
    """Token counts of penalised sequences, one persistent row each (allocated on first use,
    returned by `release`). `seen_prompt` marks prompt tokens (repetition penalty looks at the
    prompt too); `counts` counts output tokens."""

    def __init__(self, vocab: int, device: torch.device):
        self.vocab = vocab
        self.device = device
        self.counts = torch.zeros(0, vocab, dtype=torch.float32, device=device)
        self.seen_prompt = torch.zeros(0, vocab, dtype=torch.bool, device=device)
        self.free_rows: list[int] = []
        self.rows: dict[Sequence, int] = {}

    @torch.inference_mode()
    def row(self, seq: Sequence) -> int:
        if seq in self.rows:
            return self.rows[seq]
        if not self.free_rows:
            grow = max(8, self.counts.shape[0])
            start = self.counts.shape[0]
            self.counts = torch.cat([self.counts, self.counts.new_zeros(grow, self.vocab)])
            self.seen_prompt = torch.cat([self.seen_prompt, self.seen_prompt.new_zeros(grow, self.vocab)])
            self.free_rows.extend(range(start + grow - 1, start - 1, -1))
        row = self.free_rows.pop()
        prompt = torch.tensor([t for t in seq.token_ids[:seq.num_prompt_tokens] if t < self.vocab],
                              dtype=torch.long, device=self.device)
        self.seen_prompt[row].index_fill_(0, prompt, True)
        output = torch.tensor([t for t in seq.output_token_ids if 0 <= t < self.vocab], dtype=torch.long,
                              device=self.device)
        self.counts[row].index_add_(0, output, torch.ones(len(output), device=self.device))
        self.rows[seq] = row
        return row

    @torch.inference_mode()
    def release(self, seq: Sequence) -> None:
        row = self.rows.pop(seq, None)
        if row is None:
            return
        self.counts[row].zero_()
        self.seen_prompt[row].zero_()
        self.free_rows.append(row)

    @torch.inference_mode()
    def record(self, seqs: list[Sequence], tokens: torch.Tensor) -> None:
        """Count this step's sampled tokens (`tokens`, one per row, still on the device: no host
        sync) for the penalised sequences, in one scatter."""
        rows = [(i, self.rows[s]) for i, s in enumerate(seqs) if s in self.rows]
        if not rows:
            return
        index = to_device(rows, torch.long, self.device)
        chosen = tokens[index[:, 0]]
        counted = (chosen < self.vocab).to(self.counts.dtype)  # ids past the tokenizer's vocab count nothing
        self.counts.index_put_((index[:, 1], chosen.clamp(max=self.vocab - 1)), counted, accumulate=True)


# Columns of SettingsTable, per sequence. Values that switch a filter off: top_k = vocab,
# top_p = 2, min_p = 0; greedy rows get temperature 1 and no filters (they take the argmax).
NUM_SETTINGS = 7
TEMPERATURE, TOP_K, TOP_P, MIN_P, REPETITION, PRESENCE, FREQUENCY = range(NUM_SETTINGS)


class SettingsTable:
    """Every sampling sequence's numeric settings in one persistent tensor on the logits' device,
    written once when the sequence first samples and read each step with one gather: a step
    copies only the row ids to the device, not one small tensor per setting."""

    def __init__(self, vocab: int, device: torch.device):
        self.vocab = vocab
        self.device = device
        self.table = torch.zeros(0, NUM_SETTINGS, device=device)
        self.rows: dict[Sequence, int] = {}
        self.free_rows: list[int] = []

    def _values(self, seq: Sequence) -> list[float]:
        p = seq.params
        greedy = p.temperature < GREEDY_EPS
        top_k = p.top_k if 0 < p.top_k < self.vocab and not greedy else self.vocab
        top_p = p.top_p if p.top_p < 1.0 and not greedy else 2.0
        return [1.0 if greedy else p.temperature, top_k, top_p, 0.0 if greedy else p.min_p,
                p.repetition_penalty, p.presence_penalty, p.frequency_penalty]

    @torch.inference_mode()
    def gather(self, seqs: list[Sequence]) -> torch.Tensor:
        """[len(seqs), NUM_SETTINGS] settings, rows in `seqs` order."""
        for seq in seqs:
            if seq not in self.rows:
                if not self.free_rows:
                    start = self.table.shape[0]
                    grow = max(8, start)
                    self.table = torch.cat([self.table, self.table.new_zeros(grow, NUM_SETTINGS)])
                    self.free_rows.extend(range(start + grow - 1, start - 1, -1))
                row = self.rows[seq] = self.free_rows.pop()
                self.table[row] = to_device(self._values(seq), torch.float32, self.device)
        return self.table[to_device([self.rows[s] for s in seqs], torch.long, self.device)]

    def release(self, seq: Sequence) -> None:
        row = self.rows.pop(seq, None)
        if row is not None:
            self.free_rows.append(row)


class SamplerState:
    """What the sampler keeps between steps for the sequences in flight; `release` a sequence
    when it finishes."""

    def __init__(self, vocab: int, device: torch.device):
        self.settings = SettingsTable(vocab, device)
        self.penalties = PenaltyState(vocab, device)

    def release(self, seq: Sequence) -> None:
        self.settings.release(seq)
        self.penalties.release(seq)


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence], state: PenaltyState,
                    settings: torch.Tensor) -> None:
    rows = [i for i, s in enumerate(seqs) if _needs_penalties(s)]
    if not rows:
        return
    slots = to_device([state.row(seqs[i]) for i in rows], torch.long, logits.device)
    index = to_device(rows, torch.long, logits.device)
    counts = state.counts[slots]
    sub = logits[index]
    cols = settings[index]
    params = [seqs[i].params for i in rows]
    if any(p.repetition_penalty != 1.0 for p in params):
        penalty = cols[:, REPETITION:REPETITION + 1]
        seen = state.seen_prompt[slots] | (counts > 0)
        sub = torch.where(seen, torch.where(sub > 0, sub / penalty, sub * penalty), sub)
    if any(p.presence_penalty or p.frequency_penalty for p in params):
        sub = sub - cols[:, FREQUENCY:FREQUENCY + 1] * counts - cols[:, PRESENCE:PRESENCE + 1] * (counts > 0)
    logits[index] = sub


def apply_bias(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    vocab = logits.shape[1]
    for i, s in enumerate(seqs):
        if s.params.logit_bias:
            ids = [t for t in s.params.logit_bias if 0 <= t < vocab]
            logits[i, ids] += torch.tensor([s.params.logit_bias[t] for t in ids], device=logits.device)
        if s.num_output_tokens < s.params.min_new_tokens and s.stop_token_ids:
            logits[i, [t for t in s.stop_token_ids if t < vocab]] = NEG_INF


def apply_constraints(logits: torch.Tensor, seqs: list[Sequence]) -> dict[int, str]:
    """Mask every constrained row at once, built on the host (no device sync per row): grammar
    constraints fill one packed bitmask applied by xgrammar in one call; other constraints give
    bool masks applied in one masked_fill. A row whose constraint allows nothing is reported, not
    raised."""
    vocab = logits.shape[1]
    bool_rows: list[int] = []
    masks: list[torch.Tensor] = []
    bit_rows: list[int] = []
    bitmask: torch.Tensor | None = None
    bitmask_vocab = 0
    errors: dict[int, str] = {}
    for i, s in enumerate(seqs):
        c = s.constraint
        if c is None:
            continue
        try:
            if hasattr(c, "fill_bitmask") and (bitmask is None or c.grammar_vocab == bitmask_vocab):
                if bitmask is None:
                    import xgrammar as xgr

                    bitmask_vocab = c.grammar_vocab
                    bitmask = xgr.allocate_token_bitmask(len(seqs), bitmask_vocab)
                if c.fill_bitmask(bitmask, i):
                    if not bool(bitmask[i].any()):
                        errors[i] = "ValueError: the constraint allows no token"
                    else:
                        bit_rows.append(i)
                continue
            mask = c.allowed_token_mask(vocab)
        except Exception as exc:  # noqa: BLE001 - a broken constraint fails its own row
            errors[i] = f"{type(exc).__name__}: {exc}"
            continue
        if mask is None:
            continue
        if not bool(mask.any()):  # a host tensor: no device round trip
            errors[i] = "ValueError: the constraint allows no token"
            continue
        bool_rows.append(i)
        masks.append(mask)
    if bool_rows:
        allowed = torch.stack(masks).to(logits.device, non_blocking=True)
        index = torch.tensor(bool_rows, dtype=torch.long, device=logits.device)
        logits[index] = logits[index].masked_fill(~allowed, NEG_INF)
    if bit_rows:
        import xgrammar as xgr

        width = min(vocab, bitmask_vocab)
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device, non_blocking=True),
                                        indices=bit_rows, vocab_size=width)
        if vocab > width:  # an lm_head padded past the tokenizer: those ids are never allowed
            logits[bit_rows, width:] = NEG_INF
    if errors:  # keep the failed rows finite so the batch's softmax stays clean
        logits[list(errors)] = 0.0
    return errors


def top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None) -> torch.Tensor:
    """Per-row top_k (vocab = off) and top_p (>= 1 = off): keep the k best tokens and the smallest
    set of best tokens whose probability reaches p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    if top_k is not None:
        ranks = torch.arange(logits.shape[1], device=logits.device)
        sorted_logits.masked_fill_(ranks[None, :] >= top_k[:, None], NEG_INF)
    if top_p is not None:
        probs = sorted_logits.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        sorted_logits.masked_fill_(mass_before >= top_p[:, None], NEG_INF)
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def min_p_filter(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the most likely token's."""
    probs = logits.softmax(dim=-1)
    threshold = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, NEG_INF)


def uniforms(seqs: list[Sequence], device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """One U[0, 1) number per row; a seeded row draws its own from its generator."""
    u = torch.rand(len(seqs), 1, device=device, dtype=torch.float64, generator=generator)
    for i, s in enumerate(seqs):
        if s.generator is not None:
            u[i] = torch.rand(1, device=device, dtype=torch.float64, generator=s.generator)
    return u


CDF_CHUNK = 256  # tokens per chunk of the two-level inverse CDF


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token whose cumulative-probability interval holds u (tokens of probability 0 have an
    empty interval and are never chosen).

    Two levels, so no row is cumulated end to end in one long float32 sum (whose rounding error
    grows with the vocabulary) nor widened whole to float64 (most of the sampler's time on CPU at
    64 rows x 32k tokens): float32 sums of 256-token chunks, cumulated in float64, pick the chunk
    whose interval holds u; then only that chunk's CDF is built, in float64."""
    rows, vocab = probs.shape
    device = probs.device
    full = vocab // CDF_CHUNK
    sums = [probs[:, :full * CDF_CHUNK].reshape(rows, full, CDF_CHUNK).sum(-1)] if full else []
    if vocab > full * CDF_CHUNK:
        sums.append(probs[:, full * CDF_CHUNK:].sum(-1, keepdim=True))
    chunk_mass = torch.cat(sums, dim=1).to(torch.float64)  # [rows, chunks]
    cdf = chunk_mass.cumsum(dim=1)
    target = u * cdf[:, -1:]
    chunk_ids = torch.arange(chunk_mass.shape[1], device=device)
    last_chunk = torch.where(chunk_mass > 0, chunk_ids, 0).amax(dim=1, keepdim=True)
    chunk = torch.minimum(torch.searchsorted(cdf, target, right=True), last_chunk)  # [rows, 1]
    before = torch.where(chunk > 0, cdf.gather(1, (chunk - 1).clamp_(min=0)), 0.0)
    cols = chunk * CDF_CHUNK + torch.arange(CDF_CHUNK, device=device)
    within = torch.where(cols < vocab, probs.gather(1, cols.clamp(max=vocab - 1)).to(torch.float64), 0.0)
    last_token = torch.where(within > 0, torch.arange(CDF_CHUNK, device=device), 0).amax(dim=1, keepdim=True)
    pick = torch.searchsorted(within.cumsum_(dim=1), target - before, right=True)
    return (chunk * CDF_CHUNK + torch.minimum(pick, last_token))[:, 0]


def _filter_rows(processed: torch.Tensor, params, greedy: list[bool], settings: torch.Tensor) -> torch.Tensor:
    """top_k/top_p on the rows that ask for them (only those are sorted), then min_p."""
    vocab = processed.shape[1]
    rows = [i for i, (p, g) in enumerate(zip(params, greedy))
            if not g and (0 < p.top_k < vocab or p.top_p < 1.0)]
    if rows:
        index = to_device(rows, torch.long, processed.device)
        cols = settings[index]
        processed[index] = top_k_top_p(
            processed[index],
            cols[:, TOP_K] if any(0 < params[i].top_k < vocab for i in rows) else None,
            cols[:, TOP_P] if any(params[i].top_p < 1.0 for i in rows) else None,
        )
    if any(p.min_p > 0 and not g for p, g in zip(params, greedy)):
        processed = min_p_filter(processed, settings[:, MIN_P])
    return processed


def process_logits(logits: torch.Tensor, seqs: list[Sequence], penalties: PenaltyState,
                   settings: torch.Tensor | None = None) -> dict[int, str]:
    """Penalties, logit_bias, min_new_tokens and constraint masks, in place; returns per-row errors."""
    if settings is None:
        settings = SettingsTable(logits.shape[1], logits.device).gather(seqs)
    apply_penalties(logits, seqs, penalties, settings)
    apply_bias(logits, seqs)
    return apply_constraints(logits, seqs)


@dataclass
class DeviceSample:
    """Sampled tokens not yet read by the host: everything the sampler decided, as device tensors
    (on CUDA still being computed when `draw` returns). `resolve` reads them: the one host sync."""

    tokens: torch.Tensor  # [rows] token ids
    raw_logprobs: torch.Tensor | None  # log-softmax of the rows in lp_rows, before any processing
    lp_rows: list[int]
    params: list
    errors: dict[int, str]
    # On CUDA: the ids copied to pinned host memory as soon as they are sampled, and the event that
    # marks the copy done. Reading `tokens` itself would wait for everything queued on the stream
    # since, i.e. for the next step when the core has already issued it (async scheduling).
    host_tokens: torch.Tensor | None = None
    copied: torch.cuda.Event | None = None

    def __post_init__(self) -> None:
        if self.tokens.is_cuda and self.host_tokens is None:
            self.host_tokens = torch.empty(self.tokens.shape, dtype=self.tokens.dtype, pin_memory=True)
            self.host_tokens.copy_(self.tokens, non_blocking=True)
            self.copied = torch.cuda.Event()
            self.copied.record()

    @torch.inference_mode()
    def resolve(self) -> SampleResult:
        """The sampled ids (and logprobs) on the host. Logprobs are computed here, on the device,
        so a step with logprob rows waits for whatever was queued after it."""
        if self.copied is not None:
            self.copied.synchronize()
            token_ids = self.host_tokens.tolist()
        else:
            token_ids = self.tokens.tolist()
        return SampleResult(token_ids, _logprobs(self.raw_logprobs, self.lp_rows, token_ids, self.params),
                            self.errors)


def sample(logits: torch.Tensor, seqs: list[Sequence], generator: torch.Generator | None = None,
           state: SamplerState | None = None) -> SampleResult:
    """`draw` and read the result at once."""
    return draw(logits, seqs, generator, state).resolve()


@torch.inference_mode()
def draw(logits: torch.Tensor, seqs: list[Sequence], generator: torch.Generator | None = None,
         state: SamplerState | None = None) -> DeviceSample:
    """logits: float32 [rows, vocab], modified in place. Without a `state` (one-off calls), the
    sequences are treated as new. Nothing here waits for the device."""
    device = logits.device
    params = [s.params for s in seqs]
    lp_rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    raw_logprobs = logits[lp_rows].log_softmax(dim=-1) if lp_rows else None
    state = state or SamplerState(logits.shape[1], device)
    settings = state.settings.gather(seqs)
    errors = process_logits(logits, seqs, state.penalties, settings)
    greedy = [p.temperature < GREEDY_EPS for p in params]

    if all(greedy):  # max(...).indices: the first maximal index, as argmax, in 0.4x its time on CPU
        tokens = logits.max(dim=-1).indices
    else:
        processed = _filter_rows(logits / settings[:, TEMPERATURE:TEMPERATURE + 1], params, greedy, settings)
        tokens = inverse_cdf(processed.softmax(dim=-1), uniforms(seqs, device, generator))
        greedy_rows = [i for i, g in enumerate(greedy) if g]
        if greedy_rows:  # only these rows (an argmax over every row was 5 % of a 64-row step)
            index = to_device(greedy_rows, torch.long, device)
            tokens[index] = logits[index].max(dim=-1).indices

    state.penalties.record(seqs, tokens)
    return DeviceSample(tokens, raw_logprobs, lp_rows, params, errors)


def top_logprobs(logprobs: torch.Tensor, chosen_ids: list[int], top_n: int
                 ) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """For each row of a [rows, vocab] log-softmax: the chosen token's logprob and the top_n
    alternatives, clamped finite."""
    logprobs = logprobs.nan_to_num(nan=MIN_LOGPROB).clamp_(min=MIN_LOGPROB)
    chosen = logprobs.gather(1, torch.tensor(chosen_ids, device=logprobs.device)[:, None])[:, 0].tolist()
    if not top_n:
        return chosen, [[] for _ in chosen_ids]
    values, ids = logprobs.topk(top_n, dim=-1)
    return chosen, [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]


def _logprobs(raw: torch.Tensor | None, rows: list[int], token_ids: list[int], params) -> list:
    out: list = [None] * len(params)
    if raw is None:
        return out
    top_n = max(params[i].logprobs for i in rows)
    chosen, tops = top_logprobs(raw, [token_ids[i] for i in rows], top_n)
    for j, i in enumerate(rows):
        out[i] = (chosen[j], tops[j][:params[i].logprobs])
    return out
