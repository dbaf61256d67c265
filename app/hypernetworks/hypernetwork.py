"""A hypernetwork: a pair of modules (for k and for v) per attention input width, and A1111's file layout.

File (A1111 `.pt`): `{768: (k_state_dict, v_state_dict), 320: (...), ..., "layer_structure": [1, 2, 1],
"activation_func": "relu", "is_layer_norm": False, "weight_initialization": "Normal", "use_dropout": False,
"dropout_structure": [0, 0, 0], "activate_output": False, "last_layer_dropout": False, "step": 0,
"name": "...", "sd_checkpoint": ..., "sd_checkpoint_name": ..., "optional_info": ...}`.
Old files lack some keys; `activate_output` then defaults to True (A1111).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from app.errors import UserError
from app.hypernetworks.module import HypernetworkModule, default_dropout_structure

_LEGACY_KEY = re.compile(r"^linear([12])\.(weight|bias)$")


class HypernetworkFormatError(UserError):
    pass


@dataclass
class Hypernetwork:
    name: str
    layer_structure: list[float] = field(default_factory=lambda: [1, 2, 1])
    activation_func: str | None = None
    is_layer_norm: bool = False
    weight_initialization: str = "Normal"
    use_dropout: bool = False
    dropout_structure: list[float] | None = None
    activate_output: bool = False
    last_layer_dropout: bool = False
    step: int = 0
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    optional_info: str | None = None
    layers: dict[int, tuple[HypernetworkModule, HypernetworkModule]] = field(default_factory=dict)

    @property
    def widths(self) -> list[int]:
        return sorted(self.layers)

    def _new_module(self, width: int) -> HypernetworkModule:
        return HypernetworkModule(
            width,
            self.layer_structure,
            self.activation_func,
            self.is_layer_norm,
            self.dropout_structure,
            self.activate_output,
        )

    @classmethod
    def create(
        cls,
        name: str,
        widths: list[int],
        layer_structure: list[float],
        activation_func: str | None,
        weight_init: str,
        add_layer_norm: bool,
        use_dropout: bool,
        dropout_structure: list[float] | None,
        last_layer_dropout: bool = False,
        seed: int | None = None,
    ) -> Hypernetwork:
        hn = cls(
            name,
            list(layer_structure),
            activation_func,
            add_layer_norm,
            weight_init,
            use_dropout,
            dropout_structure or default_dropout_structure(layer_structure, use_dropout, last_layer_dropout),
            activate_output=False,
            last_layer_dropout=last_layer_dropout,
        )
        generator_state = torch.random.get_rng_state()
        if seed is not None:
            torch.manual_seed(seed)
        try:
            for width in widths:
                pair = (hn._new_module(width), hn._new_module(width))
                for module in pair:
                    module.initialize(weight_init, activation_func)
                hn.layers[int(width)] = pair
        finally:
            if seed is not None:
                torch.random.set_rng_state(generator_state)
        return hn

    @classmethod
    def from_dict(cls, data: dict[Any, Any], name: str) -> Hypernetwork:
        """Build from a loaded A1111 dict; raises HypernetworkFormatError with a reason."""
        if not isinstance(data, dict):
            raise HypernetworkFormatError(f"expected a dict, found {type(data).__name__}")
        structure = data.get("layer_structure") or [1, 2, 1]
        use_dropout = bool(data.get("use_dropout", False))
        last_layer_dropout = bool(data.get("last_layer_dropout", False))
        dropout = data.get("dropout_structure")
        hn = cls(
            name=name,
            layer_structure=[float(x) for x in structure],
            activation_func=data.get("activation_func"),
            is_layer_norm=bool(data.get("is_layer_norm", False)),
            weight_initialization=str(data.get("weight_initialization", "Normal")),
            use_dropout=use_dropout,
            dropout_structure=[float(x) for x in dropout]
            if dropout is not None
            else default_dropout_structure(structure, use_dropout, last_layer_dropout),
            activate_output=bool(data.get("activate_output", True)),
            last_layer_dropout=last_layer_dropout,
            step=int(data.get("step") or 0),
            sd_checkpoint=_opt_str(data.get("sd_checkpoint")),
            sd_checkpoint_name=_opt_str(data.get("sd_checkpoint_name")),
            optional_info=_opt_str(data.get("optional_info")),
        )
        for key, value in data.items():
            if isinstance(key, str) and not key.isdigit():
                continue
            width = int(key)
            if not isinstance(value, list | tuple) or len(value) != 2:
                raise HypernetworkFormatError(f"width {width} must hold a (k, v) pair of state dicts")
            pair = []
            for state in value:
                module = hn._new_module(width)
                try:
                    module.load_state_dict(_fix_legacy_keys(state))
                except (RuntimeError, TypeError, AttributeError) as e:
                    raise HypernetworkFormatError(
                        f"the module for width {width} does not match its layer structure {structure} "
                        f"({str(e).splitlines()[0][:160]})"
                    ) from None
                module.eval()
                pair.append(module)
            hn.layers[width] = (pair[0], pair[1])
        if not hn.layers:
            raise HypernetworkFormatError("the file holds no modules (no integer width keys)")
        for module in hn.modules():
            for p in module.parameters():
                if not torch.isfinite(p).all():
                    raise HypernetworkFormatError("the file contains NaN or infinite weights")
        return hn

    def to_dict(self) -> dict[Any, Any]:
        """A1111's layout, ready for torch.save."""
        data: dict[Any, Any] = {
            width: (k.state_dict(), v.state_dict()) for width, (k, v) in sorted(self.layers.items())
        }
        data.update(
            {
                "step": self.step,
                "name": self.name,
                "layer_structure": self.layer_structure,
                "activation_func": self.activation_func,
                "is_layer_norm": self.is_layer_norm,
                "weight_initialization": self.weight_initialization,
                "sd_checkpoint": self.sd_checkpoint,
                "sd_checkpoint_name": self.sd_checkpoint_name,
                "activate_output": self.activate_output,
                "use_dropout": self.use_dropout,
                "dropout_structure": self.dropout_structure,
                "last_layer_dropout": self.last_layer_dropout,
                "optional_info": self.optional_info,
            }
        )
        return data

    def modules(self) -> list[HypernetworkModule]:
        return [m for pair in self.layers.values() for m in pair]

    def parameters_for(self, widths: set[int]) -> list[nn.Parameter]:
        return [
            p for width, pair in sorted(self.layers.items()) if width in widths for m in pair for p in m.parameters()
        ]

    def train(self, mode: bool = True) -> None:
        for module in self.modules():
            module.train(mode)

    def to(self, device: torch.device) -> Hypernetwork:
        for module in self.modules():
            module.to(device)
        return self


def _fix_legacy_keys(state: dict) -> dict:
    """Old files name the two Linear layers `linear1`/`linear2`: they are `linear.0`/`linear.1`."""
    fixed = {}
    for key, value in dict(state).items():
        match = _LEGACY_KEY.match(str(key))
        fixed[f"linear.{int(match.group(1)) - 1}.{match.group(2)}" if match else key] = value
    return fixed


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)
