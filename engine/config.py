"""Where ember keeps its state: one home folder for demo models, the database, files and caches."""

from __future__ import annotations

import os
from pathlib import Path


def ember_home() -> Path:
    """`EMBER_HOME`, else the per-user cache folder (`$XDG_CACHE_HOME/ember` or `~/.cache/ember`)."""
    explicit = os.environ.get("EMBER_HOME")
    if explicit:
        home = Path(explicit).expanduser()
    else:
        cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        home = Path(cache) / "ember"
    home.mkdir(parents=True, exist_ok=True)
    return home


def default_models_file() -> Path:
    """`EMBER_MODELS`, else `models.yaml` in the current folder, else the one shipped beside the code."""
    explicit = os.environ.get("EMBER_MODELS")
    if explicit:
        return Path(explicit)
    local = Path.cwd() / "models.yaml"
    if local.exists():
        return local
    return Path(__file__).resolve().parent.parent / "models.yaml"
