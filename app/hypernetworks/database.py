"""Hypernetwork files in `models/hypernetworks/` (recursive): listed by name, loaded on first use, cached by
path/size/mtime so a changed file is reloaded and an unchanged one never re-read."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from app.hypernetworks.files import SUFFIXES, read_hypernetwork_file
from app.hypernetworks.hypernetwork import Hypernetwork, HypernetworkFormatError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HypernetworkFile:
    name: str
    path: Path


class HypernetworkDatabase:
    def __init__(self, folder: Path):
        self.folder = folder
        self._lock = threading.RLock()
        self._loaded: dict[Path, tuple[int, int, Hypernetwork | str]] = {}

    def files(self) -> dict[str, HypernetworkFile]:
        """name -> file; the first file in path order wins a name (the other is ignored with a log line)."""
        found: dict[str, HypernetworkFile] = {}
        if not self.folder.is_dir():
            return found
        entries = []
        for root, dirs, names in os.walk(self.folder, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            entries += [Path(root) / n for n in names if n.lower().endswith(SUFFIXES) and not n.startswith(".")]
        for path in sorted(entries, key=lambda p: p.relative_to(self.folder).as_posix().lower()):
            if path.stem in found:
                log.warning(
                    "Hypernetwork %s ignored: %s already provides the name '%s'",
                    path,
                    found[path.stem].path.name,
                    path.stem,
                )
                continue
            found[path.stem] = HypernetworkFile(path.stem, path)
        return found

    def load(self, name: str) -> Hypernetwork:
        """The hypernetwork called `name`; raises KeyError if there is none, HypernetworkFormatError if broken."""
        entry = self.files().get(name)
        if entry is None:
            raise KeyError(name)
        return self.load_path(entry.path)

    def load_path(self, path: Path) -> Hypernetwork:
        with self._lock:
            stat = path.stat()
            cached = self._loaded.get(path)
            if cached and cached[:2] == (stat.st_size, stat.st_mtime_ns):
                value = cached[2]
            else:
                try:
                    value = read_hypernetwork_file(path)
                except HypernetworkFormatError as e:
                    value = str(e)
                self._loaded[path] = (stat.st_size, stat.st_mtime_ns, value)
            if isinstance(value, str):
                raise HypernetworkFormatError(f"Hypernetwork '{path.stem}' ({path.name}) cannot be used: {value}")
            return value

    def forget(self, path: Path) -> None:
        with self._lock:
            self._loaded.pop(path, None)
