"""Cross-process locks that keep a study's trial count exact with many workers.

`TrialGate` serialises "is the budget spent? if not, start a trial" so N workers never
start more trials than asked for. `RunLock` tells a run whether it is the only one on a
file storage, in which case any trial still marked running was left by a dead process.
"""

from __future__ import annotations

import fcntl
import hashlib
import tempfile
import zlib
from pathlib import Path
from typing import IO

import sqlalchemy


def storage_file(url: str) -> Path | None:
    for scheme in ("sqlite:///", "journal:///"):
        if url.startswith(scheme):
            return Path(url[len(scheme):])
    return None


def _lock_path(url: str, study_name: str, kind: str) -> Path:
    path = storage_file(url)
    if path is not None:
        return path.with_name(f"{path.name}.{study_name}.{kind}.lock")
    key = hashlib.sha256(f"{url}|{study_name}".encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"bench-{key}.{kind}.lock"


class _FileLock:
    def __init__(self, path: Path):
        self.path = path
        self.handle: IO[str] | None = None

    def acquire(self, blocking: bool = True) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a")  # noqa: SIM115 - held until release()
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.close()
            return False
        self.handle = handle
        return True

    def release(self) -> None:
        if self.handle is not None:
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


class _PostgresAdvisoryLock:
    """A session-level advisory lock: serialises workers on every machine sharing the server."""

    def __init__(self, url: str, study_name: str):
        self.engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        self.key = zlib.crc32(f"bench:{study_name}".encode())
        self.conn: sqlalchemy.Connection | None = None

    def acquire(self, blocking: bool = True) -> bool:
        self.conn = self.engine.connect()
        self.conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": self.key})
        return True

    def release(self) -> None:
        if self.conn is not None:
            self.conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": self.key})
            self.conn.close()
            self.conn = None


class TrialGate:
    """Held from the budget check until the new trial exists in storage; re-entrant release."""

    def __init__(self, url: str, study_name: str):
        self._lock = (_PostgresAdvisoryLock(url, study_name) if url.startswith("postgresql")
                      else _FileLock(_lock_path(url, study_name, "gate")))
        self.held = False

    def acquire(self) -> None:
        self._lock.acquire()
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self._lock.release()

    def __enter__(self) -> TrialGate:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class RunLock:
    """Exclusive per study on a file storage while a `bench.run` (and its workers) runs."""

    def __init__(self, url: str, study_name: str):
        self._lock = _FileLock(_lock_path(url, study_name, "run")) if storage_file(url) is not None else None

    def try_acquire(self) -> bool:
        return self._lock is not None and self._lock.acquire(blocking=False)

    def release(self) -> None:
        if self._lock is not None:
            self._lock.release()
