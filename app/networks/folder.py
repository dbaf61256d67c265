"""A folder of extra-network files (hypernetworks, LoRAs), scanned on every look so files dropped in or removed
show up at once, each file parsed on first use and cached by path, size and mtime (a changed file is re-read, an
unchanged one never is). A file that cannot be parsed is remembered with its reason."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class NetworkFile:
    name: str  # the file name without its suffix: what a prompt tag uses
    path: Path


class NetworkFolder(Generic[T]):
    """Files under `folder` (recursively, hidden entries skipped) whose names end in `suffixes`."""

    def __init__(
        self,
        folder: Path,
        suffixes: tuple[str, ...],
        reader: Callable[[Path], T],
        error: type[Exception],
        noun: str,
    ):
        self.folder = folder
        self.suffixes = suffixes
        self._reader = reader
        self._error = error
        self.noun = noun
        self._lock = threading.RLock()
        self._loaded: dict[Path, tuple[int, int, T | str]] = {}

    def files(self) -> dict[str, NetworkFile]:
        """name -> file; the first file in path order wins a name (the other is ignored with a log line)."""
        found: dict[str, NetworkFile] = {}
        if not self.folder.is_dir():
            return found
        entries = []
        for root, dirs, names in os.walk(self.folder, followlinks=True):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            entries += [Path(root) / n for n in names if n.lower().endswith(self.suffixes) and not n.startswith(".")]
        for path in sorted(entries, key=lambda p: p.relative_to(self.folder).as_posix().lower()):
            if path.stem in found:
                log.warning(
                    "%s %s ignored: %s already provides the name '%s'",
                    self.noun.capitalize(),
                    path,
                    found[path.stem].path.name,
                    path.stem,
                )
                continue
            found[path.stem] = NetworkFile(path.stem, path)
        return found

    def load(self, name: str) -> T:
        """The file called `name`, parsed; raises KeyError if there is none, the folder's error type if broken."""
        entry = self.files().get(name)
        if entry is None:
            raise KeyError(name)
        return self.load_path(entry.path)

    def load_path(self, path: Path) -> T:
        with self._lock:
            stat = path.stat()
            cached = self._loaded.get(path)
            if cached and cached[:2] == (stat.st_size, stat.st_mtime_ns):
                value = cached[2]
            else:
                try:
                    value = self._reader(path)
                except self._error as e:
                    value = str(e)
                self._loaded[path] = (stat.st_size, stat.st_mtime_ns, value)
            if isinstance(value, str):
                raise self._error(f"{self.noun.capitalize()} '{path.stem}' ({path.name}) cannot be used: {value}")
            return value

    def forget(self, path: Path) -> None:
        with self._lock:
            self._loaded.pop(path, None)
