"""The output processor: turns the core's token ids into `GenerationDelta`s, on the consumer side.

Per choice it keeps an incremental detokenizer, looks for stop strings (only once
min_new_tokens are out), names logprob tokens and builds deltas. When a stop string ends a
choice, the choice's final delta goes out at once and `RequestOutput.process` reports it, so the
caller can tell the core to free that choice's blocks (tokens the core produced meanwhile are
dropped here).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.llm.core import CoreOutput, RawLogprob
from engine.llm.detokenizer import IncrementalDetokenizer
from engine.llm.types import FinishReason, GenerationDelta, GenerationRequest, TokenLogprob


class TokenTexts:
    """Cached text of single tokens (logprob entries name each token)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        text = self._cache.get(token)
        if text is None:
            text = self._cache[token] = self.tokenizer.decode([token])
        return text

    def logprob(self, token: int, raw: RawLogprob) -> TokenLogprob:
        chosen, top = raw
        return TokenLogprob(token, self(token), chosen, [(t, self(t), lp) for t, lp in top])


@dataclass
class _Choice:
    detokenizer: IncrementalDetokenizer
    num_tokens: int = 0
    finished: bool = False
    sent_prompt_logprobs: bool = False


@dataclass
class RequestOutput:
    """Consumer-side state of one request."""

    request: GenerationRequest
    texts: TokenTexts
    choices: dict[int, _Choice] = field(default_factory=dict)
    prompt_logprobs: list[TokenLogprob | None] | None = None

    def _choice(self, index: int) -> _Choice:
        choice = self.choices.get(index)
        if choice is None:
            choice = self.choices[index] = _Choice(IncrementalDetokenizer(
                self.texts.tokenizer, self.request.prompt_token_ids, self.request.params.stop))
        return choice

    def finished(self, index: int) -> bool:
        return index in self.choices and self.choices[index].finished

    def process(self, out: CoreOutput) -> tuple[GenerationDelta | None, bool]:
        """The delta for one core output (None once the choice has ended here), and whether this
        delta ended the choice by a stop string (the core does not know yet)."""
        choice = self._choice(out.index)
        if choice.finished:
            return None, False
        params = self.request.params
        if out.prompt_logprobs is not None and self.prompt_logprobs is None:
            prompt = self.request.prompt_token_ids
            self.prompt_logprobs = [None if raw is None else self.texts.logprob(prompt[i], raw)
                                    for i, raw in enumerate(out.prompt_logprobs)]
        finish: FinishReason | None = None
        token_ids: list[int] = []
        logprobs: list[TokenLogprob] = []
        detok = choice.detokenizer
        for k, token in enumerate(out.token_ids):
            choice.num_tokens += 1
            token_ids.append(token)
            if k < len(out.logprobs):
                logprobs.append(self.texts.logprob(token, out.logprobs[k]))
            if out.hidden_last_token and k == len(out.token_ids) - 1:
                break
            detok.add_token(token, check_stop=choice.num_tokens >= params.min_new_tokens)
            if detok.stopped:
                finish = "stop"
                break
        by_stop_string = finish == "stop"
        finish = finish or out.finish_reason
        delta = GenerationDelta(
            request_id=self.request.request_id, index=out.index,
            text=detok.pop_text(final=finish is not None), token_ids=token_ids, logprobs=logprobs,
            finish_reason=finish, error=out.error, prompt_tokens=len(self.request.prompt_token_ids),
            completion_tokens=choice.num_tokens,
        )
        if params.prompt_logprobs is not None and not choice.sent_prompt_logprobs and self.prompt_logprobs:
            delta.prompt_logprobs = self.prompt_logprobs
            choice.sent_prompt_logprobs = True
        choice.finished = finish is not None
        return delta, by_stop_string and out.finish_reason is None
