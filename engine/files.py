"""A local file store: uploads and outputs (videos) as files with a JSON sidecar of metadata."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from engine.errors import NotFound
from engine.jobs import new_id

SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class StoredFile:
    id: str
    name: str
    content_type: str
    size: int
    etag: str
    checksums: dict
    metadata: dict = field(default_factory=dict)
    created_at: str = ""
    expires_at: str | None = None
    owner: str | None = None


class FileStore:
    def __init__(self, root: Path, ttl_hours: float = 24 * 7):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.ttl = timedelta(hours=ttl_hours)

    def _paths(self, file_id: str) -> tuple[Path, Path]:
        if not re.fullmatch(r"[a-z0-9]{8,64}", file_id):
            raise NotFound(f"File {file_id} not found")
        return self.root / file_id, self.root / f"{file_id}.json"

    def put(self, data: bytes, name: str, content_type: str, metadata: dict | None = None,
            owner: str | None = None) -> StoredFile:
        file_id = new_id()
        blob, meta = self._paths(file_id)
        now = datetime.now(timezone.utc)
        record = StoredFile(
            id=file_id, name=SAFE_NAME.sub("_", name)[:200] or "file", content_type=content_type,
            size=len(data), etag=hashlib.md5(data).hexdigest(),
            checksums={"sha256": hashlib.sha256(data).hexdigest(), "md5": hashlib.md5(data).hexdigest()},
            metadata=metadata or {}, created_at=now.isoformat().replace("+00:00", "Z"),
            expires_at=(now + self.ttl).isoformat().replace("+00:00", "Z"), owner=owner)
        blob.write_bytes(data)
        tmp = meta.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(record)))
        os.replace(tmp, meta)
        return record

    def get(self, file_id: str) -> StoredFile:
        _, meta = self._paths(file_id)
        if not meta.exists():
            raise NotFound(f"File {file_id} not found")
        return StoredFile(**json.loads(meta.read_text()))

    def read(self, file_id: str) -> bytes:
        blob, _ = self._paths(file_id)
        self.get(file_id)
        return blob.read_bytes()

    def path(self, file_id: str) -> Path:
        blob, _ = self._paths(file_id)
        self.get(file_id)
        return blob

    def delete(self, file_id: str) -> None:
        blob, meta = self._paths(file_id)
        if not meta.exists():
            raise NotFound(f"File {file_id} not found")
        meta.unlink()
        blob.unlink(missing_ok=True)

    def list(self, owner: str | None = None) -> list[StoredFile]:
        records = [StoredFile(**json.loads(p.read_text())) for p in self.root.glob("*.json")]
        records = [r for r in records if owner is None or r.owner == owner]
        return sorted(records, key=lambda r: r.created_at, reverse=True)
