"""Hypernetwork files in `models/hypernetworks/` (recursive): a NetworkFolder of A1111 `.pt`/`.safetensors` files."""

from __future__ import annotations

from pathlib import Path

from app.hypernetworks.files import SUFFIXES, read_hypernetwork_file
from app.hypernetworks.hypernetwork import Hypernetwork, HypernetworkFormatError
from app.networks.folder import NetworkFolder


class HypernetworkDatabase(NetworkFolder[Hypernetwork]):
    def __init__(self, folder: Path):
        super().__init__(folder, SUFFIXES, read_hypernetwork_file, HypernetworkFormatError, "hypernetwork")
