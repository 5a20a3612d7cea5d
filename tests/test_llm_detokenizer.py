"""Incremental detokenization: UTF-8 safe, special tokens skipped, stop strings held back and cut."""

from __future__ import annotations

from engine.llm.detokenizer import IncrementalDetokenizer

TEXT = "Hello café naïve 東京 日本語 emoji 🔥✨ ünïcödé, done."


def stream(tokenizer, token_ids, stop=None, prompt=(1,)):
    detok = IncrementalDetokenizer(tokenizer, list(prompt), stop)
    pieces = []
    for t in token_ids:
        detok.add_token(t)
        pieces.append(detok.pop_text())
        if detok.stopped:
            break
    pieces.append(detok.pop_text(final=True))
    return pieces, detok


def test_multibyte_characters_are_never_split(tokenizer):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(TEXT.split())  # some characters span several tokens
    pieces, _ = stream(tokenizer, ids)
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == TEXT


def test_special_tokens_are_skipped(tokenizer):
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    ids = tokenizer("one two", add_special_tokens=False)["input_ids"] + [end] + \
        tokenizer(" three", add_special_tokens=False)["input_ids"]
    assert "".join(stream(tokenizer, ids)[0]) == "one two three"


def test_stop_string_is_held_back_then_cut(tokenizer):
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    pieces, detok = stream(tokenizer, ids, stop=["nope", "日本"])
    assert detok.stopped
    assert "".join(pieces) == TEXT[:TEXT.index("日本")]
    emitted = ""
    for p in pieces:
        emitted += p
        assert "日" not in emitted


def test_partial_stop_match_is_released_when_it_cannot_match(tokenizer):
    ids = tokenizer("the cat sat", add_special_tokens=False)["input_ids"]
    pieces, detok = stream(tokenizer, ids, stop=["cat dog"])
    assert not detok.stopped and "".join(pieces) == "the cat sat"
    # while "cat" could still become "cat dog" it was not emitted
    emitted = ""
    for p in pieces[:-1]:
        emitted += p
        assert not emitted.endswith("cat")


def test_stop_string_spanning_tokens_at_the_very_end(tokenizer):
    ids = tokenizer("hello world", add_special_tokens=False)["input_ids"]
    pieces, detok = stream(tokenizer, ids, stop=["o w"])
    assert detok.stopped and "".join(pieces) == "hell"


def test_final_text_keeps_a_character_cut_off_by_the_last_token(tokenizer):
    ids = tokenizer("fire 🔥", add_special_tokens=False)["input_ids"]
    cut = next(n for n in range(len(ids), 0, -1) if tokenizer.decode(ids[:n]).endswith("\ufffd"))
    pieces, _ = stream(tokenizer, ids[:cut])
    assert "".join(pieces) == tokenizer.decode(ids[:cut])
