"""LoRA files for the UI, the API and txt2img: list them (with the reason a file cannot be used), and turn
`<lora:name:multiplier>` tags into LoRA layers for one generation."""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.embeddings.database import Embedding, EmbeddingDatabase
from app.errors import NotFoundError, UserError
from app.fileio import write_errors
from app.lora.apply import Application, StepRange, StepSwitch, lora_applied
from app.lora.block_weights import block_of, block_weights, read_presets
from app.lora.files import (
    SUFFIXES,
    LoraFile,
    LoraFormatError,
    bind,
    bundled_embeddings,
    lora_hash,
    read_lora_file,
    read_lora_header,
)
from app.lora.names import Target, layer_table, model_components
from app.lora.resize import ResizeReport, resize_lora
from app.models.manager import LoadedModel, ModelManager
from app.naming import clean_name
from app.networks.activation import Activation, parse_multipliers
from app.networks.folder import NetworkFile, NetworkFolder
from app.networks.user_metadata import (
    UserMetadata,
    find_preview,
    read_user_metadata,
    save_preview,
    write_user_metadata,
)
from app.prompts.extra_networks import ExtraNetworkTag

KEEP_WEIGHTS = 8  # LoRAs whose weights stay in memory between generations (the most recently used)


class LoraDatabase(NetworkFolder[LoraFile]):
    """The folder, with each file's header (metadata, layer names and shapes: no weights) cached for listing; the
    weights are read on use and only the last few used files keep them in memory."""

    def __init__(self, folder: Path):
        super().__init__(folder, SUFFIXES, read_lora_header, LoraFormatError, "LoRA")
        self._weights: OrderedDict[tuple[Path, int, int], LoraFile] = OrderedDict()
        self._weights_lock = threading.Lock()

    def load_weights(self, path: Path) -> LoraFile:
        """The whole file (weights included), after its header passed; raises LoraFormatError with the reason."""
        self.load_path(path)  # the header checks, cached, with the same message as the listing
        stat = path.stat()
        key = (path, stat.st_size, stat.st_mtime_ns)
        with self._weights_lock:
            if key in self._weights:
                self._weights.move_to_end(key)
                return self._weights[key]
        try:
            lora = read_lora_file(path)
        except LoraFormatError as e:
            raise LoraFormatError(f"LoRA '{path.stem}' ({path.name}) cannot be used: {e}") from None
        with self._weights_lock:
            self._weights[key] = lora
            while len(self._weights) > KEEP_WEIGHTS:
                self._weights.popitem(last=False)
        return lora

    def forget(self, path: Path) -> None:
        super().forget(path)
        with self._weights_lock:
            for key in [k for k in self._weights if k[0] == path]:
                del self._weights[key]


def model_label(model) -> str:
    if model.is_xl:
        return "SDXL"
    width = int(model.pipe.text_encoder.config.hidden_size)
    return {768: "SD 1.x", 1024: "SD 2.x"}.get(width, f"a model with {width}-wide text embeddings")


@dataclass(frozen=True)
class TagArgs:
    """What a `<lora:...>` tag asks for besides the file."""

    te: float
    unet: float
    dyn: int | None  # DyLoRA rank, None: the full rank
    lbw: str  # block weights (a preset or values), "": none
    steps: StepRange | None  # the LoRA Block Weight extension's step range (start=, stop=, step=A-B); None: all


def _rank(text: str, tag: ExtraNetworkTag) -> int:
    """A DyLoRA rank (`dyn`): a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise LoraFormatError(
            f"{tag.text}: dyn '{text}' is not a rank (a whole number of at least 1); LoRA not applied"
        )
    return value


def _step(text: str | None, what: str, tag: ExtraNetworkTag) -> int | None:
    """A step of the extension's range (counted from 1), or None where it is not given."""
    if text is None or not text.strip():
        return None
    try:
        value = int(text.strip())
    except ValueError:
        raise LoraFormatError(f"{tag.text}: {what} step '{text}' is not a whole number; LoRA not applied") from None
    if value < 0:
        raise LoraFormatError(f"{tag.text}: {what} step {value} is below 0; LoRA not applied")
    return value


def _number(text: str, what: str, tag: ExtraNetworkTag) -> float:
    try:
        value = float(text)
    except ValueError:
        raise LoraFormatError(f"{tag.text}: {what} '{text}' is not a number; LoRA not applied") from None
    if not math.isfinite(value):
        raise LoraFormatError(f"{tag.text}: {what} '{text}' is not a finite number; LoRA not applied")
    return value


# kohya's metadata keys the Info view shows, in this order, with the label a person reads
TRAINING_KEYS = {
    "ss_output_name": "Output name",
    "ss_sd_model_name": "Base model",
    "ss_base_model_version": "Model version",
    "ss_network_module": "Network module",
    "ss_network_dim": "Rank (network dim)",
    "ss_network_alpha": "Alpha",
    "ss_network_args": "Network args",
    "ss_steps": "Steps",
    "ss_epoch": "Epoch",
    "ss_num_train_images": "Training images",
    "ss_resolution": "Resolution",
    "ss_learning_rate": "Learning rate",
    "ss_text_encoder_lr": "Text encoder learning rate",
    "ss_scale_weight_norms": "Scale weight norms",
    "ss_network_dropout": "Network dropout",
    "ss_optimizer": "Optimizer",
    "ss_lr_scheduler": "LR scheduler",
    "ss_loss_type": "Loss type",
    "ss_mixed_precision": "Mixed precision",
    "ss_training_started_at": "Started",
    "ss_training_finished_at": "Finished",
    "ss_training_comment": "Comment",
}


def top_tags(tag_frequency: str, limit: int = 30) -> list[tuple[str, int]]:
    """kohya's `ss_tag_frequency` (JSON: {folder: {tag: count}}) summed over folders, most frequent first; a value
    that is not that JSON gives nothing (it is the file's, so anything may be in it)."""
    try:
        folders = json.loads(tag_frequency) if tag_frequency else {}
    except ValueError:
        return []
    counts: dict[str, int] = {}
    for tags in folders.values() if isinstance(folders, dict) else ():
        for tag, count in tags.items() if isinstance(tags, dict) else ():
            if isinstance(count, int | float) and not isinstance(count, bool) and math.isfinite(count):
                counts[str(tag).strip()] = counts.get(str(tag).strip(), 0) + int(count)
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))[:limit]


class LoraService:
    """LoRA files in `models/Lora/` (`--lora-dir`), and the `lora` kind of extra network for generation."""

    tag = "lora"
    aliases = ("lyco",)  # A1111 (1.5+) reads LyCORIS' old `<lyco:...>` tags as LoRA tags

    def __init__(
        self,
        db: LoraDatabase,
        models: ModelManager,
        embeddings: EmbeddingDatabase | None = None,
        *,
        presets_path: Path,
    ):
        self.db = db
        # the LoRA Block Weight presets beyond the defaults (`lbwpresets.txt` in the data folder, read at each use:
        # edits apply at once)
        self.presets_path = presets_path
        self.models = models
        self.embeddings = embeddings  # where a file's bundled embeddings are found while it is applied
        self._hashes: dict[tuple[Path, int, int], str] = {}
        self._lock = threading.Lock()
        self._table: tuple[object, dict[str, Target]] | None = None
        models.on_load(lambda model: self._forget_table())  # never keep a replaced model alive through its layers

    def _forget_table(self) -> None:
        with self._lock:
            self._table = None

    def table(self, model) -> dict[str, Target]:
        """The loaded model's layer names, built once per loaded model (a model switch makes a new one)."""
        with self._lock:
            if self._table is None or self._table[0] is not model:
                self._table = (model, layer_table(model_components(model.pipe)))
            return self._table[1]

    # -- listing ---------------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return sorted(self.db.files(), key=str.lower)

    def _metadata(self, f: NetworkFile) -> dict[str, str]:
        try:
            return dict(self.db.load_path(f.path).metadata)
        except LoraFormatError:
            return {}

    def listing(self) -> list[dict[str, Any]]:
        """`GET /sdapi/v1/loras`: A1111's `[{name, alias, path, metadata}]`."""
        rows = []
        for f in sorted(self.db.files().values(), key=lambda f: f.name.lower()):
            metadata = self._metadata(f)
            rows.append(
                {
                    "name": f.name,
                    "alias": metadata.get("ss_output_name") or f.name,
                    "path": str(f.path),
                    "metadata": metadata,
                }
            )
        return rows

    def details(self) -> list[dict[str, Any]]:
        """Every file with whether it fits the loaded model and why not (the UI's list; not an A1111 route)."""
        model = self.models.get()
        table = self.table(model)
        rows = [self._row(f, model, table) for f in self.db.files().values()]
        return sorted(rows, key=lambda r: r["name"].lower())

    def _row(self, f: NetworkFile, model: LoadedModel, table: dict[str, Target]) -> dict[str, Any]:
        """One file's row of `details`: its user metadata, and its layers if it fits the model, else why not."""
        user = read_user_metadata(f.path)
        row: dict[str, Any] = {
            "name": f.name,
            "path": str(f.path),
            "activation_text": user.activation_text,
            "preferred_weight": user.preferred_weight,
            "description": user.description,
            "preview": str(preview) if (preview := find_preview(f.path)) else None,
            "user": user,  # the whole record, for the Info view
        }
        if user.problem:
            row["user_metadata_problem"] = user.problem
        try:
            lora = self.db.load_path(f.path)
            bind(lora, table, model_label(model))
            kinds = sorted({layer.kind for layer in lora.layers.values()})
            row.update(usable=True, layers=len(lora.layers), kind=", ".join(kinds), embeddings=sorted(lora.bundles))
        except LoraFormatError as e:
            row.update(usable=False, reason=str(e).split(" cannot be used: ", 1)[-1])
        return row

    def _required(self, name: str) -> NetworkFile:
        """The file a name (or alias) finds; NotFoundError, naming the folder, where none does."""
        found = self.find(name)
        if found is None:
            raise NotFoundError(f"No LoRA named '{name}' in {self.db.folder}.")
        return found

    def user_metadata(self, name: str) -> UserMetadata:
        """A1111's user metadata of the file the name (or alias) finds: `<name>.json` beside it, or nothing."""
        found = self.find(name)
        return read_user_metadata(found.path) if found is not None else UserMetadata()

    def info(self, name: str) -> dict[str, Any]:
        """What the LoRA tab's Info view shows of one file: where it is, whether it fits the loaded model, what its
        training recorded (kohya's `ss_` keys, the most frequent caption tags), its bundled embeddings and A1111's
        user metadata. Raises NotFoundError for a name no file has."""
        found = self._required(name)
        model = self.models.get()
        row = self._row(found, model, self.table(model))
        metadata = self._metadata(found)
        return {
            "name": found.name,
            "path": str(found.path),
            "size_mb": found.path.stat().st_size / 2**20,
            "usable": row["usable"],
            "reason": row.get("reason", ""),
            "kind": row.get("kind", ""),
            "layers": row.get("layers", 0),
            "embeddings": row.get("embeddings", []),
            "training": {k: v for k, v in metadata.items() if k in TRAINING_KEYS},
            "tags": top_tags(metadata.get("ss_tag_frequency", "")),
            "user": row["user"],
            "preview": Path(row["preview"]) if row["preview"] else None,
        }

    def save_user_metadata(self, name: str, **fields: Any) -> Path:
        """Write A1111's `<name>.json` beside the file the name finds (fields: write_user_metadata's)."""
        found = self._required(name)
        with write_errors("the user metadata", found.path.parent):
            return write_user_metadata(found.path, **fields)

    def save_preview(self, name: str, image: Any) -> Path:
        """Make `image` (a PIL image) the card image of the LoRA `name`: `<name>.png` beside it, as A1111 does."""
        found = self._required(name)
        with write_errors("the card image", found.path.parent):
            return save_preview(found.path, image)

    def resize(self, name: str, new_name: str, rank: int, keep: float = 0.0) -> tuple[Path, ResizeReport]:
        """Write the LoRA `name` resized to at most `rank` as `<new_name>.safetensors` beside it (never over an
        existing file or another LoRA's name)."""
        found = self._required(name)
        dst = self.new_file(new_name, found.path.parent, "resized")
        with write_errors("the resized LoRA", dst.parent):
            report = resize_lora(found.path, dst, rank, keep, output_name=dst.stem)
        return dst, report

    def new_file(self, new_name: str, folder: Path, what: str) -> Path:
        """`<new_name>.safetensors` in `folder`, refused when the name is not a usable file name or a LoRA (file
        or alias) already has it: a tool never writes over a file."""
        clean = clean_name(new_name)
        if not clean or clean != new_name.strip():
            raise UserError(f"'{new_name}' is not a usable file name: use letters, digits, '.', '_', '-' and spaces.")
        dst = folder / (clean + ".safetensors")
        if dst.exists() or self.find(clean) is not None:
            raise UserError(f"A LoRA named '{clean}' already exists; pick another name for the {what} file.")
        return dst

    def refresh(self) -> None:
        """Forget parsed files (the folder itself is rescanned on every look): the next use re-reads them."""
        for f in self.db.files().values():
            self.db.forget(f.path)

    def hash(self, path: Path, metadata: dict[str, str]) -> str:
        """The file's A1111 hash, computed once per file version."""
        stat = path.stat()
        key = (path, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if key not in self._hashes:
                self._hashes[key] = lora_hash(path, metadata)
            return self._hashes[key]

    def find(self, name: str) -> NetworkFile | None:
        """A file by its name, or by the alias in its metadata (`ss_output_name`), as A1111 resolves tags."""
        files = self.db.files()
        if name in files:
            return files[name]
        for f in files.values():
            if self._metadata(f).get("ss_output_name") == name:
                return f
        return None

    # -- generation ------------------------------------------------------------------------------------------------
    def multipliers(self, tag: ExtraNetworkTag) -> TagArgs:
        """(text encoder, UNet) multipliers with A1111's rules: `<lora:x>` is 1, `<lora:x:m>` sets both,
        `<lora:x:te:unet>` each, and `te=`/`unet=` override the positional values; the DyLoRA rank a third value or
        `dyn=` asks for (None: the file's full rank); the LoRA Block Weight extension's `lbw=` (or `w=`) and whether
        it asks for a step range (`start=`, `stop=`, `step=`)."""
        positional, named = parse_multipliers(tag, ("te", "unet", "dyn", "lbw", "w", "start", "stop", "step"))
        te = _number(positional[0], "multiplier", tag) if positional and positional[0] else 1.0
        if "te" in named:
            te = _number(named["te"], "te multiplier", tag)
        unet = _number(positional[1], "UNet multiplier", tag) if len(positional) > 1 and positional[1] else te
        if "unet" in named:
            unet = _number(named["unet"], "unet multiplier", tag)
        dyn_text = named.get("dyn", positional[2] if len(positional) > 2 else "")
        dyn = _rank(dyn_text, tag) if dyn_text else None
        start, stop = named.get("start"), named.get("stop")
        if "step" in named and "-" in named["step"]:  # the extension's `step=A-B`: from A up to B
            start, _, stop = named["step"].partition("-")
        steps = None
        if start is not None or stop is not None:
            steps = StepRange(_step(start, "start", tag), _step(stop, "stop", tag))
        return TagArgs(te, unet, dyn, named.get("lbw", named.get("w", "")), steps)

    def activate(self, model, tags: list[ExtraNetworkTag]) -> Activation:
        """The `<lora:...>` tags of one generation as merged weights for its duration (`lora_applied`), with a note
        for each tag that could not be used (the rest of the prompt still generates) and A1111's `Lora hashes`."""
        if not tags:
            return Activation()
        table = self.table(model)
        label = model_label(model)
        applications: list[Application] = []
        ranged: list[tuple[Application, StepRange]] = []  # applied in a step range only (their UNet part)
        notes: list[str] = []
        hashes: dict[str, str] = {}
        bundled: dict[str, Embedding] = {}
        for tag in tags:
            name = tag.args[0].strip()
            try:
                args = self.multipliers(tag)
                weights = block_weights(args.lbw, read_presets(self.presets_path)) if args.lbw else None
                f = self.find(name)
                if f is None:
                    notes.append(f"{tag.text}: LoRA '{name}' not found in {self.db.folder}; generated without it")
                    continue
                lora = self.db.load_weights(f.path)
                bound = bind(lora, table, label)
            except LoraFormatError as e:
                notes.append(f"{tag.text}: {e}; generated without it" if tag.text not in str(e) else str(e))
                continue
            scales = None
            if weights is not None:
                unet_config = model.pipe.unet.config
                scales = [weights.get(block_of(b.target, unet_config) or "", 1.0) for b in bound]
            application = Application(bound, args.te, args.unet, args.dyn, scales)
            if args.steps is None:
                applications.append(application)
            else:
                ranged.append((application, args.steps))
            shown = name.replace(":", "").replace(",", "")
            hashes[shown] = self.hash(f.path, lora.metadata)[:12]
            notes += self._take_bundled(tag, shown, f.path, lora, model.text_width, bundled)
        infotext = {"Lora hashes": ", ".join(f"{n}: {h}" for n, h in hashes.items())} if hashes else {}
        if ranged:
            switch = StepSwitch(applications, ranged)
            merged, before_step = switch.applied(), switch.at_step
        else:
            merged, before_step = lora_applied(applications), None
        context = self._applied(merged, list(bundled.values()))
        return Activation(context, notes, infotext, before_step, parts=applications + [a for a, _ in ranged])

    def _take_bundled(
        self, tag: ExtraNetworkTag, shown: str, path: Path, lora: LoraFile, width: int, taken: dict[str, Embedding]
    ) -> list[str]:
        """Add the file's usable bundled embeddings to `taken`; a note for each that is not used, and why."""
        notes = []
        for name, data in bundled_embeddings(lora).items():
            about = f"{tag.text}: its bundled embedding '{name}'"
            folder_file = self.embeddings.get(name) if self.embeddings is not None else None
            if isinstance(data, str):
                notes.append(f"{about} cannot be used: {data}")
            elif data.width != width:
                notes.append(
                    f"{about} has vectors {data.width} wide but the loaded model needs {width}; it is not used"
                )
            elif folder_file is not None:
                notes.append(
                    f"{about} is not used: {folder_file.path.name} in the embeddings folder has the same name and "
                    "is used instead"
                )
            elif name in taken:
                notes.append(f"{about} is not used: LoRA '{taken[name].bundled_in}' bundles one of the same name")
            else:
                taken[name] = Embedding(
                    name,
                    data.side_by_side(),
                    path,
                    data.step,
                    data.sd_checkpoint,
                    data.sd_checkpoint_name,
                    bundled_in=shown,
                )
        return notes

    @contextmanager
    def _applied(self, merged: AbstractContextManager, bundled: list[Embedding]) -> Iterator[None]:
        """The LoRAs merged into the model (`merged`), and their bundled embeddings findable in the prompt, for one
        generation."""
        with merged:
            if self.embeddings is None:
                yield
                return
            with self.embeddings.bundled(bundled):
                yield
