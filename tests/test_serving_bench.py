"""The serving benchmark's own machinery: the model folder it builds, ember's registry entry for it,
starting and stopping `ember serve`, and the summary. The load generator (vLLM's) is not installed
with ember, so the timed part is not run here."""

from __future__ import annotations

import json

import httpx
import psutil
import pytest

from benchmarks import serving
from engine.registry import load_registry


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return serving.build_model_folder(tmp_path_factory.mktemp("bench") / "llama", hidden=64, layers=1,
                                      vocab_size=700)


def test_model_folder_has_a_tokenizer_of_the_models_vocab_and_a_chat_template(folder):
    from transformers import AutoTokenizer

    config = json.loads((folder / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert len(tokenizer) == config["vocab_size"] == 700
    assert config["torch_dtype" if "torch_dtype" in config else "dtype"] == "bfloat16"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text.endswith("<|assistant|>\n")
    assert serving.build_model_folder(folder) == folder  # reused, not rebuilt


def test_models_yaml_registers_the_folder_for_cpu_in_bf16(folder, tmp_path):
    path = tmp_path / "models.yaml"
    serving.write_models_yaml(path, folder, kv_cache_bytes=2**26, max_num_seqs=64, max_batched=2048)
    version = load_registry(path, tmp_path, {}).resolve(serving.SERVED_NAME)
    assert (version.dtype, version.placement, version.load) == ("bfloat16", "cpu", "eager")
    assert version.limits == {"max_num_seqs": 64, "max_num_batched_tokens": 2048, "kv_cache_bytes": 2**26}
    assert version.available


def test_ember_server_starts_answers_and_its_process_group_is_stopped(folder, tmp_path):
    path = tmp_path / "models.yaml"
    serving.write_models_yaml(path, folder, kv_cache_bytes=2**26, max_num_seqs=8, max_batched=512)
    server = serving.start_ember(path, tmp_path / "home", serving.free_port(),
                                 tmp_path / "server.log")
    try:
        serving.wait_ready(server, timeout=120)
        with serving.PeakRss(server.process.pid) as rss:
            r = httpx.post(f"http://127.0.0.1:{server.port}/v1/chat/completions", timeout=60,
                           json={"model": serving.SERVED_NAME, "max_tokens": 4,
                                 "messages": [{"role": "user", "content": "hello"}]})
        assert r.status_code == 200, r.text
        assert rss.peak > 50 * 2**20  # a python process with torch loaded
    finally:
        serving.stop(server)
    assert server.process.poll() is not None
    assert not psutil.pid_exists(server.process.pid) or psutil.Process(server.process.pid).status() == "zombie"


def test_summary_takes_medians_per_system_and_level_and_ratios_ember_over_vllm():
    def run(tok_s, tpot):
        return {"output_tok_s": tok_s, "median_tpot_ms": tpot, "short_outputs": 0, "note": "text is skipped"}

    runs = {"ember": {16: [run(100, 10), run(300, 30), run(200, 20)]},
            "vllm": {16: [run(50, 40), run(150, 40)]}}
    row = serving.summarise(runs)[16]
    assert row["ember"]["output_tok_s"] == 200 and row["vllm"]["output_tok_s"] == 100
    assert row["ratio"]["output_tok_s"] == 2.0 and row["ratio"]["median_tpot_ms"] == 0.5
    assert "note" not in row["ember"]
    assert row["ember"]["short_outputs"] == 0


def test_summary_without_vllm_has_no_ratio():
    row = serving.summarise({"ember": {1: [{"output_tok_s": 5.0}]}})[1]
    assert "ratio" not in row and row["ember"]["output_tok_s"] == 5.0


def test_progress_line_flags_requests_that_stopped_early_and_failures():
    figures = {"output_tok_s": 1.0, "median_tpot_ms": 2.0, "median_ttft_ms": 3.0, "peak_rss_mib": 4.0,
               "total_output_tokens": 130, "short_outputs": 1, "failed": 2}
    line = serving.progress_line(figures)
    assert "1 requests stopped before 128 tokens" in line and "FAILED 2" in line


def test_summary_counts_early_stops_over_all_repeats():
    runs = {"ember": {64: [{"output_tok_s": 1.0, "short_outputs": 1, "failed": 0},
                           {"output_tok_s": 3.0, "short_outputs": 0, "failed": 2}]}}
    row = serving.summarise(runs)[64]["ember"]
    assert (row["output_tok_s"], row["short_outputs"], row["failed"]) == (2.0, 1, 2)


def test_report_settings_name_no_paths_of_this_machine():
    settings = serving.without_paths({"vllm": "/opt/venv/bin/vllm", "LD_PRELOAD": "/lib/libtc.so.4:/opt/v/libiomp5.so",
                                      "repeats": 2, "bind": "0-1"})
    assert settings == {"vllm": "vllm", "LD_PRELOAD": "libtc.so.4:libiomp5.so", "repeats": 2, "bind": "0-1"}
