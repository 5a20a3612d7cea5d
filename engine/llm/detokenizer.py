"""Incremental, UTF-8-safe detokenization with stop strings.

Decoding token by token breaks on byte-level vocabularies (one character split over several
tokens) and on tokenizers whose pieces decode differently in context (SentencePiece's leading
space). So each step decodes a short window twice, with and without the newest tokens, and emits
the difference only once it no longer ends in U+FFFD (an incomplete character). The window starts
with a few prompt tokens so the first output token is decoded in context.

At the end, `pop_text(final=True)` flushes the held-back tokens too, so the whole output equals
`tokenizer.decode(output ids)` even when the last token stops mid-character (the tokenizer's own
replacement characters included).

Stop strings: text that could still be the beginning of a stop string is held back; once a stop
string appears, the output is cut just before it and the choice finishes with "stop".
"""

from __future__ import annotations

CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: list[str] | None = None,
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.tokens = list(prompt_token_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.tokens)
        self.stop = [s for s in (stop or []) if s]
        self.max_stop_len = max((len(s) for s in self.stop), default=0)
        self.text = ""  # all decoded output text (cut at a stop string once one is found)
        self.emitted = 0  # characters of `text` already handed out
        self.stopped = False

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=self.skip_special_tokens,
                                     clean_up_tokenization_spaces=False)

    def add_token(self, token_id: int, check_stop: bool = True) -> None:
        """Decode one more token; sets `stopped` when a stop string completes (only looked for
        when `check_stop`: stop strings do not count before min_new_tokens)."""
        self.tokens.append(token_id)
        prefix_text = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.tokens[self.prefix_offset:])
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return
        new_text = full_text[len(prefix_text):]
        # Keep the window short: drop tokens that no longer influence decoding.
        self.tokens = self.tokens[self.read_offset:]
        self.prefix_offset, self.read_offset = 0, len(self.tokens)
        self._append(new_text, check_stop)

    def _append(self, new_text: str, check_stop: bool) -> None:
        search_from = max(0, len(self.text) - self.max_stop_len + 1)
        self.text += new_text
        if not self.stop or not check_stop:
            return
        hits = [i for i in (self.text.find(s, search_from) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def _held_back(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        for n in range(min(self.max_stop_len - 1, len(self.text) - self.emitted), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def _flush(self) -> None:
        """Decode the tokens still held back for an incomplete character, as the tokenizer would."""
        if self.read_offset >= len(self.tokens) or self.stopped:
            return
        prefix_text = self._decode(self.tokens[self.prefix_offset:self.read_offset])
        full_text = self._decode(self.tokens[self.prefix_offset:])
        self.tokens = self.tokens[self.read_offset:]
        self.prefix_offset, self.read_offset = 0, len(self.tokens)
        if len(full_text) > len(prefix_text):
            self._append(full_text[len(prefix_text):], check_stop=False)

    def pop_text(self, final: bool = False) -> str:
        """Text that is safe to hand out now; everything left when `final`."""
        if final:
            self._flush()
        end = len(self.text) if (final or self.stopped) else len(self.text) - self._held_back()
        out = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return out
