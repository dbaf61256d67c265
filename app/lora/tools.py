"""The LoRA tools that read whole models (LoRA tab → Extract and Merge): extracting a LoRA from a fine-tuned
checkpoint, and merging LoRAs into a new checkpoint or into one new LoRA. Each holds the model lock while it reads
the weights; the Services run them as jobs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from app.errors import UserError
from app.fileio import write_errors
from app.lora.apply import low_rank_terms
from app.lora.extract import Change, ExtractOptions, ExtractReport, LowRank, extract_lora, write_changes
from app.lora.merge import MergeReport, checkpoint_tensors, merge_metadata, write_checkpoint
from app.lora.names import TEXT_ENCODER_2, model_components
from app.lora.service import LoraService
from app.lora.writer import SAVE_DTYPES, model_version
from app.models.checkpoints import CheckpointInfo
from app.models.manager import LoadedModel, ModelManager, offload_mode, preflight, read_pipeline
from app.naming import clean_name
from app.networks.activation import Activation
from app.prompts.extra_networks import ExtraNetworkTag, extract_extra_networks

CANCELLED = "These tags cancel out: together they change no weight, so there is nothing to merge."


class LoraTools:
    """Extract, merge into a checkpoint, merge into one LoRA: on the model manager's models, writing where the LoRA
    service lists (and never over a file)."""

    def __init__(self, loras: LoraService, models: ModelManager):
        self.loras = loras
        self.models = models

    def _svd_device(self) -> torch.device:
        """Where the SVDs run: the model's GPU where there is one (kohya's `--device cuda`), else the CPU."""
        return self.models.device if self.models.device.type == "cuda" else torch.device("cpu")

    def _base_metadata(self, pipe, info: CheckpointInfo, name: str, comment: str) -> dict[str, str]:
        version, v2 = model_version(pipe)
        return {
            "ss_base_model_version": version,
            "ss_v2": str(v2),
            "ss_sd_model_name": info.model_name,
            "ss_sd_model_hash": info.short_hash or "",
            "ss_new_sd_model_hash": info.sha256 or "",
            "ss_output_name": name,
            "ss_training_comment": comment,
        }

    def extract(
        self,
        tuned: str,
        base: str,
        name: str,
        options: ExtractOptions,
        progress: Callable[[int, int], None] | None = None,
    ) -> tuple[Path, ExtractReport]:
        """Extract the change from checkpoint `base` (empty: the loaded model) to checkpoint `tuned` as the LoRA
        `<name>.safetensors` in the LoRA folder. Holds the model lock: nothing generates while the weights are
        read."""
        options.check()
        dst = self.loras.new_file(name, self.loras.db.folder, "extracted")
        tuned_info = self.models.find(tuned)
        base_info = self.models.find(base) if base else self.models.get().info
        if tuned_info.path == base_info.path:
            raise UserError(f"The fine-tuned model and the base model are both {base_info.title}: pick two models.")
        with self.models.lock:
            base_pipe, tuned_pipe = self._weights_of(base_info), self._weights_of(tuned_info)
            comment = f"extracted from {tuned_info.title} against {base_info.title}"
            metadata = self._base_metadata(base_pipe, base_info, dst.stem, comment)
            with write_errors("the extracted LoRA", dst.parent):
                report = extract_lora(
                    model_components(base_pipe),
                    model_components(tuned_pipe),
                    dst,
                    options,
                    metadata,
                    progress,
                    device=self._svd_device(),
                )
        return dst, report

    def _weights_of(self, info: CheckpointInfo):
        """The pipeline whose weights stand for checkpoint `info`, exactly as the file holds them: the file read
        into CPU memory in fp16 where it stores fp16 (SDXL: half the memory), else in fp32; the loaded model itself
        where its weights are those (not offloaded, and fp32, or fp16 from an fp16 file)."""
        half = info.stores_half()
        loaded = self.models.loaded
        offloaded = offload_mode(self.models.settings, self.models.device) is not None
        exact = loaded is not None and (loaded.dtype == torch.float32 or (half and loaded.dtype == torch.float16))
        if exact and loaded.info.path == info.path and not offloaded:
            return loaded.pipe
        preflight(info)
        return read_pipeline(info, torch.float16 if half else torch.float32)

    def _merging(self, model: LoadedModel, loras: str) -> tuple[list[ExtraNetworkTag], Activation]:
        """The `<lora:...>` tags of `loras` activated on `model`, refused (nothing merged) where a tag cannot be
        applied whole: a tag that is not a LoRA's, one with a note (not found, made for another model), a step
        range."""
        _, tags = extract_extra_networks(loras)
        others = [t.text for t in tags if t.kind not in (self.loras.tag, *self.loras.aliases)]
        if others:
            raise UserError(f"Only LoRAs can be merged, not {', '.join(others)}.", "loras")
        if not tags:
            raise UserError("Write the LoRAs to merge as in a prompt, e.g. <lora:name:0.8> <lora:other:0.5>.", "loras")
        activation = self.loras.activate(model, tags)
        if activation.notes:  # written for a generation, which goes on without the tag; a merge does not
            notes = [note.removesuffix("; generated without it") for note in activation.notes]
            raise UserError("Nothing was merged: " + "; ".join(notes) + ".", "loras")
        if activation.before_step is not None:
            raise UserError(
                "Step ranges (start=, stop=, step=) act during sampling; a merged file has no steps. "
                "Nothing was merged.",
                "loras",
            )
        return tags, activation

    def _refuse_streamed_weights(self) -> None:
        if offload_mode(self.models.settings, self.models.device) == "sequential":
            raise UserError(
                "Merging needs the model's weights in memory, and under --lowvram they stream to the GPU layer by "
                "layer; restart with --medvram (or neither) to merge."
            )

    def merge(self, loras: str, name: str, save_precision: str = "fp16") -> tuple[Path, MergeReport]:
        """Write the loaded model with the `<lora:...>` tags in `loras` applied, as a generation applies them, as the
        checkpoint `<name>.safetensors` in the checkpoint folder (never over a file or another checkpoint's name).
        Refused, with nothing written, when any tag cannot be applied whole."""
        if save_precision not in SAVE_DTYPES:
            raise UserError(
                f"Unknown save precision '{save_precision}'; use one of {', '.join(SAVE_DTYPES)}.", "save_precision"
            )
        clean = clean_name(name)
        if not clean or clean != name.strip():
            raise UserError(f"'{name}' is not a usable file name: use letters, digits, '.', '_', '-' and spaces.")
        dst = self.models.new_checkpoint_path(clean)
        self._refuse_streamed_weights()
        with self.models.lock:
            model = self.models.get()
            tags, activation = self._merging(model, loras)
            components = model_components(model.pipe).values()
            before = {id(p) for root in components for p in root.parameters()}
            with activation.context:
                changed = sum(1 for root in components for p in root.parameters() if id(p) not in before)
                dtype = SAVE_DTYPES[save_precision]
                tensors = checkpoint_tensors(model.pipe, model.own_vae or model.pipe.vae, dtype)
            metadata = merge_metadata(model.info.title, [t.text for t in tags])
            with write_errors("the merged checkpoint", dst.parent):
                dst.parent.mkdir(parents=True, exist_ok=True)
                write_checkpoint(dst, tensors, metadata)
        self.models.refresh()
        return dst, MergeReport([t.text for t in tags], changed, dst.stat().st_size)

    def merge_to_lora(
        self, loras: str, name: str, options: ExtractOptions, progress: Callable[[int, int], None] | None = None
    ) -> tuple[Path, ExtractReport]:
        """Several LoRAs as one (kohya's `svd_merge_lora.py`): each layer's summed change, as a generation applies
        the tags, cut to `options`' rank by SVD and written as the LoRA `<name>.safetensors`. Norm layers and biases
        (LyCORIS's full and norm layers change them) cannot be held by a LoRA: such a merge is refused, and merging
        into a checkpoint keeps them."""
        options.check()
        dst = self.loras.new_file(name, self.loras.db.folder, "merged")
        self._refuse_streamed_weights()
        with self.models.lock:
            model = self.models.get()
            tags, activation = self._merging(model, loras)
            components = model_components(model.pipe)
            before = {(c, n): p for c, root in components.items() for n, p in root.named_parameters()}
            factored = low_rank_terms(activation.parts)
            with activation.context:
                changes: list[Change] = []
                for component, root in components.items():
                    for param_name, merged in root.named_parameters():
                        original = before[(component, param_name)]
                        if merged is original:
                            continue
                        path, _, kind = param_name.rpartition(".")
                        layer = root.get_submodule(path)
                        if kind != "weight" or not isinstance(layer, torch.nn.Linear | torch.nn.Conv2d):
                            raise UserError(
                                f"The LoRAs change {component} {param_name}, which a LoRA cannot hold (a norm layer "
                                "or a bias: LyCORIS full or norm layers); merge them into a checkpoint instead.",
                                "loras",
                            )
                        terms = factored.get(layer)
                        if terms is not None:  # plain LoRAs only: the SVD from the halves, not the whole matrix
                            changes.append((component, path, partial(_product, terms, tuple(original.shape))))
                        else:
                            changes.append(
                                (component, path, lambda dev, m=merged, o=original: m.detach().to(dev, torch.float32)
                                 - o.detach().to(dev, torch.float32))
                            )  # fmt: skip
                if not changes:
                    raise UserError(
                        "These tags change no weight (multipliers of 0?): there is nothing to merge.", "loras"
                    )
                comment = f"merged from {' '.join(t.text for t in tags)}"
                metadata = self._base_metadata(model.pipe, model.info, dst.stem, comment)
                xl = TEXT_ENCODER_2 in components
                # every text-encoder change is the LoRAs' own, never rounding: no minimum; 3x3 convolutions (LoCon
                # layers) at the conv rank, or the rank when none is given (kohya's `new_conv_rank` default)
                merged_options = replace(options, min_diff=0.0, conv_dim=options.conv_dim or options.rank)
                with write_errors("the merged LoRA", dst.parent):
                    report = write_changes(
                        changes, dst, merged_options, metadata, xl, progress, self._svd_device(), CANCELLED
                    )
        return dst, report


def _product(terms: list[tuple[torch.Tensor, torch.Tensor]], shape: tuple[int, ...], device: torch.device) -> LowRank:
    """The summed update of plain LoRA `terms` ((scaled up, down) pairs) as one product, on `device`."""
    up = torch.cat([up for up, _ in terms], dim=1).to(device)
    down = torch.cat([down for _, down in terms], dim=0).to(device)
    return LowRank(up, down, shape)
