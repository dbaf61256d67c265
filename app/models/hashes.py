"""A1111 model hashes (sha256 short hash and the pre-2023 "old" hash), cached by path, size and mtime."""

from __future__ import annotations

import hashlib
import json
import threading
from pathlib import Path

from app.fileio import atomic_write_text

_CHUNK = 1 << 20


def sha256_of(paths: list[Path]) -> str:
    """sha256 over the bytes of `paths` in order (one file for single-file checkpoints)."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            while block := f.read(_CHUNK):
                digest.update(block)
    return digest.hexdigest()


def old_hash(path: Path) -> str:
    """A1111's legacy hash: sha256 of 64 KiB read at offset 1 MiB, first 8 hex characters."""
    with open(path, "rb") as f:
        f.seek(0x100000)
        return hashlib.sha256(f.read(0x10000)).hexdigest()[:8]


def short_hash(sha256: str) -> str:
    return sha256[:10]


class HashCache:
    """Full-file sha256 per path, remembered in a JSON file so restarts do not re-hash gigabytes."""

    def __init__(self, cache_file: Path):
        self.cache_file = cache_file
        self._lock = threading.Lock()
        try:
            self._data = json.loads(cache_file.read_text(encoding="utf-8")).get("hashes", {})
        except (OSError, ValueError, AttributeError):
            self._data = {}

    @staticmethod
    def _stamp(paths: list[Path]) -> tuple[int, float]:
        stats = [p.stat() for p in paths]
        return sum(s.st_size for s in stats), max(s.st_mtime for s in stats)

    def cached(self, key: str, paths: list[Path]) -> str | None:
        """The cached sha256 for `key` if the files have not changed since, else None."""
        entry = self._data.get(key)
        if not entry:
            return None
        size, mtime = self._stamp(paths)
        if entry.get("size") == size and entry.get("mtime") == mtime:
            return entry.get("sha256")
        return None

    def sha256(self, key: str, paths: list[Path]) -> str:
        """sha256 of `paths`, from the cache when the files' size and mtime are unchanged."""
        found = self.cached(key, paths)
        if found:
            return found
        size, mtime = self._stamp(paths)
        value = sha256_of(paths)
        with self._lock:
            self._data[key] = {"sha256": value, "size": size, "mtime": mtime}
            atomic_write_text(self.cache_file, json.dumps({"hashes": self._data}, indent=1))
        return value
