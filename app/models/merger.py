"""A1111's Checkpoint Merger: two or three checkpoints combined key by key into a new single-file checkpoint.

- Weighted sum: (1 - M) A + M B; Add difference: A + M (B - C), which moves a fine-tune's change (B - C, e.g. a
  DreamBooth model minus its base) onto another model A; No interpolation: A alone, to convert it (fp16), bake in
  a VAE or drop weights.
- As A1111: only keys with `model` in their name are combined (UNet, text encoders, VAE), A's other keys are kept,
  a key B lacks is A's, a key C lacks adds nothing; the name is A1111's (`0.7(a) + 0.3(b)`) unless one is given;
  the metadata carries A1111's `sd_merge_recipe` and `sd_merge_models` (with the inputs' own metadata when asked),
  and weights whose names match a regular expression can be discarded.
- Unlike A1111: the inputs are read one tensor at a time from their files and the result is written as it is made
  (`streamed_safetensors`), so memory holds a few tensors, not three state dicts and a result (measured:
  benchmarks/checkpoint_merge.py); models of two families (SD 1.x and SDXL, or an inpainting model) and layers of
  different shapes are refused before anything is written, instead of failing midway or writing a broken file;
  an existing file is never replaced; only `.safetensors` is written (never a pickle).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from app.errors import NotFoundError, UserError
from app.fileio import size_text, write_errors
from app.lora.writer import SAVE_DTYPES
from app.models import ldm_export
from app.models.checkpoints import CheckpointInfo
from app.models.hashes import old_hash
from app.models.manager import ModelManager, preflight, read_pipeline
from app.models.single_file import CONFIG_DIR, UNET, detect, family_of, read_state_dict
from app.models.streamed_safetensors import Entry, StreamedReader, write_streamed
from app.models.vae import load_vae
from app.naming import clean_name

NO_INTERPOLATION, WEIGHTED_SUM, ADD_DIFFERENCE = "No interpolation", "Weighted sum", "Add difference"
INTERP_METHODS = (NO_INTERPOLATION, WEIGHTED_SUM, ADD_DIFFERENCE)
# A1111's `checkpoint_dict_skip_on_merge`: an index table, not a weight
SKIP_ON_MERGE = frozenset({"cond_stage_model.transformer.text_model.embeddings.position_ids"})
VAE_PREFIX = "first_stage_model."


@dataclass
class MergerOptions:
    """The Checkpoint Merger tab's fields (A1111's `run_modelmerger` arguments; checkpoints by title or name)."""

    primary: str
    secondary: str = ""
    tertiary: str = ""
    interp_method: str = WEIGHTED_SUM
    multiplier: float = 0.3
    save_precision: str = "fp16"  # of the floating-point tensors; A1111's "Save as float16" when fp16
    custom_name: str = ""
    bake_in_vae: str = "None"  # a file of models/VAE, or "None"
    discard_weights: str = ""  # a regular expression: matching weights are left out of the file
    save_metadata: bool = True
    add_merge_recipe: bool = True
    copy_metadata_fields: bool = True  # the inputs' own safetensors metadata, under the merge's
    metadata_json: str = ""  # more metadata, a JSON object

    def check(self) -> None:
        """Refuse bad values with the field's name, before anything is read."""
        if self.interp_method not in INTERP_METHODS:
            raise UserError(
                f"Unknown interpolation method '{self.interp_method}'; use one of {', '.join(INTERP_METHODS)}.",
                "interp_method",
            )
        if not (isinstance(self.multiplier, int | float) and math.isfinite(self.multiplier)):
            raise UserError(f"Multiplier must be a number from 0 to 1, got {self.multiplier}.", "multiplier")
        if not 0 <= self.multiplier <= 1:
            raise UserError(f"Multiplier must be from 0 to 1, got {self.multiplier}.", "multiplier")
        if self.save_precision not in SAVE_DTYPES:
            raise UserError(
                f"Unknown save precision '{self.save_precision}'; use one of {', '.join(SAVE_DTYPES)}.",
                "save_precision",
            )
        self.discard_pattern()
        self.extra_metadata()
        if not self.primary.strip():
            raise UserError("Pick the primary model (A).", "primary")
        if self.interp_method != NO_INTERPOLATION and not self.secondary.strip():
            raise UserError(f"{self.interp_method} needs a secondary model (B).", "secondary")
        if self.interp_method == ADD_DIFFERENCE and not self.tertiary.strip():
            raise UserError("Add difference needs a tertiary model (C): A + M (B - C).", "tertiary")

    def discard_pattern(self) -> re.Pattern | None:
        if not self.discard_weights:
            return None
        try:
            return re.compile(self.discard_weights)
        except re.error as e:
            raise UserError(
                f"'Discard weights' is not a regular expression Python reads: {e}.", "discard_weights"
            ) from None

    def extra_metadata(self) -> dict[str, str]:
        if not self.save_metadata or not self.metadata_json.strip():
            return {}
        try:
            data = json.loads(self.metadata_json)
        except json.JSONDecodeError as e:
            raise UserError(f"The metadata is not valid JSON: {e}.", "metadata_json") from None
        if not isinstance(data, dict):
            raise UserError('The metadata must be a JSON object ({"key": "value", ...}).', "metadata_json")
        # safetensors metadata holds strings only; other values are stored as their JSON
        return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in data.items()}

    def file_stem(self, a: CheckpointInfo, b: CheckpointInfo | None, c: CheckpointInfo | None) -> str:
        """A1111's name for the result (`0.7(a) + 0.3(b)`, `a + 0.3(b - c)`, `a`), or the custom name."""
        if self.custom_name.strip():
            return self.custom_name.strip()

        def name(info: CheckpointInfo) -> str:
            return clean_name(Path(info.model_name).name)

        m = round(self.multiplier, 2)
        if self.interp_method == WEIGHTED_SUM and b is not None:
            return f"{round(1 - self.multiplier, 2)}({name(a)}) + {m}({name(b)})"
        if self.interp_method == ADD_DIFFERENCE and b is not None and c is not None:
            return f"{name(a)} + {m}({name(b)} - {name(c)})"
        return name(a)


@dataclass(frozen=True)
class MergerReport:
    merged: int  # tensors combined from the models
    kept: int  # tensors taken from A as they are
    discarded: int
    baked_vae: int  # VAE tensors replaced by the chosen VAE's
    size_bytes: int

    def sentence(self) -> str:
        parts = [f"{self.merged} tensors merged", f"{self.kept} kept from A"]
        if self.discarded:
            parts.append(f"{self.discarded} discarded")
        if self.baked_vae:
            parts.append(f"{self.baked_vae} VAE tensors baked in")
        return ", ".join(parts) + f"; {size_text(self.size_bytes)}"


class Source:
    """One checkpoint's tensors in the original (LDM) layout: a `.safetensors` file is read one tensor at a time
    (`StreamedReader`); a `.ckpt` (weights only) or a diffusers folder is read whole (the folder converted)."""

    def __init__(self, info: CheckpointInfo, read_folder: Callable[[CheckpointInfo], object]):
        self.info = info
        self.metadata: dict[str, str] = {}
        self._file = None
        self._tensors: dict[str, torch.Tensor] = {}
        self.vae_config: dict | None = None
        if not info.path.exists():
            raise UserError(f"Checkpoint {info.path} no longer exists; refresh the list.")
        if info.kind != "single_file":
            pipe = read_folder(info)
            self.vae_config = dict(pipe.vae.config)
            self._tensors = ldm_export.export(pipe)
            self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}
            self.dtypes = {k: v.dtype for k, v in self._tensors.items()}
        elif info.path.suffix.lower() == ".safetensors":
            try:
                self._file = StreamedReader(info.path)
            except (OSError, ValueError) as e:
                raise UserError(
                    f"Checkpoint {info.path.name} is not a readable safetensors file ({e}); it may be truncated."
                ) from None
            self.metadata = self._file.metadata
            self.shapes = {k: entry.shape for k, (entry, _) in self._file.entries.items()}
            self.dtypes = {k: entry.dtype for k, (entry, _) in self._file.entries.items()}
        else:
            self._tensors = read_state_dict(info.path)
            self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}
            self.dtypes = {k: v.dtype for k, v in self._tensors.items()}
        if not any(k.startswith(UNET) for k in self.shapes):
            raise UserError(f"'{info.name}' has no Stable Diffusion UNet weights ({UNET}...); it is not a checkpoint.")
        family = family_of(self.shapes)
        if family is None:
            raise UserError(f"'{info.name}' has no text encoder weights of SD 1.x, 2.x or XL; it cannot be merged.")
        self.family, self.label = family

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def get(self, key: str) -> torch.Tensor:
        if self._file is None:
            return self._tensors[key]
        try:
            return self._file.get(key)
        except (OSError, ValueError) as e:
            raise UserError(f"Checkpoint {self.info.path.name} could not be read ({e}).") from None

    def vae_like(self) -> AutoencoderKL:
        """An empty VAE of this model's shape, for reading a VAE file into."""
        config = self.vae_config
        if config is None:  # a single file: the shipped config of its architecture
            architecture = detect(self.shapes, self.info.name)
            config = json.loads((CONFIG_DIR / architecture.name / "vae" / "config.json").read_text())
        return AutoencoderKL.from_config(config)


def vae_tensors(path: Path, model: Source) -> dict[str, torch.Tensor]:
    """A VAE file (any layout `load_vae` reads) as the checkpoint's `first_stage_model.` tensors."""
    vae = load_vae(path, model.vae_like(), torch.float32, torch.device("cpu"))
    return ldm_export.vae_to_ldm(vae.state_dict(), len(vae.config.block_out_channels))


def _merged_keys(options: MergerOptions, a: Source, b: Source | None, c: Source | None) -> set[str]:
    """A1111's rule: keys with `model` in their name that B has too (index tables aside); refused where the
    models' shapes differ, with the layer named."""
    if options.interp_method == NO_INTERPOLATION or b is None:
        return set()
    keys = {k for k in a.shapes if "model" in k and k in b and k not in SKIP_ON_MERGE}
    for other in (b, c):
        if other is None:
            continue
        for key in sorted(keys):
            if key in other and other.shapes[key] != a.shapes[key]:
                raise UserError(
                    f"{key} is {list(a.shapes[key])} in A ({a.info.name}) but {list(other.shapes[key])} in "
                    f"{other.info.name}: these models cannot be merged layer by layer."
                )
    return keys


def merge_checkpoints(
    options: MergerOptions,
    a: Source,
    b: Source | None,
    c: Source | None,
    dst: Path,
    metadata: dict[str, str],
    vae: dict[str, torch.Tensor] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> MergerReport:
    """Write the merge of `a`, `b`, `c` as `options` say to `dst` (atomically, tensor by tensor); `progress(done,
    total)` after each tensor may raise to stop, leaving no file."""
    for other in (b, c):
        if other is not None and other.family != a.family:
            raise UserError(
                f"A ({a.info.name}) is {a.label} and {other.info.name} is {other.label}: only models of one family "
                "can be merged."
            )
        unet = {k for k in a.shapes if k.startswith(UNET)}
        if other is not None and unet != {k for k in other.shapes if k.startswith(UNET)}:
            raise UserError(
                f"A ({a.info.name}) and {other.info.name} have UNets of different layouts (other layers or "
                "depths): only models of one architecture can be merged."
            )
    merged_keys = _merged_keys(options, a, b, c)
    pattern = options.discard_pattern()
    vae = vae or {}
    for key, tensor in vae.items():
        if key in a and a.shapes[key] != tuple(tensor.shape):
            raise UserError(f"The VAE's {key} is {list(tensor.shape)} but the model's {list(a.shapes[key])}.")
    save_dtype = SAVE_DTYPES[options.save_precision]
    entries, discarded = [], 0
    for key, shape in a.shapes.items():
        if pattern is not None and pattern.search(key):
            discarded += 1
            continue
        dtype = a.dtypes[key]
        entries.append(Entry(key, save_dtype if dtype.is_floating_point else dtype, shape))
    m = float(options.multiplier)
    names = [entry.name for entry in entries]
    position = {name: i for i, name in enumerate(names, 1)}

    def inputs(key: str) -> list[torch.Tensor]:
        """The stored tensors `key` is made of, as read (A's, B's, C's; or the VAE's)."""
        if key in vae:
            return [vae[key]]
        if key not in merged_keys:
            return [a.get(key)]
        if options.interp_method == ADD_DIFFERENCE and key in c:
            return [a.get(key), b.get(key), c.get(key)]
        return [a.get(key), b.get(key)]

    # a reader thread fetches the next tensor's inputs while this one computes and the writer writes: reading,
    # arithmetic and writing overlap (each releases the GIL), one tensor's inputs ahead
    with ThreadPoolExecutor(max_workers=1) as reader:
        ahead: dict[str, Future] = {}

        def produce(entry: Entry) -> torch.Tensor:
            key = entry.name
            parts = (ahead.pop(key, None) or reader.submit(inputs, key)).result()
            if position[key] < len(names):
                following = names[position[key]]
                ahead[following] = reader.submit(inputs, following)
            tensor = parts[0]
            if key in merged_keys and key not in vae:
                # in fp32, in place: B and C join A's fp32 copy in their stored precision (no copies of their own)
                tensor = tensor.float()
                if options.interp_method == WEIGHTED_SUM:  # (1 - M) A + M B
                    tensor.mul_(1 - m).add_(parts[1], alpha=m)
                elif len(parts) == 3:  # A + M (B - C); where C lacks the key, B's difference is zero (A1111's rule)
                    tensor.add_(parts[1].float().sub_(parts[2]), alpha=m)
            if progress is not None:
                progress(position[key], len(entries))
            return tensor.to(entry.dtype)

        write_streamed(dst, entries, produce, metadata if options.save_metadata else None)
    written = {e.name for e in entries}
    return MergerReport(
        merged=len(merged_keys & written - set(vae)),
        kept=len(written - merged_keys - set(vae)),
        discarded=discarded,
        baked_vae=len(set(vae) & written),
        size_bytes=dst.stat().st_size,
    )


def merger_metadata(
    options: MergerOptions, sources: list[tuple[Source, str | None]], is_vae_baked: bool
) -> dict[str, str]:
    """A1111's metadata of a merge: the inputs' own (when asked), the user's JSON, `format`, and with the recipe
    `sd_merge_recipe` and `sd_merge_models` ({sha256: name, legacy hash, its own recipe}). `sources`: (source,
    its sha256) of A, B, C as used."""
    if not options.save_metadata:
        return {}
    metadata: dict[str, str] = {}
    if options.copy_metadata_fields:
        for source, _ in sources:
            metadata.update(source.metadata)
    metadata.update(options.extra_metadata())
    metadata["format"] = "pt"
    if options.add_merge_recipe:
        hashes = [sha for _, sha in sources] + [None] * (3 - len(sources))
        recipe = {
            "type": "webui",
            "primary_model_hash": hashes[0],
            "secondary_model_hash": hashes[1],
            "tertiary_model_hash": hashes[2],
            "interp_method": options.interp_method,
            "multiplier": options.multiplier,
            "save_as_half": options.save_precision == "fp16",
            "custom_name": options.custom_name,
            "config_source": 0,
            "bake_in_vae": options.bake_in_vae if is_vae_baked else "None",
            "discard_weights": options.discard_weights,
            "is_inpainting": False,
            "is_instruct_pix2pix": False,
        }
        models: dict[str, object] = {}
        for source, sha in sources:
            legacy = old_hash(source.info.path) if source.info.kind == "single_file" else None
            try:
                inner = json.loads(source.metadata.get("sd_merge_models", "{}"))
            except json.JSONDecodeError:
                inner = {}
            models[sha or source.info.name] = {
                "name": source.info.name,
                "legacy_hash": legacy,
                "sd_merge_recipe": _json_or_none(source.metadata.get("sd_merge_recipe")),
            }
            if isinstance(inner, dict):
                models.update(inner)
        metadata["sd_merge_recipe"] = json.dumps(recipe)
        metadata["sd_merge_models"] = json.dumps(models)
    return metadata


def _json_or_none(text: str | None) -> object:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


class CheckpointMerger:
    """The Checkpoint Merger tab's work on the checkpoint folder: finds the models, reads them, writes the result
    next to them and refreshes the list. It never touches the loaded model."""

    def __init__(self, models: ModelManager):
        self.models = models

    def _find(self, query: str, role: str, field: str) -> CheckpointInfo:
        try:
            return self.models.find(query)
        except NotFoundError:
            raise UserError(f"The {role} model '{query}' is not in the checkpoint list; refresh it.", field) from None

    def merge(
        self, options: MergerOptions, progress: Callable[[int, int], None] | None = None
    ) -> tuple[Path, MergerReport]:
        """Merge as `options` say into a new checkpoint (never over a file); returns its path and a report."""
        options.check()
        self.models.refresh()
        method = options.interp_method
        a = self._find(options.primary, "primary", "primary")
        b = self._find(options.secondary, "secondary", "secondary") if method != NO_INTERPOLATION else None
        c = self._find(options.tertiary, "tertiary", "tertiary") if method == ADD_DIFFERENCE else None
        if options.custom_name.strip() and clean_name(options.custom_name) != options.custom_name.strip():
            raise UserError(
                f"'{options.custom_name}' is not a usable file name: use letters, digits, '.', '_', '-' and spaces.",
                "custom_name",
            )
        dst = self.models.new_checkpoint_path(options.file_stem(a, b, c))
        vae_path = None
        if options.bake_in_vae not in ("", "None"):
            files = self.models.vae_files()
            vae_path = files.get(options.bake_in_vae)
            if vae_path is None:
                names = ", ".join(["None", *files])
                raise UserError(f"No VAE '{options.bake_in_vae}' in models/VAE; choose one of: {names}.", "bake_in_vae")

        def read_folder(info: CheckpointInfo):
            preflight(info)
            return read_pipeline(info, torch.float16 if info.stores_half() else torch.float32)

        sources = [Source(info, read_folder) for info in (a, b, c) if info is not None]
        vae = vae_tensors(vae_path, sources[0]) if vae_path is not None else None
        hashed = [(source, self.models.sha256(source.info)) for source in sources]
        metadata = merger_metadata(options, hashed, vae is not None)
        first, second, third = [*sources, None, None][:3]
        with write_errors("the merged checkpoint", dst.parent):
            report = merge_checkpoints(options, first, second, third, dst, metadata, vae, progress)
        self.models.refresh()
        return dst, report
