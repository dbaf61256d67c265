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
    for tag, says in [
        ("<lora:zqlbwbad:1:stop=x>", "stop step 'x' is not a whole number"),
        ("<lora:zqlbwbad:1:start=-2>", "start step -2 is below 0"),
    ]:
        result = gen(services, f"a blue square {tag}")
        assert len(result.notes) == 1 and says in result.notes[0], (tag, result.notes)
        assert np.array_equal(pixels(result), base)


def test_a_step_range_applies_the_unet_part_from_start_up_to_stop(services, folder):  # noqa: F811
    """The extension's `start=`, `stop=`, `step=A-B` (steps counted from 1, stop not included): a UNet layer the
    file touches holds its merged weight at exactly those steps, the text encoder part applies throughout, and
    the model is its own afterwards."""
    pipe = services.models.get().pipe
    layers = make_layers(pipe, seed=4)
    save_file(kohya_file(pipe, layers), str(folder / "zqsteps.safetensors"))
    probe = next(x.module for x in layers if x.component == "unet")
    original = probe.weight.detach().clone()
    seen: list[bool] = []
    handle = pipe.unet.register_forward_pre_hook(lambda *_: seen.append(not torch.equal(probe.weight, original)))

    def merged_at(tag: str, **kw) -> list[bool]:
        seen.clear()
        result = gen(services, f"a blue square {tag}", **kw)
        assert result.notes == [], result.notes
        return list(seen)

    try:
        assert merged_at("<lora:zqsteps:1>") == [True] * 6
        assert merged_at("<lora:zqsteps:1:stop=3>") == [True, True, False, False, False, False]
        assert merged_at("<lora:zqsteps:1:start=3>") == [False, False, True, True, True, True]
        assert merged_at("<lora:zqsteps:1:step=2-4>") == [False, True, True, False, False, False]
        # every image of a batch count starts its range again
        assert merged_at("<lora:zqsteps:1:stop=2>", n_iter=2) == [True, False, False, False, False, False] * 2
    finally:
        handle.remove()
    assert torch.equal(probe.weight, original)
    # the text encoder part applies throughout: outside its range the LoRA is `<lora:x:1:0>` (te 1, UNet 0)
    never = pixels(gen(services, "a blue square <lora:zqsteps:1:start=50>"))
    assert np.array_equal(never, pixels(gen(services, "a blue square <lora:zqsteps:1:0>")))
    assert np.array_equal(
        pixels(gen(services, "a blue square <lora:zqsteps:1:start=1>")),
        pixels(gen(services, "a blue square <lora:zqsteps:1>")),
    )
    full = pixels(gen(services, "a blue square <lora:zqsteps:1>"))
    part = pixels(gen(services, "a blue square <lora:zqsteps:1:stop=3>"))
    assert not np.array_equal(part, never) and not np.array_equal(part, full)
    # with another LoRA applied throughout, each switch merges both from the original weights
    save_file(kohya_file(pipe, make_layers(pipe, seed=5)), str(folder / "zqsteps2.safetensors"))
    both = pixels(gen(services, "a blue square <lora:zqsteps2:1> <lora:zqsteps:1:start=50>"))
    assert np.array_equal(both, pixels(gen(services, "a blue square <lora:zqsteps2:1> <lora:zqsteps:1:0>")))


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
