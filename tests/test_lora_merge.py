"""Merging LoRAs into a checkpoint (LoRA tab → Merge, kohya's `merge_lora.py`): the loaded model with the tags applied
as a generation applies them, written as a single-file checkpoint in the original layout. Proven both ways: an
extracted LoRA merged back gives the fine-tuned checkpoint's tensors, and a merged checkpoint generates the image
the base model gives with the tag."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from app.errors import UserError
from app.lora.extract import ExtractOptions, LowRank, extract_layer
from tests.test_lora import gen, kohya_file, make_layers, pixels
from tests.test_lora_extract import image_on, own, save_tuned_xl  # noqa: F401 - `own` is a fixture used by name

EXACT = ExtractOptions(rank=4, conv_dim=4, clamp_quantile=1.0, save_precision="fp32")


def test_an_extracted_lora_merged_back_is_the_fine_tune(own):  # noqa: F811
    """Extract (exact: rank >= each change's, no clamp, fp32), merge into the base: every tensor of the new
    checkpoint is the fine-tuned checkpoint's (the same layout, key for key)."""
    own.extract_lora("tuned", "", "zqround", EXACT)
    path, report = own.merge_lora("<lora:zqround:1>", "roundtrip", "fp32")
    assert path == own.settings.ckpt_dir / "roundtrip.safetensors"
    assert report.changed == 6 and "<lora:zqround:1>" in report.sentence()
    merged, tuned = load_file(str(path)), load_file(str(own.settings.ckpt_dir / "tuned.safetensors"))
    assert merged.keys() == tuned.keys()
    for key in tuned:
        torch.testing.assert_close(merged[key], tuned[key], atol=2e-6, rtol=0, msg=key)
    with safe_open(str(path), "pt") as f:
        recipe = f.metadata()["sd_merge_recipe"]
    assert "zqround" in recipe and "shapes-64" in recipe
    assert own.models.find("roundtrip").title.startswith("roundtrip.safetensors")  # listed at once


def test_a_merged_checkpoint_generates_the_tagged_image(own):  # noqa: F811
    """A LoRA with text-encoder and UNet layers (convolutions too), merged at 0.7 with the UNet at 0.4: the new
    checkpoint's image is the base model's image with the same tag; the base model is left as it was."""
    model = own.models.get()
    save_file(kohya_file(model.pipe, make_layers(model.pipe, seed=4)), str(own.settings.lora_dir / "zqm.safetensors"))
    tag = "<lora:zqm:0.7:unet=0.4>"
    base = pixels(gen(own, "a red circle"))
    tagged = pixels(gen(own, f"a red circle {tag}"))
    path, report = own.merge_lora(tag, "merged-m")
    assert report.changed > 0
    assert {t.dtype for t in load_file(str(path)).values() if t.is_floating_point()} == {torch.float16}
    assert np.array_equal(pixels(gen(own, "a red circle")), base)  # nothing left merged in the loaded model
    merged = image_on(own, "merged-m", "shapes-64")
    assert np.abs(tagged - base).max() > 10
    assert np.abs(merged - tagged).max() <= 2  # fp16 file


def test_what_cannot_be_merged_whole_is_refused_with_nothing_written(own):  # noqa: F811
    model = own.models.get()
    save_file(kohya_file(model.pipe, make_layers(model.pipe, seed=5)), str(own.settings.lora_dir / "zqr.safetensors"))

    def refused(loras: str, name: str = "zqrefused", precision: str = "fp16") -> str:
        before = sorted(own.settings.ckpt_dir.iterdir())
        with pytest.raises(UserError) as e:
            own.merge_lora(loras, name, precision)
        assert sorted(own.settings.ckpt_dir.iterdir()) == before
        return str(e.value)

    assert "e.g. <lora:name:0.8>" in refused("no tags here")
    missing = refused("<lora:zqr:1> <lora:nosuch:0.5>")
    assert "not found" in missing and "generated" not in missing
    assert "Only LoRAs" in refused("<lora:zqr:1> <hypernet:x:1>")
    assert "a merged file has no steps" in refused("<lora:zqr:1:stop=3>")
    assert "already exists" in refused("<lora:zqr:1>", "shapes-64")
    assert "usable file name" in refused("<lora:zqr:1>", "a/b")
    assert "save precision" in refused("<lora:zqr:1>", precision="fp8")
    assert np.array_equal(pixels(gen(own, "a red circle")), pixels(gen(own, "a red circle <lora:zqr:0>")))


def test_an_sdxl_model_merges_into_an_sdxl_checkpoint(xl):
    """SDXL's layout (two text encoders, OpenCLIP for the second): extract, merge back, the tuned tensors again."""
    save_tuned_xl(xl, "tinyxl-tuned")
    xl.extract_lora("tinyxl-tuned", "", "zqxlround", ExtractOptions(rank=2, clamp_quantile=1.0, save_precision="fp32"))
    path, report = xl.merge_lora("<lora:zqxlround:1>", "tinyxl-roundtrip", "fp32")
    assert report.changed == 3
    merged, tuned = load_file(str(path)), load_file(str(xl.settings.ckpt_dir / "tinyxl-tuned.safetensors"))
    assert merged.keys() == tuned.keys() and any(k.startswith("conditioner.embedders.1.") for k in merged)
    for key in tuned:
        torch.testing.assert_close(merged[key], tuned[key], atol=2e-6, rtol=0, msg=key)


def decoded(b64: str) -> np.ndarray:
    import base64
    import io

    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"), dtype=np.int16)


def test_merge_through_the_api_then_generate_with_the_new_checkpoint(server):
    """`POST /sdapi/v1/merge/lora`; the answer's title picks the new checkpoint through `override_settings`."""
    import requests

    from app.models.default_model import build_default_pipeline

    pipe = build_default_pipeline()
    folder = server.data_dir / "models" / "Lora"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(kohya_file(pipe, make_layers(pipe, seed=6)), str(folder / "zqapim.safetensors"))
    url = f"{server.url}/sdapi/v1"
    answer = requests.post(
        f"{url}/merge/lora", json={"loras": "<lora:zqapim:0.8>", "name": "zqapi-merged"}, timeout=300
    )
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert result["path"].endswith("zqapi-merged.safetensors") and result["changed"] > 0
    assert result["title"] in [m["title"] for m in requests.get(f"{url}/sd-models", timeout=60).json()]
    body = dict(prompt="a red circle", steps=2, width=64, height=64, seed=1)
    with_tag = requests.post(f"{url}/txt2img", json={**body, "prompt": "a red circle <lora:zqapim:0.8>"}, timeout=300)
    merged = requests.post(
        f"{url}/txt2img", json={**body, "override_settings": {"sd_model_checkpoint": result["title"]}}, timeout=300
    )
    assert with_tag.ok and merged.ok
    assert "zqapi-merged" in merged.json()["info"]
    images = [decoded(r.json()["images"][0]) for r in (with_tag, merged)]
    assert np.abs(images[0] - images[1]).max() <= 2  # fp16 file
    again = requests.post(f"{url}/merge/lora", json={"loras": "<lora:zqapim:1>", "name": "zqapi-merged"}, timeout=60)
    assert again.status_code == 400 and "already exists" in again.json()["detail"]
    missing = requests.post(f"{url}/merge/lora", json={"loras": "<lora:nosuch:1>", "name": "zqx"}, timeout=60)
    assert missing.status_code == 400 and "nosuch" in missing.json()["detail"]
    one = dict(loras="<lora:zqapim:0.5> <lora:zqapim:0.5>", name="zqapi-one", into="lora", rank=4, clamp_quantile=1)
    as_lora = requests.post(f"{url}/merge/lora", json=one, timeout=300)
    assert as_lora.status_code == 200, as_lora.text
    assert as_lora.json()["title"] == "" and as_lora.json()["path"].endswith("Lora/zqapi-one.safetensors")
    assert "zqapi-one" in [entry["name"] for entry in requests.get(f"{url}/loras", timeout=60).json()]


@pytest.mark.parametrize("tool", ["merge", "extract"])
def test_a_full_disk_while_writing_leaves_no_file_and_says_so(own, monkeypatch, tool):  # noqa: F811
    """The file is written beside its place and renamed when whole: a write that fails half way (here: the disk
    fills after part of the file) leaves neither a file nor a temp file, and the message says nothing changed."""
    import app.lora.merge as merge_module
    import app.lora.writer as writer_module

    module = merge_module if tool == "merge" else writer_module
    real = module.save_file

    def half_then_full(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(1000)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(module, "save_file", half_then_full)
    model = own.models.get()
    save_file(
        kohya_file(model.pipe, make_layers(model.pipe, seed=7)), str(own.settings.lora_dir / "zqfull.safetensors")
    )
    folder = own.settings.ckpt_dir if tool == "merge" else own.settings.lora_dir
    before = sorted(p.name for p in folder.iterdir())
    image = pixels(gen(own, "a red circle"))
    with pytest.raises(UserError, match=r"No space left on device.*Nothing was changed"):
        if tool == "merge":
            own.merge_lora("<lora:zqfull:1>", "zqfull-merged")
        else:
            own.extract_lora("tuned", "", "zqfull-extracted", ExtractOptions(rank=2))
    assert sorted(p.name for p in folder.iterdir()) == before
    assert np.array_equal(pixels(gen(own, "a red circle")), image)  # the loaded model is as it was


def test_two_loras_merged_into_one_lora_apply_as_both_tags(own):  # noqa: F811
    """kohya's svd_merge_lora: `<lora:a:0.6> <lora:b:0.4>` as one file; at a rank that holds both (4 + 4) and
    without clamping, `<lora:ab:1>` is the two tags (text encoder, UNet, convolutions); at rank 2 it keeps less."""
    model = own.models.get()
    for name, seed in (("zqa", 11), ("zqb", 12)):
        layers = make_layers(model.pipe, seed=seed)
        save_file(kohya_file(model.pipe, layers), str(own.settings.lora_dir / f"{name}.safetensors"))
    tags = "<lora:zqa:0.6> <lora:zqb:0.4>"
    options = ExtractOptions(rank=8, clamp_quantile=1.0, save_precision="fp32")
    path, report = own.merge_to_lora(tags, "zqab", options)
    assert path == own.settings.lora_dir / "zqab.safetensors" and report.text_encoder
    assert report.kept_min > 0.99999 and report.unchanged == 0
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    assert metadata["ss_training_comment"] == f"merged from {tags}" and metadata["ss_network_dim"] == "8"
    both = pixels(gen(own, f"a red circle {tags}"))
    assert np.abs(both - pixels(gen(own, "a red circle"))).max() > 10
    assert np.abs(pixels(gen(own, "a red circle <lora:zqab:1>")) - both).max() <= 1
    _, smaller = own.merge_to_lora(tags, "zqab-r2", ExtractOptions(rank=2))
    assert smaller.ranks == (2, 2) and smaller.kept_min < 0.99
    with pytest.raises(UserError, match="change no weight"):
        own.merge_to_lora("<lora:zqa:0>", "zqzero", ExtractOptions())


def test_a_lora_that_changes_biases_is_refused_as_one_lora_but_merges_into_a_checkpoint(own):  # noqa: F811
    from app.lora.names import UNET
    from app.lora.writer import kohya_name

    layer = own.models.get().pipe.unet.get_submodule("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0")
    name = kohya_name(UNET, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0")
    g = torch.Generator().manual_seed(0)
    full = {
        f"{name}.diff": torch.randn(layer.weight.shape, generator=g) * 0.05,
        f"{name}.diff_b": torch.randn(layer.bias.shape, generator=g) * 0.05,
    }
    save_file(full, str(own.settings.lora_dir / "zqfullb.safetensors"))
    with pytest.raises(UserError, match="which a LoRA cannot hold"):
        own.merge_to_lora("<lora:zqfullb:1>", "zqfullb-one", ExtractOptions())
    assert not (own.settings.lora_dir / "zqfullb-one.safetensors").exists()
    _, report = own.merge_lora("<lora:zqfullb:1>", "zqfullb-merged", "fp32")
    assert report.changed == 2  # the weight and the bias


def test_an_sd2_model_merges_into_an_sd2_checkpoint(tmp_path, model_store):
    """SD 2.x's layout (linear proj_in/out, the OpenCLIP text encoder with fused q/k/v): the merged checkpoint, read
    back by the loader, holds exactly the weights the LoRA gives the loaded model."""
    from app.lora.names import model_components
    from app.models.default_model import build_tiny_sd2_pipeline
    from app.models.ldm_export import export_sd2
    from app.models.manager import read_pipeline
    from app.prompts.extra_networks import extract_extra_networks
    from app.services import build_services
    from app.settings import Settings
    from tests.conftest import make_data_dir

    data = make_data_dir(tmp_path / "data", model_store)
    save_file(export_sd2(build_tiny_sd2_pipeline()), str(data / "models" / "Stable-diffusion" / "tiny2.safetensors"))
    services = build_services(Settings(data_dir=data))
    services.select_checkpoint("tiny2")
    model = services.models.get()
    services.settings.lora_dir.mkdir(parents=True, exist_ok=True)
    layers = make_layers(model.pipe, seed=3)
    save_file(kohya_file(model.pipe, layers, "diffusers"), str(services.settings.lora_dir / "zq2.safetensors"))
    _, report = services.merge_lora("<lora:zq2:0.8>", "tiny2-merged", "fp32")
    assert report.changed == len(layers)
    merged = model_components(read_pipeline(services.models.find("tiny2-merged"), torch.float32))
    with services.loras.activate(model, extract_extra_networks("<lora:zq2:0.8>")[1]).context:
        for component, root in model_components(model.pipe).items():
            theirs = merged[component].state_dict()
            for key, value in root.state_dict().items():
                torch.testing.assert_close(theirs[key], value, atol=1e-6, rtol=0, msg=f"{component} {key}")


@pytest.mark.parametrize("shape", [(48, 40), (24, 16, 3, 3)])
def test_a_sum_of_loras_is_cut_from_its_halves_as_from_the_whole_matrix(shape):
    """Plain LoRAs' summed update is one product of their halves side by side, so its SVD comes from two thin QRs
    (resize's route) instead of the whole matrix: the same kept share, rank choice and factors' product."""
    g = torch.Generator().manual_seed(3)
    width = int(np.prod(shape[1:]))
    up = torch.cat([torch.randn(shape[0], 4, generator=g) * 0.6, torch.randn(shape[0], 3, generator=g) * -0.2], 1)
    down = torch.randn(7, width, generator=g)
    whole = (up @ down).reshape(shape)
    for rank, sv_fro in ((7, 0.0), (3, 0.0), (7, 0.9)):
        from_halves = extract_layer(LowRank(up, down, shape), rank, sv_fro, clamp_quantile=1.0)
        from_whole = extract_layer(whole, rank, sv_fro, clamp_quantile=1.0)
        assert from_halves[0].shape == from_whole[0].shape and from_halves[1].shape == from_whole[1].shape
        product = [(u.reshape(shape[0], -1) @ d.reshape(d.shape[0], -1)) for d, u, _ in (from_halves, from_whole)]
        assert torch.allclose(product[0], product[1], atol=1e-4), (product[0] - product[1]).abs().max()
        assert from_halves[2] == pytest.approx(from_whole[2], abs=1e-5)
    assert not torch.allclose(product[0], whole.reshape(shape[0], -1), atol=1e-4)  # sv_fro 0.9 cut some
    exact = extract_layer(LowRank(up, down, shape), 7, clamp_quantile=1.0)
    assert torch.allclose(exact[1].reshape(shape[0], -1) @ exact[0].reshape(7, -1), up @ down, atol=1e-4)
    assert extract_layer(LowRank(up, torch.zeros_like(down), shape), 4) is None  # a zero half
    cancelled = LowRank(torch.cat([up, -up], 1), torch.cat([down, down]), shape)  # <lora:a:1> <lora:a:-1>
    assert extract_layer(cancelled, 4) is None


def _loha_file(pipe, seed: int) -> dict[str, torch.Tensor]:
    """A LoHa (LyCORIS) on the UNet attention layers `make_layers` gives: rank-2 Hadamard halves, alpha 2."""
    lora = kohya_file(pipe, make_layers(pipe, rank=2, seed=seed, convs=False, te=False))
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key in [k for k in lora if k.endswith(".lora_down.weight")]:
        stem = key.removesuffix(".lora_down.weight")
        up, down = lora[f"{stem}.lora_up.weight"], lora[key]
        out |= {f"{stem}.hada_w1_a": up, f"{stem}.hada_w1_b": down, f"{stem}.alpha": lora[f"{stem}.alpha"]}
        out |= {
            f"{stem}.hada_w2_a": torch.randn(up.shape, generator=g),
            f"{stem}.hada_w2_b": torch.randn(down.shape, generator=g) * 0.5,
        }
    return out


def test_loras_merged_with_a_loha_on_the_same_layers_apply_as_both_tags(own):  # noqa: F811
    """Where another kind (here a LoHa) shares a layer with a LoRA, that layer's whole change is cut instead; the
    others still come from the LoRA's halves; at a rank that holds both, the one file is the two tags."""
    model = own.models.get()
    save_file(kohya_file(model.pipe, make_layers(model.pipe, seed=21)), str(own.settings.lora_dir / "zqc.safetensors"))
    save_file(_loha_file(model.pipe, 22), str(own.settings.lora_dir / "zqh.safetensors"))
    tags = "<lora:zqc:0.7> <lora:zqh:0.5>"
    options = ExtractOptions(rank=8, clamp_quantile=1.0, save_precision="fp32")
    _, report = own.merge_to_lora(tags, "zqch", options)  # LoRA rank 4 + LoHa rank <= 2 x 2
    assert report.kept_min > 0.99999
    both = pixels(gen(own, f"a red circle {tags}"))
    assert np.abs(both - pixels(gen(own, "a red circle <lora:zqh:0.5>"))).max() > 10  # the LoRA counts
    assert np.abs(pixels(gen(own, "a red circle <lora:zqch:1>")) - both).max() <= 1
    with pytest.raises(UserError, match="cancel out"):
        own.merge_to_lora("<lora:zqc:1> <lora:zqc:-1>", "zqcancel", options)
    assert not (own.settings.lora_dir / "zqcancel.safetensors").exists()
