"""The `ember` CLI as scripts use it: in a pipe (full values, `--json`), and against a running server
(`ember models load|status|sleep|wake|unload`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import API_KEY

ROOT = Path(__file__).resolve().parents[1]


def ember(*args: str, settings, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("EMBER_API_KEY", "EMBER_URL")}
    env.update({"PYTHONPATH": str(ROOT), "EMBER_HOME": str(settings.home), "EMBER_MODELS": str(settings.models),
                "COLUMNS": "40", **(extra_env or {})})
    return subprocess.run([sys.executable, "-m", "server.cli", *args], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env, timeout=300)


def test_models_in_a_pipe_prints_full_values(settings):
    result = ember("models", settings=settings)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split("\t") == ["model", "version", "kind", "status", "devices"]
    rows = {line.split("\t")[0]: line.split("\t") for line in lines[1:]}
    assert re.fullmatch(r"[0-9a-f]{64}", rows["ember/tiny-chat"][1])  # the whole id, not a prefix
    reason = rows["acme/missing"][3]
    assert reason.startswith("unavailable: ") and reason.endswith("where the hub is reachable")  # not cut at 40 columns
    assert "…" not in result.stdout


def test_models_json_parses(settings):
    result = ember("models", "--json", settings=settings)
    assert result.returncode == 0, result.stderr
    rows = {row["model"]: row for row in json.loads(result.stdout)}
    chat = rows["ember/tiny-chat"]
    assert chat["ref"] == f"ember/tiny-chat:{chat['version']}" and chat["available"] is True
    assert rows["acme/missing"]["available"] is False and "not on this machine" in rows["acme/missing"]["reason"]


@pytest.mark.parametrize("command", [[], ["serve"], ["models"], ["models", "load"], ["models", "unload"],
                                     ["models", "sleep"], ["models", "wake"], ["models", "status"],
                                     ["demo"], ["pull"]])
def test_every_command_has_help_with_examples(command):
    from typer.testing import CliRunner

    from server.cli import app

    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output


def test_lifecycle_commands_against_a_running_server(live_server, settings):
    key = {"EMBER_API_KEY": API_KEY, "EMBER_URL": live_server.url}
    loaded = ember("models", "load", "ember/tiny-chat", "--progress", "--json", settings=settings, extra_env=key)
    assert loaded.returncode == 0, loaded.stderr
    assert json.loads(loaded.stdout)["status"] == "ready"
    assert "loading weights" in loaded.stderr or "warming up" in loaded.stderr

    asleep = ember("models", "sleep", "ember/tiny-chat", settings=settings, extra_env=key)
    assert asleep.returncode == 0, asleep.stderr
    ref, status, memory = asleep.stdout.strip().split("\t")
    assert ref.startswith("ember/tiny-chat:") and len(ref.split(":")[1]) == 64 and status == "sleeping"

    state = ember("models", "status", "ember/tiny-chat", "--json", settings=settings, extra_env=key)
    assert json.loads(state.stdout)["status"] == "sleeping"
    awake = ember("models", "wake", "ember/tiny-chat", settings=settings, extra_env=key)
    assert "\tready\t" in awake.stdout
    gone = ember("models", "unload", "ember/tiny-chat", "--json", settings=settings, extra_env=key)
    assert json.loads(gone.stdout)["status"] == "unloaded"


def test_lifecycle_commands_report_errors(live_server, settings):
    no_key = ember("models", "status", "ember/tiny-chat", "--url", live_server.url, settings=settings)
    assert no_key.returncode == 1 and "401" in no_key.stderr
    unknown = ember("models", "load", "acme/nope", "--url", live_server.url, "--api-key", API_KEY,
                    settings=settings)
    assert unknown.returncode == 1 and "404" in unknown.stderr and "acme/nope" in unknown.stderr
    nobody = ember("models", "status", "ember/tiny-chat", "--url", "http://127.0.0.1:9", settings=settings)
    assert nobody.returncode == 1 and "cannot reach" in nobody.stderr
