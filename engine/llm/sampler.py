"""Turns a step's logits into next tokens, one row per sequence, each row with its own settings.

Order of processing (every step is a vectorised op over the rows that need it):
  repetition penalty (prompt + output, transformers' definition), presence/frequency penalties
  (output only, OpenAI's definition), logit_bias, suppression of stop tokens before
  min_new_tokens, constraint masks; then greedy rows take the argmax, and sampled rows go through
  temperature, top_k, top_p, min_p and an exponential race (argmax of p / Exp(1) noise, which draws
  exactly `vocab` numbers per row from that row's generator). A seeded request therefore gets the
  same tokens whatever else is in the batch. Logprobs are the log-softmax of the processed
  distribution the token was drawn from.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.llm.sequence import Sequence

NEG_INF = float("-inf")
GREEDY_EPS = 1e-5


@dataclass
class SampleResult:
    token_ids: list[int]
    # per row: None, or (logprob of the chosen token, [(token_id, logprob)] top alternatives)
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


def _token_matrix(token_lists: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """Padded [rows, max_len] ids; padding is `vocab`, one column past the real vocabulary."""
    width = max((len(t) for t in token_lists), default=0)
    padded = [t + [vocab] * (width - len(t)) for t in token_lists]
    return torch.tensor(padded, dtype=torch.long, device=device).view(len(token_lists), width)


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    vocab = logits.shape[1]
    rep = [i for i, s in enumerate(seqs) if s.params.repetition_penalty != 1.0]
    if rep:
        ids = _token_matrix([seqs[i].token_ids for i in rep], vocab, logits.device)
        seen = torch.zeros(len(rep), vocab + 1, dtype=torch.bool, device=logits.device)
        seen.scatter_(1, ids, True)
        seen = seen[:, :vocab]
        penalty = torch.tensor([seqs[i].params.repetition_penalty for i in rep], device=logits.device)[:, None]
        sub = logits[rep]
        penalised = torch.where(sub > 0, sub / penalty, sub * penalty)
        logits[rep] = torch.where(seen, penalised, sub)
    additive = [i for i, s in enumerate(seqs) if s.params.presence_penalty or s.params.frequency_penalty]
    if additive:
        ids = _token_matrix([seqs[i].output_token_ids for i in additive], vocab, logits.device)
        counts = torch.zeros(len(additive), vocab + 1, device=logits.device)
        counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=counts.dtype))
        counts = counts[:, :vocab]
        presence = torch.tensor([seqs[i].params.presence_penalty for i in additive], device=logits.device)
        frequency = torch.tensor([seqs[i].params.frequency_penalty for i in additive], device=logits.device)
        logits[additive] -= frequency[:, None] * counts + presence[:, None] * (counts > 0)


def apply_bias_and_masks(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    vocab = logits.shape[1]
    for i, s in enumerate(seqs):
        if s.params.logit_bias:
            ids = [t for t in s.params.logit_bias if 0 <= t < vocab]
            logits[i, ids] += torch.tensor([s.params.logit_bias[t] for t in ids], device=logits.device)
        if s.num_output_tokens < s.params.min_new_tokens and s.stop_token_ids:
            logits[i, [t for t in s.stop_token_ids if t < vocab]] = NEG_INF
        if s.constraint is not None:
            mask = s.constraint.allowed_token_mask(vocab)
            if mask is not None:
                mask = mask.to(logits.device)
                if not bool(mask.any()):
                    raise ValueError("the constraint allows no token")
                logits[i].masked_fill_(~mask, NEG_INF)


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


def exponential_noise(shape: tuple[int, int], seqs: list[Sequence], device: torch.device,
                      generator: torch.Generator | None) -> torch.Tensor:
    noise = torch.empty(shape, device=device).exponential_(generator=generator)
    for i, s in enumerate(seqs):
        if s.generator is not None:
            noise[i].exponential_(generator=s.generator)
    return noise


@torch.inference_mode()
def sample(logits: torch.Tensor, seqs: list[Sequence], generator: torch.Generator | None = None) -> SampleResult:
    """logits: float32 [rows, vocab], modified in place."""
    device = logits.device
    apply_penalties(logits, seqs)
    apply_bias_and_masks(logits, seqs)
    params = [s.params for s in seqs]
    greedy = [p.temperature < GREEDY_EPS for p in params]

    if all(greedy):
        processed = logits
        tokens = logits.argmax(dim=-1)
    else:
        temperature = torch.tensor([1.0 if g else p.temperature for p, g in zip(params, greedy)], device=device)
        processed = logits / temperature[:, None]
        vocab = logits.shape[1]
        ks = [p.top_k if (p.top_k > 0 and not g) else vocab for p, g in zip(params, greedy)]
        ps = [p.top_p if (p.top_p < 1.0 and not g) else 2.0 for p, g in zip(params, greedy)]
        if any(k < vocab for k in ks) or any(p < 1.0 for p in ps):
            processed = top_k_top_p(
                processed,
                torch.tensor(ks, device=device) if any(k < vocab for k in ks) else None,
                torch.tensor(ps, device=device) if any(p < 1.0 for p in ps) else None,
            )
        min_ps = [0.0 if g else p.min_p for p, g in zip(params, greedy)]
        if any(m > 0 for m in min_ps):
            processed = min_p_filter(processed, torch.tensor(min_ps, device=device))
        probs = processed.softmax(dim=-1)
        noise = exponential_noise(tuple(probs.shape), seqs, device, generator)
        sampled = (probs / noise).argmax(dim=-1)
        greedy_mask = torch.tensor(greedy, device=device)
        tokens = torch.where(greedy_mask, logits.argmax(dim=-1), sampled)

    token_ids = tokens.tolist()
    return SampleResult(token_ids, _logprobs(processed, token_ids, params))


def _logprobs(processed: torch.Tensor, token_ids: list[int], params) -> list:
    rows = [i for i, p in enumerate(params) if p.logprobs is not None]
    out: list = [None] * len(params)
    if not rows:
        return out
    logprobs = processed[rows].log_softmax(dim=-1)
    top_n = max(params[i].logprobs for i in rows)
    top_values, top_ids = (logprobs.topk(top_n, dim=-1) if top_n else (None, None))
    chosen = logprobs.gather(1, torch.tensor([[token_ids[i]] for i in rows], device=processed.device))
    chosen = chosen[:, 0].tolist()
    top_values = top_values.tolist() if top_n else None
    top_ids = top_ids.tolist() if top_n else None
    for j, i in enumerate(rows):
        n = params[i].logprobs
        top = list(zip(top_ids[j][:n], top_values[j][:n])) if n else []
        out[i] = (chosen[j], top)
    return out
