"""One hypernetwork module: `x + mlp(x) * multiplier`, with the MLP laid out exactly as A1111's Sequential so that
state-dict keys (`linear.<i>.weight`) match its files index for index."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from app.errors import UserError


def _activation_classes() -> dict[str, type[nn.Module]]:
    """A1111's activation names: a few fixed ones plus every class in torch.nn.modules.activation, lower-cased."""
    found = {
        name.lower(): cls
        for name, cls in inspect.getmembers(torch.nn.modules.activation, inspect.isclass)
        if issubclass(cls, nn.Module) and cls.__module__ == "torch.nn.modules.activation"
    }
    found.update(
        {
            "linear": nn.Identity,
            "relu": nn.ReLU,
            "leakyrelu": nn.LeakyReLU,
            "elu": nn.ELU,
            "swish": nn.Hardswish,
            "tanh": nn.Tanh,
            "sigmoid": nn.Sigmoid,
        }
    )
    return found


ACTIVATIONS = _activation_classes()
# What the UI offers first (A1111's list order), the rest after.
COMMON_ACTIVATIONS = ["linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid"]
WEIGHT_INITS = ["Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal"]


def default_dropout_structure(layer_structure: list[float], use_dropout: bool, last_layer_dropout: bool) -> list:
    """A1111's dropout structure for files that do not store one: 0.3 after hidden layers when dropout is on."""
    if not use_dropout:
        return [0.0] * len(layer_structure)
    values = [0.0] + [0.3] * (len(layer_structure) - 3)
    values.append(0.3 if last_layer_dropout else 0.0)
    values.append(0.0)
    return values


def validate_structure(layer_structure: list[float], dropout_structure: list[float] | None = None) -> None:
    if len(layer_structure) < 2:
        raise UserError(f"Layer structure {layer_structure} needs at least two entries, e.g. 1, 2, 1.")
    if layer_structure[0] != 1 or layer_structure[-1] != 1:
        raise UserError(
            f"Layer structure {layer_structure} must start and end with 1 (e.g. 1, 2, 1): the module "
            "maps a width back onto itself."
        )
    if any(float(x) <= 0 for x in layer_structure):
        raise UserError(f"Layer structure {layer_structure} has a zero or negative width multiplier.")
    if dropout_structure is not None:
        if len(dropout_structure) != len(layer_structure):
            raise UserError(
                f"Dropout structure {dropout_structure} must have as many entries as the layer "
                f"structure {layer_structure}."
            )
        if any(not 0 <= float(p) < 1 for p in dropout_structure) or dropout_structure[0] or dropout_structure[-1]:
            raise UserError(f"Dropout structure {dropout_structure} must start and end with 0, each value in [0, 1).")


class HypernetworkModule(nn.Module):
    def __init__(
        self,
        width: int,
        layer_structure: list[float],
        activation: str | None = None,
        layer_norm: bool = False,
        dropout_structure: list[float] | None = None,
        activate_output: bool = False,
    ):
        super().__init__()
        validate_structure(layer_structure, dropout_structure)
        name = (activation or "linear").lower()
        if name not in ACTIVATIONS:
            raise UserError(
                f"Activation function '{activation}' is unknown. Choose one of: "
                f"{', '.join(COMMON_ACTIVATIONS)}, or another torch.nn activation name."
            )
        layers: list[nn.Module] = []
        last = len(layer_structure) - 2
        for i in range(len(layer_structure) - 1):
            layers.append(nn.Linear(int(width * layer_structure[i]), int(width * layer_structure[i + 1])))
            if name != "linear" and (i < last or activate_output):
                layers.append(ACTIVATIONS[name]())
            if layer_norm:
                layers.append(nn.LayerNorm(int(width * layer_structure[i + 1])))
            if dropout_structure is not None and dropout_structure[i + 1] > 0:
                layers.append(nn.Dropout(p=float(dropout_structure[i + 1])))
        self.linear = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
        # Training always uses 1.0 (A1111); the MLP runs in fp32 when the model is fp16 only if its weights are.
        scale = 1.0 if self.training else multiplier
        return x + self.linear(x.to(self.linear[0].weight.dtype)).to(x.dtype) * scale

    def affine(self, multiplier: float = 1.0) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This module as one affine map, `forward(x, multiplier) == x @ A.T + c`, in fp32; None when it is not
        one (an activation, a layer norm, or dropout that is active). A1111's default hypernetwork ("linear", no
        layer norm, no dropout) is one, so its k and v maps can be folded into the attention's own projections."""
        scale = 1.0 if self.training else multiplier
        product = bias = None
        for layer in self.linear:
            if isinstance(layer, nn.Linear):
                weight, b = layer.weight.float(), layer.bias.float()
                product = weight if product is None else weight @ product
                bias = b if bias is None else weight @ bias + b
            elif not (isinstance(layer, nn.Dropout) and (layer.p == 0 or not self.training)):
                return None
        eye = torch.eye(product.shape[1], dtype=product.dtype, device=product.device)
        return eye + scale * product, scale * bias

    def initialize(self, method: str, activation: str | None) -> None:
        """A1111's initialisations; LayerNorms always get N(0, 0.01) weights and zero bias."""
        if method not in WEIGHT_INITS:
            raise UserError(f"Weight initialization '{method}' is unknown. Choose one of: {', '.join(WEIGHT_INITS)}.")
        nonlinearity = "leaky_relu" if (activation or "").lower() == "leakyrelu" else "relu"
        for layer in self.linear:
            if not isinstance(layer, nn.Linear | nn.LayerNorm):
                continue
            w, b = layer.weight.data, layer.bias.data
            if method == "Normal" or isinstance(layer, nn.LayerNorm):
                nn.init.normal_(w, mean=0.0, std=0.01)
                nn.init.normal_(b, mean=0.0, std=0.0)
            elif method == "XavierUniform":
                nn.init.xavier_uniform_(w)
                nn.init.zeros_(b)
            elif method == "XavierNormal":
                nn.init.xavier_normal_(w)
                nn.init.zeros_(b)
            elif method == "KaimingUniform":
                nn.init.kaiming_uniform_(w, nonlinearity=nonlinearity)
                nn.init.zeros_(b)
            else:
                nn.init.kaiming_normal_(w, nonlinearity=nonlinearity)
                nn.init.zeros_(b)
