"""Tiny demo models, built locally and deterministically.

There is no model hub on an air-gapped box, so `ember demo`, `ember serve` and the test fixtures
build a small Llama-architecture chat model (with a byte-level BPE tokenizer trained here) and a
tiny image-to-video pipeline. Both are written as ordinary `save_pretrained` folders, so they go
through exactly the same registry and loading code as real weights.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}<|system|>\nYou can call these tools. To call one, answer with "
    "<tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>.\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|end|>\n{% endif %}"
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% elif message['content'] %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message.get('tool_calls') %}{% for call in message['tool_calls'] %}"
    "<tool_call>{\"name\": \"{{ call['function']['name'] }}\", \"arguments\": "
    "{{ call['function']['arguments'] if call['function']['arguments'] is string "
    "else call['function']['arguments'] | tojson }}}</tool_call>"
    "{% endfor %}{% endif %}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>",
                  "<|tool|>", "<|end|>"]

_WORDS = (
    "the a an of to and in is it that for on with as was at by this be are from or have not but "
    "what all were when we there can your which their said if do will each about how up out them "
    "then she many some so these would other into has more her two like him see time could no "
    "make than first been its who now people my made over did down only way find use may water "
    "long little very after words called just where most know get through back much before go "
    "good new write our used me man too any day same right look think also around another came "
    "come work three word must because does part even place well such here take why things help "
    "put years different away again off went old number great tell men say small every found still "
    "between name should home big give air line set own under read last never us left end along "
    "while might next sound below saw something thought both few those always looked show large "
    "often together asked house world going want school important until form food keep children "
    "feet land side without boy once animals life enough took sometimes four head above kind began "
    "almost live page got earth need far hand high year mother light parts country father let night "
    "following picture being study second eyes soon times story boys since white days ever paper "
    "hard near sentence better best across during today others sure means knew its try told young "
    "miles sun ways thing whole hear example heard several change answer room sea against top turned "
    "learn point city play toward five using himself usually poem steamed hams gold river bridge "
    "weather tool call json name arguments model video image frame prompt token"
).split()


def _corpus(n_lines: int = 3000, seed: int = 0) -> list[str]:
    """Generated text with words, numbers, punctuation, JSON and unicode, so the BPE merges
    cover what tests send (including multi-byte characters split across tokens)."""
    rng = random.Random(seed)
    lines = []
    for i in range(n_lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        line = " ".join(words).capitalize() + rng.choice([".", "?", "!", ",", ":"])
        if i % 7 == 0:
            line += f" {rng.randint(0, 9999)} {rng.random():.3f}"
        if i % 11 == 0:
            line += " " + json.dumps({"name": rng.choice(_WORDS), "arguments": {"x": rng.randint(0, 99)}})
        if i % 13 == 0:
            line += " café naïve 東京 日本語 emoji 🔥✨ ünïcödé"
        lines.append(line)
    return lines


def build_tokenizer(out_dir: Path, vocab_size: int = 2048):
    """Train a byte-level BPE tokenizer on generated text and save it with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        additional_special_tokens=SPECIAL_TOKENS[4:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_chat(out_dir: Path, *, hidden_size: int = 64, num_layers: int = 2,
                    vocab_size: int = 2048, init_std: float = 0.3, seed: int = 0) -> Path:
    """Build `ember/tiny-chat`: a random-weight Llama with a real tokenizer and chat template.

    The init std is raised well above the default so greedy decoding wanders through the
    vocabulary instead of repeating one token (streaming and stop-string tests need that).
    """
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out_dir, vocab_size=vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        initializer_range=init_std,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def ensure_demo_models(home: Path) -> dict[str, Path]:
    """Build the demo models under `home/demo` if they are missing; return their folders."""
    from filelock import FileLock

    root = Path(home) / "demo"
    root.mkdir(parents=True, exist_ok=True)
    folders = {"tiny-chat": root / "tiny-chat", "tiny-i2v": root / "tiny-i2v"}
    with FileLock(str(root / ".build.lock")):
        chat = folders["tiny-chat"]
        if not (chat / "model.safetensors").exists():
            build_tiny_chat(chat)
        i2v = folders["tiny-i2v"]
        if not (i2v / "model_index.json").exists():
            try:
                from engine.video.demo import build_tiny_i2v
            except ImportError:  # diffusers is the optional [video] extra
                folders.pop("tiny-i2v")
            else:
                build_tiny_i2v(i2v)
    return folders
