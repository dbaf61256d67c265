"""LoRA block weights as the LoRA Block Weight extension for A1111 writes them (`<lora:NAME:m:lbw=...>`): each block's
layers get the multiplier times that block's weight. The reference names each layer's block from the test's own LDM
exporter (not the app's name table) and merges the scaled layers by hand."""

from __future__ import annotations

import re

import numpy as np
import torch
from safetensors.torch import save_file

from tests.test_lora import Layer, folder, gen, kohya_file, ldm_names, make_layers, merged, pixels  # noqa: F401

BLOCKS26 = ["BASE", *(f"IN{i:02}" for i in range(12)), "M00", *(f"OUT{i:02}" for i in range(12))]
# the extension's 17-value list: BASE and the blocks that hold attention in SD 1.x
BLOCKS17 = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00"] + [f"OUT{i:02}" for i in range(3, 12)]


def block_of(layer: Layer, names: dict[str, str]) -> str | None:
    if layer.component != "unet":
        return "BASE"
    name = names[layer.path].removeprefix("lora_unet_")
    if m := re.match(r"input_blocks_(\d+)_", name):
        return f"IN{int(m.group(1)):02}"
    if name.startswith("middle_block_"):
        return "M00"
    if m := re.match(r"output_blocks_(\d+)_", name):
        return f"OUT{int(m.group(1)):02}"
    return None


def scaled(layers: list[Layer], weights: dict[str, float], names: dict[str, str]) -> list[Layer]:
    return [
        Layer(x.component, x.path, x.module, x.down, x.up * weights.get(block_of(x, names), 1.0), x.alpha)
        for x in layers
    ]


def test_block_weights_scale_each_block(services, folder):  # noqa: F811
    pipe = services.models.get().pipe
    layers = make_layers(pipe, seed=2)
    names = ldm_names(pipe.unet)
    blocks = {block_of(x, names) for x in layers}
    assert "BASE" in blocks and len(blocks) > 4  # the file spans the text encoder and several blocks
    save_file(kohya_file(pipe, layers), str(folder / "zqlbw.safetensors"))
    base = pixels(gen(services, "a blue square"))
    whole = pixels(gen(services, "a blue square <lora:zqlbw:0.8>"))

    # 26 values, every block its own weight
    values = [round(0.2 + 0.05 * i, 2) * (-1 if i % 7 == 3 else 1) for i in range(26)]
    weights = dict(zip(BLOCKS26, values, strict=True))
    ours = gen(services, f"a blue square <lora:zqlbw:0.8:lbw={','.join(map(str, values))}>")
    assert ours.notes == []
    with merged(scaled(layers, weights, names), 0.8, 0.8):
        reference = pixels(gen(services, "a blue square"))
    assert np.abs(pixels(ours) - reference).max() <= 1
    assert not np.array_equal(pixels(ours), whole)

    # a preset of the user's file (17 values; the blocks it does not name get 0), and `w=`, the short name
    chosen = [1, 0, 0.5, 1, 0, 0.25, 1, 0.75, 1, 0, 1, 0.5, 1, 1, 0, 1, 0.3]
    (services.settings.data_dir / "lbwpresets.txt").write_text(
        "comment line\nZQMINE:" + ",".join(map(str, chosen)) + "\n", encoding="utf-8"
    )
    weights = dict.fromkeys(BLOCKS26, 0.0) | dict(zip(BLOCKS17, chosen, strict=True))
    try:
        for tag in ("<lora:zqlbw:1:lbw=ZQMINE>", "<lora:zqlbw:1:w=ZQMINE>"):
            ours = gen(services, f"a blue square {tag}")
            assert ours.notes == [], tag
            with merged(scaled(layers, weights, names), 1.0, 1.0):
                reference = pixels(gen(services, "a blue square"))
            assert np.abs(pixels(ours) - reference).max() <= 1, tag
    finally:
        (services.settings.data_dir / "lbwpresets.txt").unlink()

    # the extension's defaults: ALL is every block that holds attention (a LoCon's layers elsewhere get 0), NONE
    # none of it
    ours = gen(services, "a blue square <lora:zqlbw:0.8:lbw=ALL>")
    with merged(scaled(layers, dict.fromkeys(BLOCKS26, 0.0) | dict.fromkeys(BLOCKS17, 1.0), names), 0.8, 0.8):
        reference = pixels(gen(services, "a blue square"))
    assert np.abs(pixels(ours) - reference).max() <= 1
    assert np.array_equal(pixels(gen(services, "a blue square <lora:zqlbw:0.8:lbw=NONE>")), base)


def test_what_cannot_be_honoured_gets_a_note(services, folder):  # noqa: F811
    pipe = services.models.get().pipe
    save_file(kohya_file(pipe, make_layers(pipe, seed=3)), str(folder / "zqlbwbad.safetensors"))
    base = pixels(gen(services, "a blue square"))
    for tag, says in [
        ("<lora:zqlbwbad:1:lbw=NOPE>", "neither a preset"),
        ("<lora:zqlbwbad:1:lbw=1,1,1>", "12, 17, 20 or 26 values"),
        ("<lora:zqlbwbad:1:lbw=R,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1>", "R, U and X are not supported"),
    ]:
        result = gen(services, f"a blue square {tag}")
        assert len(result.notes) == 1 and says in result.notes[0], (tag, result.notes)
        assert np.array_equal(pixels(result), base)  # not applied rather than applied otherwise than asked
    # a step range: applied to every step, with a note
    ranged = gen(services, "a blue square <lora:zqlbwbad:1:lbw=ALL:stop=3>")
    assert len(ranged.notes) == 1 and "start/stop steps are not supported" in ranged.notes[0]
    assert np.array_equal(pixels(ranged), pixels(gen(services, "a blue square <lora:zqlbwbad:1:lbw=ALL>")))


def test_the_block_of_every_layer_a_kohya_file_can_name():
    """The app's block for each UNet layer of SD 1.x and SDXL layouts agrees with the test exporter's LDM name."""
    from app.lora.block_weights import block_of as app_block_of
    from app.lora.names import Target
    from app.models.default_model import build_default_pipeline, build_tiny_sdxl_pipeline

    for pipe in (build_default_pipeline(), build_tiny_sdxl_pipeline()):
        names = ldm_names(pipe.unet)
        layers = [
            Layer("unet", path, module, torch.zeros(1), torch.zeros(1), None)
            for path, module in pipe.unet.named_modules()
            if isinstance(module, torch.nn.Linear | torch.nn.Conv2d) and path in names
        ]
        assert layers
        for x in layers:
            assert app_block_of(Target("unet", x.path, x.module), pipe.unet.config) == block_of(x, names), x.path
