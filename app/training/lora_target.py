"""Training a LoRA on the shared engine: PEFT LoRA layers injected around the UNet's attention projections (and
optionally its ResNet convolutions, kohya's LoCon, and the text encoder's projections) for the run, their fp32
weights the trained tensors, the file written in kohya's format; the model gets its original modules back when the
run ends."""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from PIL import Image

from app.errors import UserError
from app.lora.files import LOHA_TENSORS, LOKR_TENSORS, LohaLayer, LokrLayer, LoraFile, LoraLayer, bind
from app.lora.layers import DoraLayer
from app.lora.names import TEXT_ENCODER, TEXT_ENCODER_2, UNET, layer_table, model_components
from app.lora.writer import bundle_tensors, save_network
from app.models.manager import LoadedModel
from app.networks.user_metadata import sidecar_path, write_user_metadata
from app.prompts.encoder import PromptEncoder
from app.training.checkpoint import tensors_hash
from app.training.targets import Conditioning, TrainedVectors, encode, save_image

log = logging.getLogger(__name__)

ADAPTER = "trained"  # not "train": ModuleDict keys become attributes, and nn.Module has train()
# What diffusers' LoRA examples train: the attention projections (self- and cross-attention).
UNET_LAYERS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_LAYERS = ("q_proj", "k_proj", "v_proj", "out_proj")
COMPONENTS = (UNET, TEXT_ENCODER, TEXT_ENCODER_2)


# kohya's LoCon (`conv_dim`): the kernel convolutions of the UNet's ResNet blocks and its down/upsamplers
CONV_BLOCKS = (".resnets.", ".downsamplers.", ".upsamplers.")


def conv_layers(unet: torch.nn.Module) -> list[str]:
    """The UNet's 3x3 convolutions inside ResNet blocks, downsamplers and upsamplers (not conv_in/conv_out), which
    kohya's `networks.lora` trains at `conv_dim` when it is set."""
    return [
        path
        for path, module in unet.named_modules()
        if isinstance(module, torch.nn.Conv2d)
        and module.kernel_size != (1, 1)
        and any(block in f".{path}." for block in CONV_BLOCKS)
    ]


def default_layers(root: torch.nn.Module, names: tuple[str, ...]) -> list[str]:
    return [
        path
        for path, module in root.named_modules()
        if isinstance(module, torch.nn.Linear) and any(path == n or path.endswith("." + n) for n in names)
    ]


def unwrap(root: torch.nn.Module) -> None:
    """Put back the original module wherever a PEFT wrapper sits (the wrapper holds it as `base_layer`)."""
    wrapped = [(name, m) for name, m in root.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, module in wrapped:
        parent_name, _, child = name.rpartition(".")
        parent = root.get_submodule(parent_name) if parent_name else root
        setattr(parent, child, module.get_base_layer())
    if hasattr(root, "peft_config"):
        del root.peft_config


# PEFT's tensor names -> the file's (PEFT's LoHa and LoKr use LyCORIS's names; a LoRA's are kohya's)
_LORA_PARTS = {"lora_A": "lora_down.weight", "lora_B": "lora_up.weight"}
_LYCORIS_PARTS = (*LOHA_TENSORS, *LOKR_TENSORS)  # PEFT holds Tucker cores only where asked to: never here


def trained_parts(wrapper: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The trained tensors of one PEFT-wrapped layer under the names the file gives them, in a fixed order."""
    parts: dict[str, torch.nn.Parameter] = {}
    for attr, name in _LORA_PARTS.items():
        if hasattr(wrapper, attr) and ADAPTER in getattr(wrapper, attr):
            parts[name] = getattr(wrapper, attr)[ADAPTER].weight
    for attr in _LYCORIS_PARTS:
        if hasattr(wrapper, attr) and ADAPTER in getattr(wrapper, attr):
            parts[attr] = getattr(wrapper, attr)[ADAPTER]
    return parts


@dataclass(frozen=True)
class NetworkDropout:
    """kohya's three dropouts of a LoRA's forward while it trains (never in previews or generation):
    `network` drops elements of the down projection's output (kohya's `network_dropout`), `rank` drops whole ranks
    per sample and scales the rest up by 1 / (1 - p) (`rank_dropout`), `module` skips a layer's LoRA for a whole
    forward (`module_dropout`). LoHa and LoKr take rank and module dropout from PEFT, which implements LyCORIS's
    (rows of the update, per forward)."""

    network: float = 0.0
    rank: float = 0.0
    module: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.network or self.rank or self.module)


def _dropped(dropout: NetworkDropout, output: torch.Tensor) -> torch.Tensor:
    """A LoRA down projection's output [batch, ..., rank] (a convolution's: [batch, rank, h, w]) with kohya's
    dropouts applied, in kohya's order: the module, then elements, then ranks."""
    if dropout.module and float(torch.rand(1)) < dropout.module:
        return torch.zeros_like(output)  # the layer's LoRA adds nothing this forward
    if dropout.network:
        output = torch.nn.functional.dropout(output, p=dropout.network, training=True)
    if dropout.rank:
        conv = output.dim() == 4
        rank = output.shape[1] if conv else output.shape[-1]
        keep = (torch.rand((output.shape[0], rank), device=output.device) > dropout.rank).to(output.dtype)
        keep = keep[:, :, None, None] if conv else keep.reshape(output.shape[0], *[1] * (output.dim() - 2), rank)
        output = output * keep / (1.0 - dropout.rank)
    return output


NETWORK_TYPES = {"LoRA": "lora", "LoHa": "loha", "LoKr": "lokr"}  # a layer kind -> the network type that trains it


def network_type_of(lora: LoraFile) -> str:
    """The network type that continues `lora` (the service has refused files of other or mixed kinds); a DoRA
    file's is that of the layers it decomposes."""
    layer = next(iter(lora.layers.values()))
    return NETWORK_TYPES[(layer.inner if isinstance(layer, DoraLayer) else layer).kind]


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """The norm of each input column of a weight [out, in, ...] (a convolution's over its outputs and kernel): the
    DoRA magnitudes A1111 and the DoRA paper use, LyCORIS's `wd_on_output=False`."""
    return weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)


def layer_of(network_type: str, parts: dict[str, torch.Tensor], alpha: float) -> LoraLayer | LohaLayer | LokrLayer:
    """One trained layer's tensors (by their file names) as the reader's layer, whose `delta` is what the file will
    do to the model."""
    if network_type == "loha":
        return LohaLayer(*(parts.get(n) for n in LOHA_TENSORS), alpha)
    if network_type == "lokr":
        return LokrLayer(*(parts.get(n) for n in LOKR_TENSORS), alpha)
    return LoraLayer(parts["lora_down.weight"], parts["lora_up.weight"], alpha)


def continued_layer(layer: LoraLayer | LohaLayer | LokrLayer | DoraLayer) -> tuple[int, dict[str, torch.Tensor]]:
    """The rank PEFT needs to make this layer's tensors again, and the tensors by their file names (a DoRA layer's
    magnitudes as `dora_scale`)."""
    if isinstance(layer, DoraLayer):
        rank, parts = continued_layer(layer.inner)
        return rank, {**parts, "dora_scale": layer.dora_scale}
    parts = layer.named_tensors()
    if isinstance(layer, LoraLayer):
        return layer.rank, parts
    if isinstance(layer, LohaLayer):
        return layer.w1_b.shape[0], parts
    if layer.w2_b is not None:
        return layer.w2_b.shape[0], parts
    if layer.w1_b is not None:
        return layer.w1_b.shape[0], parts
    # two full halves have no rank: any rank of at least half of w2's sides keeps them full; the file's alpha is the
    # rank they were made with (LyCORIS's convention, and ours), so a continued file is written as it was
    full = max(layer.w2.shape[:2])
    alpha = int(layer.alpha) if layer.alpha is not None and float(layer.alpha).is_integer() else 0
    return (alpha if alpha >= full / 2 else full), parts


class LoraTarget:
    """A new LoRA (rank, alpha, which parts) or an existing kohya file continued (its own rank and alpha); with a
    `bundle`, an embedding trained beside it (pivotal tuning: a new word for the subject and the layers that draw it
    learn together), written into the same file as A1111's bundled embedding."""

    kind = "lora"
    weight_decay = 1e-2  # AdamW's default, as diffusers' LoRA examples use
    copy_suffix = ".safetensors"

    def __init__(
        self,
        path: Path,
        model: LoadedModel,
        rank: int,
        alpha: float,
        train_text_encoder: bool,
        seed: int,
        metadata: dict[str, str],
        existing: LoraFile | None = None,
        save_dtype: torch.dtype = torch.float32,
        conv_dim: int = 0,
        conv_alpha: float = 1.0,
        network_type: str = "lora",
        bundle: TrainedVectors | None = None,
        max_norm: float = 0.0,
        dropout: NetworkDropout = NetworkDropout(),
        lokr_factor: int = -1,
        dora_wd: bool = False,
    ):
        self.path, self.name = path, path.stem
        # DoRA (LyCORIS's `dora_wd`): a magnitude per input column of each layer, trained with its update
        self.dora = bool(dora_wd)
        self._magnitudes: dict[tuple[str, str], torch.nn.Parameter] = {}
        self.max_norm = float(max_norm)  # kohya's scale_weight_norms: 0 = off
        self.dropout = dropout
        self.random_forward = bool(dropout)  # the loop seeds and replays the RNG per micro-batch for an exact resume
        self._in_training_forward = False  # the dropouts act only in the training step's forward, not in previews
        self._hooks: list = []
        self.bundle = bundle
        self.prompt_name = bundle.name if bundle is not None else self.name
        self.embedding_parameters = 1 if bundle is not None else 0
        self.save_dtype = save_dtype
        self._metadata = dict(metadata)
        self._components = model_components(model.pipe)
        self.network_type = network_type
        self._decompose_both = False  # LoKr: w1 low-rank too (only a continued file that has it so)
        self._factor = int(lokr_factor)  # LoKr: LyCORIS's `factor` (-1: the most square split)
        plan: dict[str, list[tuple[str, int, float, dict[str, torch.Tensor] | None]]] = {}
        if existing is not None:
            self.initial_step = int(existing.metadata.get("ss_steps", "0") or 0)
            bound = bind(existing, layer_table(self._components), "the loaded model")
            self.network_type = network_type_of(existing)
            self.dora = any(isinstance(b.layer, DoraLayer) for b in bound)
            for b in bound:
                rank_value, parts = continued_layer(b.layer)
                self._decompose_both |= "lokr_w1_a" in parts
                alpha_value = b.layer.alpha if b.layer.alpha is not None else float(rank_value)
                plan.setdefault(b.target.component, []).append((b.target.path, rank_value, alpha_value, parts))
        else:
            self.initial_step = 0
            plan[UNET] = [(p, rank, alpha, None) for p in default_layers(model.pipe.unet, UNET_LAYERS)]
            if conv_dim:  # LoCon: the ResNet convolutions too, at their own rank and alpha
                plan[UNET] += [(p, conv_dim, conv_alpha, None) for p in conv_layers(model.pipe.unet)]
            if train_text_encoder:  # SDXL: both text encoders
                for component in (TEXT_ENCODER, TEXT_ENCODER_2):
                    if component in self._components:
                        layers = default_layers(self._components[component], TEXT_ENCODER_LAYERS)
                        plan[component] = [(p, rank, alpha, None) for p in layers]
        # One order for fresh and continued runs (a file lists its layers by name): the optimizer state in `.optim`
        # and its digest follow the parameter order, so resume must see the same order as the run that saved.
        self._plan = {c: sorted(plan[c], key=lambda layer: layer[0]) for c in COMPONENTS if c in plan}
        self._params: list[torch.nn.Parameter] = []
        self.text_encoder_parameters = 0  # `_params` follows COMPONENTS (the UNet first): the text encoders' last
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)  # PEFT's random init (Kaiming): the same run, the same start
                for component, layers in self._plan.items():
                    added = self._inject(component, layers)
                    self.text_encoder_parameters += added if component != UNET else 0
        except Exception:
            self.close()
            raise
        # PEFT's LoHa/LoKr layers drop (rank, module) in training mode only; the frozen model stays in eval mode
        self._dropping_wrappers = (
            [m for c in self._plan for m in self._components[c].modules() if isinstance(m, BaseTunerLayer)]
            if self.dropout and self.network_type != "lora"
            else []
        )
        self._text_encoders = [self._components[c] for c in (TEXT_ENCODER, TEXT_ENCODER_2) if c in self._plan]
        self.trains_text_encoder = bool(self._text_encoders)
        self._encoder = model.encoder
        self._xl = model.is_xl

    def _config(self, layers: list):
        """PEFT's config for this network type; each layer's own rank and alpha through the patterns."""
        common = dict(
            target_modules=[p for p, *_ in layers],
            rank_pattern={re.escape(p): r for p, r, *_ in layers},
            alpha_pattern={re.escape(p): a for p, _, a, _ in layers},
        )
        r, a = layers[0][1], layers[0][2]
        if self.network_type in ("loha", "lokr"):  # PEFT's own rank and module dropout (LyCORIS's)
            common.update(rank_dropout=self.dropout.rank, module_dropout=self.dropout.module)
        if self.network_type == "loha":
            return LoHaConfig(r=r, alpha=a, init_weights=True, **common)
        if self.network_type == "lokr":
            return LoKrConfig(
                r=r,
                alpha=a,
                init_weights="lycoris",
                decompose_both=self._decompose_both,
                decompose_factor=self._factor,
                **common,
            )
        return LoraConfig(r=r, lora_alpha=a, lora_dropout=0.0, init_lora_weights=True, **common)

    def _inject(self, component: str, layers: list) -> int:
        """Wrap `layers` of the model's `component` with trainable layers of the network type (fp32, a continued
        file's values put in); the number of tensors added."""
        root = self._components[component]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            inject_adapter_in_model(self._config(layers), root, adapter_name=ADAPTER)
        if hasattr(root, "peft_config"):
            del root.peft_config
        added = 0
        for path, _, _, given in layers:
            wrapper = root.get_submodule(path)
            parts = trained_parts(wrapper)
            if self.network_type == "lokr" and {"lokr_w1", "lokr_w2"} <= set(parts):
                wrapper.scaling[ADAPTER] = 1.0  # two full halves have no rank: readers apply them unscaled
            with torch.no_grad():
                for part, p in parts.items():
                    p.data = p.data.float()  # fp32 master weights, also when the model runs in half precision
                    if given is not None:
                        if part not in given or given[part].numel() != p.numel():
                            raise UserError(
                                f"'{self.name}' cannot be continued: its layer {path} is laid out otherwise than "
                                f"this trainer makes a {self.network_type} (a {part} of {p.numel()} values). Choose "
                                "another name to train a new one."
                            )
                        p.copy_(given[part].reshape(p.shape))
            for p in parts.values():
                p.requires_grad_(True)
                self._params.append(p)
                added += 1
            if self.dora:
                magnitude = self._magnitude(wrapper, path, given)
                self._magnitudes[(component, path)] = magnitude
                self._params.append(magnitude)
                added += 1
                self._hooks.append(wrapper.register_forward_pre_hook(self._decomposing_hook(wrapper, magnitude)))
            if self.dropout and self.network_type == "lora":
                down = wrapper.lora_A[ADAPTER]
                self._hooks.append(down.register_forward_hook(self._drop_hook))
        return added

    def _magnitude(self, wrapper: torch.nn.Module, path: str, given: dict | None) -> torch.nn.Parameter:
        """A layer's DoRA magnitudes, one per input column: the base weight's column norms for a new layer (the
        update starts at zero, so the layer starts as the model's), a continued file's `dora_scale` otherwise."""
        weight = wrapper.get_base_layer().weight
        if given is None:
            values = column_norms(weight.detach().float())
        else:
            stored = given.get("dora_scale")
            if stored is None or stored.numel() != weight.shape[1]:
                raise UserError(
                    f"'{self.name}' cannot be continued: its layer {path} has no DoRA magnitude per input column "
                    f"({weight.shape[1]} values). Choose another name to train a new one."
                )
            values = stored.detach().float().reshape(-1)
        return torch.nn.Parameter(values.to(weight.device).clone(), requires_grad=True)

    def _decomposing_hook(self, wrapper: torch.nn.Module, magnitude: torch.nn.Parameter):
        """DoRA per input column as a forward pre-hook on the wrapped layer. The merged weight (W + update) with each
        column rescaled to its magnitude is (W + update) @ diag(m / column norms), so the layer's forward on
        x * m / norms (base and update alike; the bias untouched) is exactly what the file does to the model: no
        merged copy of the weight is kept. The norms are taken without gradient (the DoRA paper's and PEFT's
        memory saving: the graph of W + update is not stored); the magnitudes and, through x, the update learn."""
        weight = wrapper.get_base_layer().weight
        conv = weight.dim() == 4

        def hook(module: torch.nn.Module, args: tuple) -> tuple:
            parts = trained_parts(wrapper)
            with torch.no_grad():
                update = layer_of(self.network_type, parts, self._alpha(wrapper, parts)).delta(weight.device)
                norms = column_norms(weight.float() + update.reshape(weight.shape))
            scale = magnitude / norms.clamp_min(torch.finfo(torch.float32).tiny)
            x = args[0]
            scale = scale.to(x.dtype).view(1, -1, 1, 1) if conv else scale.to(x.dtype)
            return (x * scale, *args[1:])

        return hook

    def _drop_hook(self, module: torch.nn.Module, inputs, output: torch.Tensor) -> torch.Tensor | None:
        return _dropped(self.dropout, output) if self._in_training_forward else None

    def close(self) -> None:
        """Take the LoRA layers out of the model (always called when the run ends)."""
        for hook in self._hooks:
            hook.remove()
        for root in self._components.values():
            unwrap(root)

    # -- what the loop asks ------------------------------------------------------------------------------------------
    def parameters(self) -> list[torch.nn.Parameter]:
        """The layers' tensors (the UNet's, then the text encoders'), then a bundled embedding's vectors."""
        return [*self._params, *([self.bundle.vectors] if self.bundle is not None else [])]

    def conditioning(self, texts: list[str], clip_skip: int) -> Conditioning:
        if self.bundle is not None:  # the prompts hold the embedding: its vectors need their gradient
            return encode(self.bundle.encoder, texts, clip_skip, with_grad=True)
        return encode(self._encoder, texts, clip_skip, with_grad=self.trains_text_encoder)

    @contextmanager
    def unet_context(self, training: bool = True) -> Iterator[None]:
        """The training step's forward (the layers sit in the model for the whole run): the dropouts act here, and
        PEFT's LoHa/LoKr layers drop only in training mode; a validation forward (`training` False) drops nothing."""
        self._in_training_forward = training
        for wrapper in self._dropping_wrappers:
            wrapper.train(training)
        try:
            yield
        finally:
            self._in_training_forward = False
            for wrapper in self._dropping_wrappers:
                wrapper.train(False)

    def preview_encoder(self) -> PromptEncoder:
        return self.bundle.encoder if self.bundle is not None else self._encoder

    def preview_networks(self) -> list:
        return []

    def digest(self) -> str:
        """The hash of the weights as the file holds them (in its precision; a bundled embedding's in fp32): a
        continued run's weights come from the file, and its `.optim` must be found by them. The fp32 values
        themselves travel in `resume_state`."""
        held = [p.detach().to(self.save_dtype) for p in self._params]
        return tensors_hash(held + ([self.bundle.vectors.detach()] if self.bundle is not None else []))

    def resume_state(self) -> dict:
        """The fp32 weights, kept in `.optim` when the file rounds them (fp16, bf16), so resume is exact."""
        if self.save_dtype == torch.float32:
            return {}
        return {"master_weights": [p.detach().float().cpu().clone() for p in self._params]}

    def restore(self, stored: dict) -> None:
        """Put back the fp32 weights of a matching `.optim` (their rounding is what the file holds)."""
        masters = stored.get("master_weights")
        if not masters or len(masters) != len(self._params):
            return
        with torch.no_grad():
            for p, m in zip(self._params, masters, strict=True):
                if m.shape != p.shape or not torch.equal(m.to(self.save_dtype).float(), p.detach().float().cpu()):
                    return  # not this file's weights after all: keep the file's values
            for p, m in zip(self._params, masters, strict=True):
                p.copy_(m)

    @property
    def optim_path(self) -> Path:
        return self.path.with_suffix(".optim")

    def _alpha(self, wrapper: torch.nn.Module, parts: dict[str, torch.Tensor]) -> float:
        if self.network_type == "lora":
            return float(wrapper.lora_alpha[ADAPTER])
        if self.network_type == "lokr" and {"lokr_w1", "lokr_w2"} <= set(parts):
            return float(wrapper.r[ADAPTER])  # LyCORIS's convention for a rankless layer: alpha = rank
        return float(wrapper.alpha[ADAPTER])

    def _layers(self, with_magnitudes: bool = True) -> list[tuple[str, str, dict[str, torch.Tensor], float]]:
        """Each layer as the file holds it: (component, path, tensors by file name, alpha); a DoRA layer's
        magnitudes as `dora_scale` [1, in] ([1, in, 1, 1] for a convolution), LyCORIS's per-column layout, which
        A1111 and ComfyUI apply as such."""
        out = []
        for component, layers in self._plan.items():
            root = self._components[component]
            for path, *_ in layers:
                wrapper = root.get_submodule(path)
                parts = trained_parts(wrapper)
                alpha = self._alpha(wrapper, parts)
                magnitude = self._magnitudes.get((component, path))
                if with_magnitudes and magnitude is not None:
                    ones = [1] * (wrapper.get_base_layer().weight.dim() - 2)
                    parts = {**parts, "dora_scale": magnitude.reshape(1, -1, *ones)}
                out.append((component, path, parts, alpha))
        return out

    def after_update(self) -> str:
        """kohya's `scale_weight_norms` (max-norm regularization): a layer whose update (alpha/rank included) has a
        Frobenius norm above `max_norm` is scaled back to it, each of its tensors by the same share,
        ratio ** (1 / tensors), as kohya scales a LoRA's two halves and LyCORIS its kinds' factors (the update is a
        product of all of them). Returns kohya's two figures for the progress text."""
        if not self.max_norm:
            return ""
        scaled, norms = 0, []
        with torch.no_grad():
            for _, _, parts, alpha in self._layers(with_magnitudes=False):  # DoRA: the update, as LyCORIS limits it
                first = next(iter(parts.values()))
                norm = float(layer_of(self.network_type, parts, alpha).delta(first.device).norm())
                ratio = self.max_norm / norm if norm > self.max_norm else 1.0
                if ratio < 1.0:
                    share = ratio ** (1 / len(parts))
                    for tensor in parts.values():
                        tensor.mul_(share)
                    scaled += 1
                norms.append(norm * ratio)
        return f"keys scaled: {scaled}, average key norm: {sum(norms) / max(1, len(norms)):.4f}"

    def save(self, step: int, model: LoadedModel, copy_to: Path | None = None) -> None:
        metadata = {**self._metadata, "ss_steps": str(step), "ss_output_name": self.name}
        extra = {}
        if self.bundle is not None:
            extra = bundle_tensors(self.bundle.name, self.bundle.vectors, self.bundle.split)
        save_network(self.path, self._layers(), metadata, self._xl, self.save_dtype, extra)
        if self.bundle is not None:
            self._write_trigger_word()
        if copy_to is not None:
            copy_metadata = {**metadata, "ss_output_name": f"{self.name}-{step}"}
            save_network(copy_to, self._layers(), copy_metadata, self._xl, self.save_dtype, extra)

    def _write_trigger_word(self) -> None:
        """Give a LoRA with a bundled embedding A1111's `NAME.json` with the word as its activation text, so a click
        on its card writes a prompt that works (`<lora:NAME:1> word`). Only where the file has none (a user's own
        is never changed), and best effort: the LoRA is saved whatever happens here."""
        if sidecar_path(self.path).exists():
            return
        try:
            write_user_metadata(
                self.path,
                description="",
                activation_text=self.bundle.name,
                preferred_weight=None,
                negative_text="",
                notes=f"'{self.bundle.name}' is an embedding bundled in this LoRA (pivotal tuning).",
            )
        except (OSError, UserError) as e:
            log.warning("Could not write the trigger word beside %s: %s", self.path, e)

    def save_preview(
        self, path: Path, image: Image.Image, step: int, infotext: str, with_data: bool, model: LoadedModel
    ) -> None:
        save_image(path, image, infotext)
