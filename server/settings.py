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
    jwt_max_lifetime_s: int = 24 * 3600  # tokens must carry `exp`, at most this far from `iat` (or now)
    jwt_audience: str | None = None  # when set, tokens must carry this `aud`
    jwt_issuer: str | None = None  # when set, tokens must carry this `iss`
    priority_api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)  # may send `priority`
    metrics_require_key: bool = False  # /metrics answers only callers with a key
    max_json_bytes: int = 32 * 2**20  # JSON request bodies (room for a 20 MB image as base64)
    max_upload_bytes: int = 100 * 2**20  # /v1/files uploads and Flowise form posts
    max_form_part_bytes: int = 2**20  # one non-file field of a form post
    max_json_depth: int = 64
    body_timeout_s: float = 30.0  # a client that sends no body bytes for this long gets 408
    timeout_keep_alive_s: int = 5
    file_ttl_hours: float = 24 * 7
    max_files_per_key: int = 1000
    max_file_bytes_per_key: int = 2 * 2**30
    max_sessions_per_key: int = 1000
    sweep_interval_s: float = 600.0  # how often expired files and idle sessions are deleted
    allow_insecure_bind: bool = False  # bind a non-loopback address without API keys
    public_url: str | None = None  # base URL used in links (urls.get, file URLs); else the request's
    allow_http_inputs: bool = True  # fetch public http(s) URLs given as file inputs
    allow_private_urls: bool = False  # let inputs and webhooks reach loopback/private addresses (trusted networks)
    url_fetch_timeout_s: float = 10.0
    sessions: bool = True
    session_ttl_hours: float = 24 * 7
    webhook_secret: str | None = None  # Standard-Webhooks signing secret ("whsec_<base64>")
    webhook_allow_private: bool = False  # allow webhooks (only) to loopback/private addresses
    requeue_interrupted: bool = False  # re-run predictions interrupted by a restart or a replica's death
    # The store: a SQLite file in `home` by default; `postgresql://user:pass@host/db` lets several
    # server replicas share one (see README "Scaling out").
    database_url: str | None = None
    storage_dir: Path | None = None  # uploaded and produced files; a folder every replica sees. Default: home/files
    replica_heartbeat_s: float = 2.0  # how often a replica heartbeats, picks up cancels and adopts orphans
    replica_lease_s: float = 15.0  # a replica silent this long is gone: another adopts its predictions
    ray_stream_interval_ms: float = 20.0  # `ember serve --ray`: a model replica sends a stream's tokens at most this often
    ingress_replicas: int = 1  # `ember serve --ray`: replicas of the HTTP ingress (more than 1 needs PostgreSQL)
    max_queue: int = 1024
    memory_budgets: str | None = None  # per-device GiB, e.g. "cpu=16,cuda:0=70"; default 90% of GPUs, half of RAM
    log_level: str = "info"

    @field_validator("api_keys", "priority_api_keys", mode="before")
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
    def database(self) -> Path | str:
        """Where the store lives: the configured database URL, else the SQLite file in home."""
        return self.database_url or self.db_path

    @property
    def files_dir(self) -> Path:
        return self.storage_dir or self.home / "files"

    @property
    def webhooks_may_reach_private(self) -> bool:
        return self.webhook_allow_private or self.allow_private_urls
