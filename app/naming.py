"""Names of files the user creates (embeddings, hypernetworks): A1111's character filter and the checks that keep
a new file from silently replacing or shadowing another."""

from __future__ import annotations

from pathlib import Path

from app.errors import UserError


def clean_name(name: str) -> str:
    """A1111's filter: letters, digits and `._- ` only."""
    return "".join(c for c in (name or "") if c.isalnum() or c in "._- ").strip()


def check_new_file(kind: str, name: str, path: Path, same_name: Path | None, overwrite: bool, tick: str) -> None:
    """Refuse when another file already provides `name`, or `path` exists and overwriting was not asked for."""
    if same_name is not None and same_name.resolve() != path.resolve():
        raise UserError(f"A {kind} named '{name}' already exists in {same_name}; remove it or pick another name.")
    if path.exists() and not overwrite:
        raise UserError(f"{kind.capitalize()} '{name}' already exists ({path}); tick '{tick}' to replace it.")
