"""Server settings: environment variables (`EMBER_*`), overridden by CLI flags."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from typing_extensions import Annotated

from engine.config import default_models_file, ember_home


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EMBER_", extra="ignore")

    home: Path = Field(default_factory=ember_home)
    models: Path = Field(default_factory=default_models_file)
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    api_keys_file: Path | None = None
    jwt_secret: str | None = None  # HS256 bearer tokens signed with this are accepted too
    allow_insecure_bind: bool = False  # bind a non-loopback address without API keys
    public_url: str | None = None  # base URL used in links (urls.get, file URLs); else the request's
    allow_http_inputs: bool = False  # fetch http(s) URLs given as file inputs
    sessions: bool = True
    session_ttl_hours: float = 24 * 7
    webhook_secret: str | None = None  # Standard-Webhooks signing secret ("whsec_<base64>")
    webhook_allow_private: bool = False  # allow webhooks to loopback/private addresses
    requeue_interrupted: bool = False  # re-run predictions interrupted by a restart
    max_queue: int = 1024
    memory_budgets: str | None = None  # per-device GiB, e.g. "cpu=16,cuda:0=70"; default 90% of GPUs, half of RAM
    log_level: str = "info"

    @field_validator("api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value):
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value or []

    def all_api_keys(self) -> list[str]:
        keys = list(self.api_keys)
        if self.api_keys_file and self.api_keys_file.exists():
            keys += [line.strip() for line in self.api_keys_file.read_text().splitlines()
                     if line.strip() and not line.startswith("#")]
        return keys

    def memory_budget_bytes(self) -> dict[str, int] | None:
        if not self.memory_budgets:
            return None
        budgets = {}
        for item in self.memory_budgets.split(","):
            device, _, gib = item.partition("=")
            try:
                budgets[device.strip()] = int(float(gib) * 2**30)
            except ValueError:
                raise ValueError(f"EMBER_MEMORY_BUDGETS: {item!r} is not device=GiB") from None
        return budgets

    @property
    def db_path(self) -> Path:
        return self.home / "ember.db"

    @property
    def files_dir(self) -> Path:
        return self.home / "files"
