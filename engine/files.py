"""A local file store: uploads and outputs (videos) as files with a JSON sidecar of metadata.

Every file expires (`expires_at`, `ttl_hours` after its creation): from then on it is not found,
and `delete_expired` (run periodically by the server) removes its bytes."""

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
        try:
            record = StoredFile(**json.loads(meta.read_text()))
        except (FileNotFoundError, ValueError, TypeError):
            raise NotFound(f"File {file_id} not found") from None
        if _expired(record):
            raise NotFound(f"File {file_id} not found")
        return record

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

    def _records(self) -> list[StoredFile]:
        records = []
        for path in self.root.glob("*.json"):
            try:
                records.append(StoredFile(**json.loads(path.read_text())))
            except (FileNotFoundError, ValueError, TypeError):
                continue  # deleted meanwhile, or half-written
        return records

    def list(self, owner: str | None = None) -> list[StoredFile]:
        records = [r for r in self._records() if (owner is None or r.owner == owner) and not _expired(r)]
        return sorted(records, key=lambda r: r.created_at, reverse=True)

    def usage(self, owner: str | None) -> tuple[int, int]:
        """(count, bytes) of the live files `owner` has stored."""
        records = self.list(owner)
        return len(records), sum(r.size for r in records)

    def delete_expired(self) -> int:
        """Remove expired files, bytes and metadata; returns how many."""
        doomed = [r for r in self._records() if _expired(r)]
        for record in doomed:
            blob, meta = self._paths(record.id)
            meta.unlink(missing_ok=True)
            blob.unlink(missing_ok=True)
        return len(doomed)


def _expired(record: StoredFile) -> bool:
    if not record.expires_at:
        return False
    return datetime.fromisoformat(record.expires_at.replace("Z", "+00:00")) <= datetime.now(timezone.utc)
