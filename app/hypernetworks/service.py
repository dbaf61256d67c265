"""Hypernetwork operations for the UI, the API and txt2img: list, create, and resolve `<hypernet:...>` tags."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

from app.errors import UserError
from app.hypernetworks.attention import HypernetworkStack, attention_widths
from app.hypernetworks.database import HypernetworkDatabase
from app.hypernetworks.files import save_hypernetwork
from app.hypernetworks.hypernetwork import Hypernetwork, HypernetworkFormatError
from app.models.manager import ModelManager
from app.naming import check_new_file, clean_name
from app.networks.activation import Activation
from app.prompts.extra_networks import ExtraNetworkTag

STANDARD_WIDTHS = [768, 320, 640, 1024, 1280]
MAX_WIDTH = 4096  # SDXL's widest context is 2048; twice that leaves room without letting a typo allocate gigabytes
MAX_PARAMETERS = 500_000_000  # 2 GB of fp32: far above any real hypernetwork (SD1.5 1-2-1: about 22 M)


def check_size(sizes: list[int], structure: list[float]) -> None:
    """Refuse widths outside 1..MAX_WIDTH, and structures whose modules would not fit in memory, before any
    tensor is allocated."""
    bad = [w for w in sizes if not 1 <= w <= MAX_WIDTH]
    if bad:
        raise UserError(
            f"Module widths must be between 1 and {MAX_WIDTH} (e.g. 768, 320, 640, 1280); got {bad}.", "enable_sizes"
        )
    if not all(math.isfinite(x) for x in structure):  # zero/negative entries get their own message later
        raise UserError(f"Layer structure {structure} must hold finite numbers, e.g. 1, 2, 1.", "layer_structure")
    total = sum(2 * (int(w * a) * int(w * b) + int(w * b)) for w in sizes for a, b in itertools.pairwise(structure))
    if total > MAX_PARAMETERS:
        raise UserError(
            f"Layer structure {structure} with widths {sizes} would have {total:,} parameters; the limit is "
            f"{MAX_PARAMETERS:,}. Use smaller multipliers (A1111's default is 1, 2, 1).",
            "layer_structure",
        )


def parse_numbers(text: str | list, what: str) -> list[float]:
    """`"1, 2, 1"` (or a list) -> [1.0, 2.0, 1.0], with a message that quotes the bad part."""
    items = text if isinstance(text, list) else [t for t in str(text).replace(" ", "").split(",") if t]
    try:
        return [float(x) for x in items]
    except (TypeError, ValueError):
        raise UserError(f"{what} '{text}' is invalid: expected numbers separated by commas, e.g. 1, 2, 1.") from None


class HypernetworkService:
    """Hypernetwork files, and the `hypernet` kind of extra network for generation (activate)."""

    tag = "hypernet"
    aliases: tuple[str, ...] = ()

    def __init__(self, db: HypernetworkDatabase, models: ModelManager, stack: HypernetworkStack | None = None):
        self.db = db
        self.models = models
        self.stack = stack or HypernetworkStack()

    def activate(self, model, tags: list[ExtraNetworkTag]) -> Activation:
        """The `<hypernet:name:multiplier>` tags of one generation, as the stack's networks for its duration."""
        if not tags:
            return Activation()
        networks, notes = self.resolve(tags, attention_widths(model.pipe.unet))
        return Activation(self.stack.using(networks), notes)

    def names(self) -> list[str]:
        return sorted(self.db.files(), key=str.lower)

    def listing(self) -> list[dict[str, str]]:
        """`GET /sdapi/v1/hypernetworks`: A1111's `[{name, path}]`."""
        return [
            {"name": f.name, "path": str(f.path)}
            for f in sorted(self.db.files().values(), key=lambda f: f.name.lower())
        ]

    def details(self) -> list[dict[str, Any]]:
        """Every file with its widths and whether it fits the loaded model (the UI's list; not an A1111 route)."""
        widths = attention_widths(self.models.get().pipe.unet)
        rows = []
        for f in self.db.files().values():
            row: dict[str, Any] = {"name": f.name, "path": str(f.path)}
            try:
                hn = self.db.load_path(f.path)
                row.update(widths=hn.widths, step=hn.step, usable=bool(set(hn.widths) & widths))
                if not row["usable"]:
                    row["reason"] = (
                        f"its modules are for widths {hn.widths}; the loaded model's attention layers "
                        f"use {sorted(widths)}"
                    )
            except HypernetworkFormatError as e:
                row.update(usable=False, reason=str(e))
            rows.append(row)
        return sorted(rows, key=lambda r: r["name"].lower())

    def resolve(self, tags: list[ExtraNetworkTag], model_widths: set[int]) -> tuple[list, list[str]]:
        """The hypernetworks a prompt's tags ask for, and a note for each tag that could not be used."""
        networks: list[tuple[Hypernetwork, float]] = []
        notes: list[str] = []
        for tag in tags:
            name = tag.args[0].strip()
            try:
                multiplier = float(tag.args[1]) if len(tag.args) > 1 and tag.args[1].strip() else 1.0
            except ValueError:
                notes.append(f"{tag.text}: multiplier '{tag.args[1]}' is not a number; hypernetwork not applied")
                continue
            try:
                hn = self.db.load(name)
            except KeyError:
                notes.append(f"{tag.text}: hypernetwork '{name}' not found in {self.db.folder}; generated without it")
                continue
            except HypernetworkFormatError as e:
                notes.append(f"{tag.text}: {e}; generated without it")
                continue
            if not set(hn.widths) & model_widths:
                notes.append(
                    f"{tag.text}: '{name}' has modules for widths {hn.widths}, none of which the loaded "
                    f"model uses ({sorted(model_widths)}); generated without it"
                )
                continue
            networks.append((hn.to(self.models.device), multiplier))
        return networks, notes

    def create(
        self,
        name: str,
        enable_sizes: list[int],
        layer_structure: str | list = "1, 2, 1",
        activation_func: str | None = "linear",
        weight_init: str = "Normal",
        add_layer_norm: bool = False,
        use_dropout: bool = False,
        dropout_structure: str | list | None = None,
        overwrite: bool = False,
        last_layer_dropout: bool = False,
    ) -> tuple[Path, list[str]]:
        """Write `models/hypernetworks/<name>.pt` (A1111 layout, step 0); returns the path and warnings."""
        cleaned = clean_name(name)
        if not cleaned:
            raise UserError(
                f"Hypernetwork name '{name}' has no usable characters: use letters, digits, '.', '_', '-'.", "name"
            )
        try:
            sizes = sorted({int(s) for s in enable_sizes or []})
        except (TypeError, ValueError):
            raise UserError(
                f"Modules must be widths such as 768, 320, 640, 1024, 1280; got {enable_sizes}.", "enable_sizes"
            ) from None
        if not sizes:
            raise UserError("Choose at least one module width (e.g. 768, 320, 640, 1280).", "enable_sizes")
        structure = parse_numbers(layer_structure, "Layer structure")
        check_size(sizes, structure)
        dropout = parse_numbers(dropout_structure, "Dropout structure") if use_dropout and dropout_structure else None
        path = self.db.folder / f"{cleaned}.pt"
        existing = self.db.files().get(cleaned)
        check_new_file(
            "hypernetwork", cleaned, path, existing.path if existing else None, overwrite, "Overwrite Old Hypernetwork"
        )
        hn = Hypernetwork.create(
            cleaned,
            sizes,
            structure,
            activation_func,
            weight_init,
            add_layer_norm,
            use_dropout,
            dropout,
            last_layer_dropout,
        )
        model_widths = attention_widths(self.models.get().pipe.unet)
        warnings = [
            f"Width {w} is not used by the loaded model (its widths: {sorted(model_widths)}); that module "
            "will be saved but not applied or trained with this model."
            for w in sizes
            if w not in model_widths
        ]
        save_hypernetwork(hn, path)
        self.db.forget(path)
        return path, warnings
