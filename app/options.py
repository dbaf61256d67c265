"""User options (A1111's names), kept in `config.json`; unknown keys are kept and returned, as A1111 does."""

from __future__ import annotations

import copy
import json
import logging
import threading
from pathlib import Path
from typing import Any

from app.fileio import atomic_write_text

log = logging.getLogger(__name__)

DEFAULTS: dict[str, Any] = {
    "sd_model_checkpoint": None,
    "sd_checkpoint_hash": None,
    "sd_vae": "Automatic",
    "CLIP_stop_at_last_layers": 1,
    "comma_padding_backtrack": 20,
    "samples_save": True,
    "samples_format": "png",
    "outdir_samples": "",
    "outdir_txt2img_samples": "outputs/txt2img-images",
    "save_images_add_number": True,
    "send_seed": True,
    "send_size": True,
    "live_previews_enable": True,
    "show_progress_every_n_steps": 1,
    "enable_pnginfo": True,
    "extra_networks_default_multiplier": 1.0,  # the weight a click on a LoRA or hypernetwork card writes
}


class Options:
    """Thread-safe option store; `validators` may refuse a value with a UserError before it is kept."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._data = copy.deepcopy(DEFAULTS)
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(stored, dict):
                self._data.update(stored)
        except FileNotFoundError:
            pass
        except ValueError as e:
            log.warning("Ignoring unreadable options file %s: %s", path, e)

    def get(self, key: str, default: Any = None) -> Any:
        with self._lock:
            return self._data.get(key, DEFAULTS.get(key, default))

    def __getitem__(self, key: str) -> Any:
        return self.get(key)

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return copy.deepcopy(self._data)

    def update(self, values: dict[str, Any]) -> None:
        with self._lock:
            self._data.update(values)
            atomic_write_text(self.path, json.dumps(self._data, indent=2, ensure_ascii=False))
