"""Which folders a request may name (training data, log directory, preprocess source and destination, output
folders). On this computer alone anything goes, as in A1111; once the server is reachable from other machines
(`--listen`, a non-loopback `--server-name`, or `--confine-paths` behind a proxy) a request could otherwise read
images from, and write files into, any folder the server's user can reach. Then only the data folder, the model
folders and folders the owner names with `--allow-path` are accepted."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from pathlib import Path

from app.errors import UserError
from app.settings import Settings


def is_loopback(host: str) -> bool:
    """True for hosts only this computer can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: assume other machines can reach it


class FolderPolicy:
    """Checks a folder named by a request; `confined=False` accepts every folder (the local default)."""

    def __init__(self, roots: Iterable[Path], confined: bool):
        self.roots = list(dict.fromkeys(Path(r).resolve() for r in roots))
        self.confined = confined

    @classmethod
    def from_settings(cls, settings: Settings) -> FolderPolicy:
        confined = settings.confine_paths or not is_loopback(settings.host)
        roots = [
            settings.data_dir,
            settings.models_dir,
            settings.ckpt_dir,
            settings.embeddings_dir,
            settings.hypernetwork_dir,
            settings.lora_dir,
            *settings.allow_path,
        ]
        return cls(roots, confined)

    def _inside(self, resolved: Path) -> bool:
        return not self.confined or any(resolved.is_relative_to(root) for root in self.roots)

    def allows(self, path: str | Path) -> bool:
        # resolve() follows symlinks and '..', so neither can lead out of an allowed folder.
        return self._inside(Path(path).resolve())

    def check(self, path: str | Path, what: str) -> Path:
        """The path, resolved, or a UserError that names the field and the folders it may be in."""
        try:
            resolved = Path(path).resolve()
        except (OSError, ValueError, RuntimeError) as e:  # a NUL byte, a symlink loop: no folder has that name
            raise UserError(f"{what} {str(path)!r} is not a usable folder path: {e}.") from None
        if not self._inside(resolved):
            allowed = ", ".join(str(r) for r in self.roots)
            raise UserError(
                f"{what} '{path}' is outside the folders this server may use ({allowed}). The server accepts "
                "requests from other machines (--listen, --server-name or --confine-paths), so folders named in a "
                "request must be inside its data folder; the owner can allow another one with --allow-path FOLDER."
            )
        return resolved
