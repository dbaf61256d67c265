"""Extracting a LoRA from a fine-tuned model (LoRA tab → Extract, kohya's `extract_lora_from_models.py`): a "fine-tuned"
copy of shapes-64 with known low-rank changes in some layers, saved as a single file; the extracted LoRA on the
base model must reproduce those changes (weights and images), leave unchanged layers out, follow kohya's text
encoder threshold and clamping, and refuse what cannot give a file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from app.errors import UserError
from app.lora.extract import ExtractOptions, extract_layer, kohya_layers, quantile
from app.lora.names import TEXT_ENCODER, UNET, model_components
from app.lora.writer import kohya_name
from app.models.ldm_export import export_sd1
from app.models.manager import read_pipeline
from tests.conftest import make_data_dir
from tests.test_lora import gen, pixels

ATTN = "down_blocks.0.attentions.0"
# (component, layer, rank of the change): attention, a 1x1 proj_in, a feed-forward, a 3x3 ResNet convolution
# (only with a conv rank) and two text-encoder projections
CHANGES = [
    (UNET, f"{ATTN}.transformer_blocks.0.attn2.to_k", 2),
    (UNET, f"{ATTN}.proj_in", 2),
    (UNET, "mid_block.attentions.0.transformer_blocks.0.ff.net.2", 3),
    (UNET, "down_blocks.0.resnets.0.conv1", 2),
    (TEXT_ENCODER, "encoder.layers.0.self_attn.q_proj", 2),
    (TEXT_ENCODER, "encoder.layers.1.mlp.fc1", 1),
]


def low_rank(shape: torch.Size, rank: int, seed: int, size: float) -> torch.Tensor:
    """A change of exactly `rank` (a convolution's: of its [out, in * kh * kw] matrix), largest value `size`."""
    g = torch.Generator().manual_seed(seed)
    out, rest = shape[0], int(np.prod(shape[1:]))
    delta = torch.randn(out, rank, generator=g) @ torch.randn(rank, rest, generator=g)
    return (delta * size / delta.abs().max()).reshape(shape)


def save_tuned(own, name: str, changes: list[tuple[str, str, int]], size: float = 0.05) -> dict:
    """A copy of shapes-64 with `changes` added, as `<name>.safetensors` in the checkpoint folder; the changes."""
    pipe = read_pipeline(own.models.find("shapes-64"), torch.float32)
    parts = model_components(pipe)
    deltas = {}
    with torch.no_grad():
        for i, (component, path, rank) in enumerate(changes):
            layer = parts[component].get_submodule(path)
            deltas[(component, path)] = low_rank(layer.weight.shape, rank, seed=i, size=size)
            layer.weight += deltas[(component, path)]
    save_file(export_sd1(pipe), str(own.settings.ckpt_dir / f"{name}.safetensors"))
    own.models.refresh()
    return deltas


@pytest.fixture(scope="module")
def own(tmp_path_factory, model_store):
    from app.services import build_services
    from app.settings import Settings

    services = build_services(Settings(data_dir=make_data_dir(tmp_path_factory.mktemp("extract"), model_store)))
    services.select_checkpoint("shapes-64")
    services.settings.lora_dir.mkdir(parents=True, exist_ok=True)
    services.deltas = save_tuned(services, "tuned", CHANGES, size=0.5)
    return services


def image_on(services, checkpoint: str, back: str) -> np.ndarray:
    """The test image with `checkpoint` loaded; `back` is loaded again afterwards, whatever happens."""
    services.select_checkpoint(checkpoint)
    try:
        return pixels(gen(services, "a red circle"))
    finally:
        services.select_checkpoint(back)


def tensors(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118 (safe_open has no iteration)


def product(data: dict[str, torch.Tensor], name: str, shape: torch.Size) -> torch.Tensor:
    down, up = data[name + ".lora_down.weight"].float(), data[name + ".lora_up.weight"].float()
    scale = float(data[name + ".alpha"]) / down.shape[0]
    return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1) * scale).reshape(shape)


def test_the_extracted_lora_is_the_fine_tune(own):
    """Rank 4 >= every change's rank, no clamping, fp32: each changed layer's up @ down is its change, the other
    layers are left out, and an image with the LoRA on the base model is the fine-tuned model's image."""
    options = ExtractOptions(rank=4, conv_dim=4, clamp_quantile=1.0, save_precision="fp32")
    path, report = own.extract_lora("tuned", "", "zqexact", options)
    data, metadata = tensors(path)
    assert report.layers == len(CHANGES) and report.text_encoder
    assert report.layers + report.unchanged == 79 + 24  # kohya's LoCon layers of shapes-64's UNet, its text encoder
    assert report.kept_min > 0.99999 and report.ranks == (4, 4)
    for (component, module_path), delta in own.deltas.items():
        name = kohya_name(component, module_path)
        torch.testing.assert_close(product(data, name, delta.shape), delta, atol=2e-6, rtol=0)
    assert len([k for k in data if k.endswith(".alpha")]) == len(CHANGES)
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_base_model_version"] == "sd_v1"
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "4.0"}
    assert metadata["ss_network_train_unet_only"] == "False" and metadata["ss_output_name"] == "zqexact"
    assert "tuned" in metadata["ss_training_comment"] and metadata["ss_sd_model_name"] == "shapes-64"

    with_lora = pixels(gen(own, "a red circle <lora:zqexact:1>"))
    base = pixels(gen(own, "a red circle"))
    tuned = image_on(own, "tuned", "shapes-64")
    assert np.abs(tuned - base).max() > 20  # the fine-tune changes the image
    assert np.abs(with_lora - tuned).max() <= 1


def test_without_a_conv_rank_the_resnet_convolutions_are_left_out_and_rank_cuts(own):
    """kohya's default: no 3x3 convolutions; a rank below a change's keeps its largest part (Eckart-Young)."""
    path, report = own.extract_lora("tuned", "shapes-64", "zqrank1", ExtractOptions(rank=1, clamp_quantile=1.0))
    data, metadata = tensors(path)
    assert not any("resnets" in k for k in data)
    assert report.layers == len(CHANGES) - 1 and report.ranks == (1, 1)
    assert report.layers + report.unchanged == 48 + 24
    assert 0.3 < report.kept_min < 0.99 and json.loads(metadata["ss_network_args"]) == {}
    assert {t.dtype for k, t in data.items() if "lora_" in k and k.endswith("weight")} == {torch.float16}
    for (component, module_path), delta in own.deltas.items():
        if "resnets" in module_path:
            continue
        got = product(data, kohya_name(component, module_path), delta.shape).double()
        u, s, vh = torch.linalg.svd(delta.reshape(delta.shape[0], -1).double(), full_matrices=False)
        best = (u[:, :1] * s[:1] @ vh[:1]).reshape(delta.shape)
        torch.testing.assert_close(got, best, atol=2e-3 * float(best.abs().max()), rtol=0)  # fp16 file


def test_a_text_encoder_below_min_diff_is_left_out(own):
    """kohya's `min_diff`: a text encoder whose weights changed by at most that is rounding, not training."""
    save_tuned(own, "tuned-unet", [(UNET, f"{ATTN}.transformer_blocks.0.attn1.to_v", 2), *CHANGES[-1:]], 0.005)
    path, report = own.extract_lora("tuned-unet", "", "zqunet", ExtractOptions(rank=4))
    data, metadata = tensors(path)
    assert not report.text_encoder and abs(report.text_encoder_diff - 0.005) < 1e-4
    assert "at most 0.005, not more than the minimum change (0.01): UNet only" in report.sentence()
    assert not any(k.startswith("lora_te") for k in data) and report.layers == 1
    assert metadata["ss_network_train_unet_only"] == "True"
    _, with_te = own.extract_lora("tuned-unet", "", "zqunet-te", ExtractOptions(rank=4, min_diff=0.001))
    assert with_te.text_encoder and with_te.layers == 2
    save_tuned(own, "tuned-unet-only", [(UNET, f"{ATTN}.transformer_blocks.0.attn1.to_v", 2)])
    _, unet_only = own.extract_lora("tuned-unet-only", "", "zqunet-only", ExtractOptions(rank=4))
    assert "the text encoder is unchanged: UNet only" in unet_only.sentence()


def test_dynamic_rank_keeps_a_share_of_each_change(own):
    """`sv_fro`: each layer gets the least rank that keeps that share of its change's norm, up to the rank."""
    path, report = own.extract_lora("tuned", "", "zqdyn", ExtractOptions(rank=8, conv_dim=8, sv_fro=0.9999))
    data, metadata = tensors(path)
    ranks = {(c, p): data[kohya_name(c, p) + ".lora_down.weight"].shape[0] for c, p, _ in CHANGES}
    assert ranks == {(c, p): r for c, p, r in CHANGES}
    assert metadata["ss_network_dim"] == metadata["ss_network_alpha"] == "Dynamic"
    assert report.kept_min >= 0.9999


def test_checkpoints_are_read_in_the_precision_they_store(own):
    """Exact and lean: an fp16 file in fp16 (half the memory), an fp32 one in fp32, the loaded fp32 model as it is."""
    state = export_sd1(read_pipeline(own.models.find("tuned"), torch.float32))
    save_file({k: v.half() for k, v in state.items()}, str(own.settings.ckpt_dir / "tuned-half.safetensors"))
    own.models.refresh()
    half, full = own.models.find("tuned-half"), own.models.find("tuned")
    assert half.stores_half() and not full.stores_half()
    assert own.lora_tools._weights_of(half).unet.dtype == torch.float16
    assert own.lora_tools._weights_of(full).unet.dtype == torch.float32
    assert own.lora_tools._weights_of(own.models.find("shapes-64")) is own.models.get().pipe
    _, report = own.extract_lora("tuned-half", "", "zqhalf", ExtractOptions(rank=4, conv_dim=4))
    assert report.layers >= len(CHANGES)  # fp16 rounding of the other layers is a change too, below min_diff's


def kohya_reference(diff: torch.Tensor, rank: int, q: float) -> torch.Tensor:
    """kohya's extraction of one layer, written from its definition: up = U S, down = Vh, both clamped at the
    q-quantile of their values."""
    u, s, vh = torch.linalg.svd(diff)
    up, down = u[:, :rank] @ torch.diag(s[:rank]), vh[:rank]
    high = torch.quantile(torch.cat([up.flatten(), down.flatten()]), q)
    return up.clamp(-high, high) @ down.clamp(-high, high)


def test_clamping_and_the_balanced_halves_give_kohyas_update():
    g = torch.Generator().manual_seed(5)
    diff = torch.randn(48, 80, generator=g) ** 3 * 0.01  # heavy tails: the clamp bites
    down, up, _ = extract_layer(diff, 6, clamp_quantile=0.9)
    reference = kohya_reference(diff, 6, 0.9)
    torch.testing.assert_close(up @ down, reference, atol=1e-6, rtol=1e-4)
    unclamped = kohya_reference(diff, 6, 1.0 - 1e-9)
    assert (reference - unclamped).abs().max() > 1e-4
    assert torch.allclose(up.norm(dim=0), down.norm(dim=1), rtol=1e-4)  # equal halves: moderate fp16 values
    values = torch.randn(1001, generator=g)
    assert quantile(values, 0.99) == pytest.approx(float(torch.quantile(values, 0.99)), rel=1e-6)
    conv = torch.randn(8, 4, 3, 3, generator=g)
    down, up, _ = extract_layer(conv, 3, clamp_quantile=1.0)
    assert down.shape == (3, 4, 3, 3) and up.shape == (8, 3, 1, 1)


def test_kohyas_layers_of_an_sd2_and_an_sdxl_model():
    """SD 2's linear proj_in/proj_out and SDXL's second text encoder are covered as kohya covers them."""
    from app.lora.names import TEXT_ENCODER_2
    from app.models.default_model import build_tiny_sd2_pipeline, build_tiny_sdxl_pipeline

    sd2 = model_components(build_tiny_sd2_pipeline())
    assert isinstance(kohya_layers(UNET, sd2[UNET], False)[f"{ATTN}.proj_in"], torch.nn.Linear)
    xl = model_components(build_tiny_sdxl_pipeline())
    assert kohya_layers(TEXT_ENCODER_2, xl[TEXT_ENCODER_2], False)
    assert all("resnets" not in p for p in kohya_layers(UNET, xl[UNET], False))


@pytest.mark.parametrize(
    ("options", "field"),
    [
        (ExtractOptions(rank=0), "rank"),
        (ExtractOptions(rank=2000), "rank"),
        (ExtractOptions(conv_dim=-1), "conv_dim"),
        (ExtractOptions(sv_fro=float("nan")), "sv_fro"),
        (ExtractOptions(clamp_quantile=0), "clamp_quantile"),
        (ExtractOptions(min_diff=2), "min_diff"),
        (ExtractOptions(save_precision="fp8"), "save_precision"),
    ],
)
def test_bad_options_are_refused_before_anything_is_read(own, options, field):
    with pytest.raises(UserError) as refused:
        own.extract_lora("tuned", "", "zqbad", options)
    assert refused.value.field == field
    assert not (own.settings.lora_dir / "zqbad.safetensors").exists()


def test_what_cannot_give_a_lora_is_refused_with_the_reason(own):
    from app.models.default_model import build_tiny_sd2_pipeline
    from app.models.ldm_export import export_sd2

    def refused(tuned: str, base: str, name: str = "zqnone") -> str:
        before = sorted(own.settings.lora_dir.iterdir())
        with pytest.raises(UserError) as e:
            own.extract_lora(tuned, base, name, ExtractOptions())
        assert sorted(own.settings.lora_dir.iterdir()) == before
        return str(e.value)

    assert "pick two models" in refused("shapes-64", "")
    assert "not found" in refused("nosuchmodel", "").lower() or "no checkpoint" in refused("nosuchmodel", "").lower()
    save_file(
        export_sd1(read_pipeline(own.models.find("shapes-64"), torch.float32)),
        str(own.settings.ckpt_dir / "same.safetensors"),
    )
    save_file(export_sd2(build_tiny_sd2_pipeline()), str(own.settings.ckpt_dir / "tiny2.safetensors"))
    own.models.refresh()
    assert "no change to extract" in refused("same", "shapes-64")
    assert "laid out differently" in refused("tiny2", "shapes-64")
    (own.settings.lora_dir / "zqtaken.safetensors").write_bytes(b"")
    assert "already exists" in refused("tuned", "", "zqtaken")
    assert "usable file name" in refused("tuned", "", "a/b")


def test_an_interrupted_extraction_writes_nothing(own):
    """Interrupt between layers (the progress callback raises, as the job's interrupt check does), or a client
    that went away while the job waited in the queue: no file."""
    import threading

    from app.jobs import Interrupted

    def stop_after(done: int, total: int) -> None:
        if done == 3:
            raise Interrupted()

    with pytest.raises(Interrupted):
        own.lora_tools.extract("tuned", "", "zqstop", ExtractOptions(), progress=stop_after)
    release = threading.Event()
    own.jobs.submit("block", lambda job: release.wait(30))
    try:
        with pytest.raises(UserError, match="Interrupted; nothing was written"):
            own.extract_lora("tuned", "", "zqstop", ExtractOptions(), abandoned=lambda: True)
    finally:
        release.set()
    assert own.jobs.last.status == "interrupted"
    assert not (own.settings.lora_dir / "zqstop.safetensors").exists()


def test_the_file_loads_in_diffusers_as_it_applies_here(own):
    """diffusers' `load_lora_weights` (its kohya converter and PEFT layers) as an independent reader."""
    from app.lora.apply import Application, lora_applied
    from app.lora.files import bind, read_lora_file
    from app.lora.names import layer_table
    from tests.test_lora import unet_probe

    path, _ = own.extract_lora("tuned", "", "zqdiffusers", ExtractOptions(rank=4, conv_dim=4))
    pipe = read_pipeline(own.models.find("shapes-64"), torch.float32)
    run = unet_probe(pipe, seed=0, timestep=400)
    base = run()
    with lora_applied([Application(bind(read_lora_file(path), layer_table(model_components(pipe)), "SD 1.x"), 1, 1)]):
        ours = run()
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="x")
    theirs = run()
    assert (ours - base).abs().max() > 1e-3
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_extract_through_the_api(server):
    """`POST /sdapi/v1/extract/lora` with kohya's option names; the new file is in `/loras` at once."""
    import requests

    from app.models.default_model import build_default_pipeline

    pipe = build_default_pipeline()  # shapes-64's architecture: a checkpoint of the same family, other weights
    save_file(export_sd1(pipe), str(server.data_dir / "models" / "Stable-diffusion" / "other.safetensors"))
    url = f"{server.url}/sdapi/v1"
    assert requests.post(f"{url}/refresh-checkpoints", timeout=60).ok
    body = dict(model_tuned="other", lora_name="zqextractapi", rank=4, conv_dim=2, save_precision="bf16")
    answer = requests.post(f"{url}/extract/lora", json=body, timeout=300)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert (
        result["path"].endswith("zqextractapi.safetensors") and result["text_encoder"] and result["layers"] == 79 + 24
    )
    assert "extract lora complete" in result["info"] and result["size_mb"] > 0
    listed = {entry["name"]: entry for entry in requests.get(f"{url}/loras", timeout=60).json()}
    assert listed["zqextractapi"]["metadata"]["ss_network_dim"] == "4"
    again = requests.post(f"{url}/extract/lora", json=body, timeout=60)
    assert again.status_code == 400 and "already exists" in again.json()["detail"]
    typo = requests.post(f"{url}/extract/lora", json={**body, "lora_name": "zqtypo", "dim": 8}, timeout=60)
    assert typo.status_code == 422  # kohya's `dim` is `rank` here: a misspelt option is not silently ignored
    missing = requests.post(
        f"{url}/extract/lora", json={**body, "model_tuned": "nosuch", "lora_name": "zqm"}, timeout=60
    )
    assert missing.status_code == 404 and "nosuch" in missing.json()["detail"]


def save_tuned_xl(xl, name: str) -> None:
    """A copy of the tiny SDXL with low-rank changes in its UNet and both text encoders, as `<name>.safetensors`."""
    from app.lora.names import TEXT_ENCODER_2
    from app.models.ldm_export import export_sdxl

    pipe = read_pipeline(xl.models.find("tinyxl-folder"), torch.float32)
    parts = model_components(pipe)
    wanted = [(UNET, "attn2.to_k"), (TEXT_ENCODER, "0.self_attn.q"), (TEXT_ENCODER_2, "1.mlp.fc2")]
    with torch.no_grad():
        for i, (component, part) in enumerate(wanted):
            path = next(p for p in kohya_layers(component, parts[component], False) if part in p)
            layer = parts[component].get_submodule(path)
            layer.weight += low_rank(layer.weight.shape, 2, seed=i, size=0.5)
    save_file(export_sdxl(pipe), str(xl.settings.ckpt_dir / f"{name}.safetensors"))
    xl.models.refresh()
    xl.settings.lora_dir.mkdir(parents=True, exist_ok=True)


def test_an_sdxl_fine_tune_with_both_text_encoders(xl):
    """SDXL: the UNet and both text encoders (kohya's `lora_te1_`/`lora_te2_`); the LoRA on the base model gives
    the fine-tuned model's image."""
    save_tuned_xl(xl, "tinyxl-tuned")
    options = ExtractOptions(rank=2, clamp_quantile=1.0, save_precision="fp32")
    path, report = xl.extract_lora("tinyxl-tuned", "", "zqxl", options)
    data, metadata = tensors(path)
    assert report.layers == 3 and report.text_encoder
    assert {k.split("_text_model")[0] for k in data if k.startswith("lora_te")} == {"lora_te1", "lora_te2"}
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    with_lora = pixels(gen(xl, "a red circle <lora:zqxl:1>"))
    tuned = image_on(xl, "tinyxl-tuned", "tinyxl-folder")
    assert np.abs(with_lora - tuned).max() <= 1
    assert np.abs(tuned - pixels(gen(xl, "a red circle"))).max() > 4  # (a random tiny model: small changes)
