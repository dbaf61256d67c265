"""The embedding database: scans the folder (cheaply, with hot reload), and finds embeddings in token streams.

Embeddings are matched by the token ids of their names as the model's tokenizer splits them (longest first), so
the tokenizer is never changed; a name that is also an ordinary word still works.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from app.embeddings.formats import SUFFIXES, EmbeddingData, EmbeddingFileError, read_embedding_file

log = logging.getLogger(__name__)


@dataclass
class Embedding:
    """A loaded embedding, usable with the current model."""

    name: str
    vectors: torch.Tensor  # [n, width], float32
    path: Path
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    _hash: str | None = None
    bundled_in: str | None = None  # the LoRA (as the prompt names it) whose file bundles this embedding

    @property
    def shape(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def count(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def shorthash(self) -> str:
        """First 12 hex characters of the file's sha256 (A1111's `TI hashes`); for an embedding bundled in a LoRA,
        the LoRA's name, as A1111 writes it."""
        if self.bundled_in is not None:
            return self.bundled_in
        if self._hash is None:
            self._hash = hashlib.sha256(self.path.read_bytes()).hexdigest()
        return self._hash[:12]


@dataclass
class Skipped:
    name: str
    path: Path
    reason: str
    step: int | None = None
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    shape: int | None = None
    vectors: int | None = None


_Signature = tuple[tuple[str, int, int], ...]


def _scan_files(folder: Path) -> list[tuple[Path, os.stat_result]]:
    """Candidate files under `folder`, recursively, sorted by relative path (the order names are claimed in)."""
    found = []
    if not folder.is_dir():
        return found
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in files:
            lower = name.lower()
            if name.startswith(".") or not lower.endswith(SUFFIXES) or lower.endswith(".preview.png"):
                continue
            path = Path(root) / name
            try:
                found.append((path, path.stat()))
            except OSError:
                continue
    found.sort(key=lambda item: item[0].relative_to(folder).as_posix().lower())
    return found


class EmbeddingDatabase:
    """Embeddings in one folder, filtered for the loaded model (by vector width)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._lock = threading.RLock()
        self._parsed: dict[Path, tuple[int, int, EmbeddingData | str]] = {}  # path -> (size, mtime_ns, data|err)
        self._signature: _Signature | None = None
        self.loaded: dict[str, Embedding] = {}
        self.skipped: dict[str, Skipped] = {}
        self._tokenize = None
        self._width: int | None = None
        self._by_first_token: dict[int, list[tuple[tuple[int, ...], Embedding]]] = {}
        self._bundled: list[Embedding] = []  # from the LoRA files of the generation that runs (`bundled`)

    # -- model binding ---------------------------------------------------------------------------------------------
    def set_model(self, tokenizer, width: int) -> None:
        """Re-filter for a newly loaded model: its tokenizer splits names, its width decides what fits."""
        with self._lock:
            cache: dict[str, tuple[int, ...]] = {}

            def tokenize(text: str) -> tuple[int, ...]:
                if text not in cache:
                    cache[text] = tuple(tokenizer(text, add_special_tokens=False, truncation=False)["input_ids"])
                return cache[text]

            self._tokenize = tokenize
            self._width = width
            self._signature = None
            self.refresh_if_changed()

    # -- scanning --------------------------------------------------------------------------------------------------
    def refresh_if_changed(self) -> bool:
        """Rescan when any file was added, removed or changed (a stat walk; nothing is read if nothing changed)."""
        with self._lock:
            files = _scan_files(self.folder)
            signature = tuple((str(p), s.st_size, s.st_mtime_ns) for p, s in files)
            if signature == self._signature:
                return False
            self._rebuild(files)
            self._signature = signature
            return True

    def refresh(self) -> None:
        """Force a rescan (files are still reused when their size and mtime are unchanged)."""
        with self._lock:
            self._signature = None
            self.refresh_if_changed()

    def _read(self, path: Path, stat: os.stat_result) -> EmbeddingData | str:
        cached = self._parsed.get(path)
        if cached and cached[0] == stat.st_size and cached[1] == stat.st_mtime_ns:
            return cached[2]
        try:
            data: EmbeddingData | str = read_embedding_file(path)
        except EmbeddingFileError as e:
            data = str(e)
        except Exception as e:  # an unexpected failure in one file must not stop the others
            log.exception("Unexpected error reading embedding %s", path)
            data = f"could not be read ({type(e).__name__}: {e})"
        self._parsed[path] = (stat.st_size, stat.st_mtime_ns, data)
        return data

    def _rebuild(self, files: list[tuple[Path, os.stat_result]]) -> None:
        loaded: dict[str, Embedding] = {}
        skipped: dict[str, Skipped] = {}
        live = {p for p, _ in files}
        self._parsed = {p: v for p, v in self._parsed.items() if p in live}
        for path, stat in files:
            data = self._read(path, stat)
            if isinstance(data, str):
                skipped[_unique(skipped, path.stem)] = Skipped(path.stem, path, data)
                continue
            reason = self._misfit(data)
            if reason is None and data.name in loaded:
                reason = f"another file, {loaded[data.name].path.name}, already provides the name '{data.name}'"
            if reason is not None:
                skipped[_unique(skipped, data.name)] = Skipped(
                    data.name,
                    path,
                    reason,
                    data.step,
                    data.sd_checkpoint,
                    data.sd_checkpoint_name,
                    data.width,
                    data.count,
                )
                continue
            loaded[data.name] = Embedding(
                data.name, data.side_by_side(), path, data.step, data.sd_checkpoint, data.sd_checkpoint_name
            )
        self.loaded, self.skipped = loaded, skipped
        self._index()
        if files:
            log.info("Embeddings: %d loaded, %d skipped", len(loaded), len(skipped))

    def _misfit(self, data: EmbeddingData) -> str | None:
        if self._width is not None and data.width != self._width:
            kind = "an SDXL embedding (clip_l + clip_g) whose" if data.vectors is None else "its"
            return (
                f"{kind} vectors are {data.width} wide but the loaded model needs {self._width}; "
                "it was made for another model family and becomes usable when such a model is loaded"
            )
        if self._width is None and data.vectors is None:
            return "an SDXL embedding (clip_l + clip_g); it needs an SDXL model"
        if self._tokenize is not None and not self._tokenize(data.name):
            return f"the name '{data.name}' has no characters the tokenizer can match in a prompt"
        return None

    def _index(self) -> None:
        index: dict[int, list[tuple[tuple[int, ...], Embedding]]] = {}
        if self._tokenize is not None:
            # the folder's files first: a bundled embedding never takes a name a file has
            bundled = [e for e in self._bundled if e.name not in self.loaded]
            for embedding in [*self.loaded.values(), *bundled]:
                ids = self._tokenize(embedding.name)
                if not ids:
                    continue
                index.setdefault(ids[0], []).append((ids, embedding))
            for candidates in index.values():
                candidates.sort(key=lambda item: len(item[0]), reverse=True)
        self._by_first_token = index

    @contextmanager
    def bundled(self, embeddings: list[Embedding]) -> Iterator[None]:
        """Embeddings bundled in the LoRA files a generation applies, found in its prompt while it runs (A1111 too
        registers them for the generations that name the LoRA only). A name the folder has keeps the file's."""
        if not embeddings:
            yield
            return
        with self._lock:
            self._bundled = list(embeddings)
            self._index()
        try:
            yield
        finally:
            with self._lock:
                self._bundled = []
                self._index()

    # -- lookup ----------------------------------------------------------------------------------------------------
    def find_embedding(self, tokens: Sequence[int], position: int) -> tuple[Embedding, int] | None:
        """The embedding whose name's token ids start at `position`, longest name first."""
        for ids, embedding in self._by_first_token.get(tokens[position], ()):
            if tuple(tokens[position : position + len(ids)]) == ids:
                return embedding, len(ids)
        return None

    def get(self, name: str) -> Embedding | None:
        return self.loaded.get(name)


def _unique(existing: dict, name: str) -> str:
    """A key for `existing` based on `name` (duplicates get ' (2)', ' (3)', ...)."""
    key, n = name, 2
    while key in existing:
        key, n = f"{name} ({n})", n + 1
    return key
