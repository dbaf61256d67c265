"""LoRA training on the shared engine: a kohya file with `ss_` metadata that our reader, diffusers'
`load_lora_weights` and the prompt tag use; lossless resume; the model gets its own modules back."""

from __future__ import annotations

import hashlib
import json
import logging

import numpy as np
import pytest
import requests
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open

from app.errors import UserError
from app.lora.files import read_lora_file
from app.training.checkpoint import fit_param_groups
from app.training.config import LoraNetwork
from tests.test_lora import gen, pixels, snapshot, unet_probe
from tests.test_training import cfg, make_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("lora-stars"))


def lora_cfg(name, dataset, **kw):
    base = dict(template_filename="hypernetwork.txt", learn_rate="0.001")
    base.update(kw)
    return cfg(name, dataset, **base)


def clean(services, name):
    for suffix in (".safetensors", ".optim", ".json"):
        (services.settings.lora_dir / f"{name}{suffix}").unlink(missing_ok=True)


def tensors(path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118


def test_new_lora_is_a_kohya_file_the_tag_uses_and_the_model_is_restored(services, dataset):
    clean(services, "zqtrain")
    model = services.models.get()
    before = snapshot(model)
    base = pixels(gen(services, "a yellow star"))
    result = services.training.train_lora(
        lora_cfg("zqtrain", dataset, steps=6, save_every=3), LoraNetwork(rank=4, alpha=2.0)
    ).wait()
    assert result.error is None and result.step == 6
    path = services.settings.lora_dir / "zqtrain.safetensors"
    data, meta = tensors(path)
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in data
    assert not any(k.startswith("lora_te_") for k in data)
    # shared as LoRAs are, in fp16 (half the size; the fp32 values stay in .optim for resume), alpha as a float
    assert all(v.dtype == (torch.float32 if k.endswith(".alpha") else torch.float16) for k, v in data.items())
    assert data["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight"].shape[0] == 4
    assert meta["ss_steps"] == "6" and meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_resolution"] == "(64, 64)"
    assert meta["ss_sd_model_hash"] == model.info.short_hash and meta["ss_output_name"] == "zqtrain"
    # kohya's training tags (A1111's metadata editor shows them) and hash of the tensor data, as A1111 computes it
    assert json.loads(meta["ss_tag_frequency"]) == {dataset.name: {"a yellow star": 4}}
    assert json.loads(meta["ss_dataset_dirs"]) == {dataset.name: {"n_repeats": 1, "img_count": 4}}
    raw = path.read_bytes()
    assert meta["sshs_model_hash"] == hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little") :]).hexdigest()
    assert (result.log_dir / "loras" / "zqtrain-3.safetensors").is_file()
    assert (result.log_dir / "lora_loss.csv").is_file()
    # The model is exactly what it was: no PEFT wrappers left, same tensors, same image.
    assert not any(isinstance(m, BaseTunerLayer) for m in model.pipe.unet.modules())
    assert snapshot(model).keys() == before.keys()
    assert np.array_equal(pixels(gen(services, "a yellow star")), base)
    row = next(r for r in services.loras.details() if r["name"] == "zqtrain")
    assert row["usable"] is True
    used = gen(services, "a yellow star <lora:zqtrain:1>")
    assert used.notes == [] and np.abs(pixels(used) - base).max() > 0


def test_resume_ends_bit_identical_to_a_straight_run(services, dataset):
    clean(services, "zqstraight")
    clean(services, "zqresumed")
    settings = dict(steps=6, batch_size=2, seed=5)
    straight = services.training.train_lora(
        lora_cfg("zqstraight", dataset, **settings), LoraNetwork(rank=4, alpha=4.0, train_text_encoder=True)
    ).wait()
    assert straight.error is None
    first = services.training.train_lora(
        lora_cfg("zqresumed", dataset, **{**settings, "steps": 3}),
        LoraNetwork(rank=4, alpha=4.0, train_text_encoder=True),
    )
    assert first.wait().step == 3
    # Rank and alpha of the request are ignored when continuing: the file's own are used.
    rest = services.training.train_lora(
        lora_cfg("zqresumed", dataset, **settings), LoraNetwork(rank=16, alpha=1.0, train_text_encoder=False)
    ).wait()
    assert rest.error is None and rest.step == 6
    a, meta_a = tensors(services.settings.lora_dir / "zqstraight.safetensors")
    b, meta_b = tensors(services.settings.lora_dir / "zqresumed.safetensors")
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in a)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert meta_a["ss_steps"] == meta_b["ss_steps"] == "6"
    # the files are fp16; the fp32 values the runs ended on (kept in .optim) are equal too, so the resumed run
    # continued from its fp32 values, not from the file's rounded ones
    optims = [
        torch.load(services.settings.lora_dir / f"{n}.optim", weights_only=True) for n in ("zqstraight", "zqresumed")
    ]
    masters = [o["master_weights"] for o in optims]
    assert len(masters[0]) == len(masters[1]) > 0 and all(m.dtype == torch.float32 for m in masters[0])
    assert all(torch.equal(x, y) for x, y in zip(*masters, strict=True))
    assert any(not torch.equal(m.half().float(), m) for m in masters[0])  # fp16 would have lost something


def test_save_precision_is_asked_or_kept_and_a_continued_run_still_resumes(services, dataset, caplog):
    for name, asked, dtype in (("zqfp32", "fp32", torch.float32), ("zqbf16", "bf16", torch.bfloat16)):
        clean(services, name)
        first = services.training.train_lora(
            lora_cfg(name, dataset, steps=2, save_precision=asked), LoraNetwork(rank=4, alpha=4.0)
        ).wait()
        assert first.error is None
        path = services.settings.lora_dir / f"{name}.safetensors"
        assert {v.dtype for k, v in tensors(path)[0].items() if not k.endswith(".alpha")} == {dtype}
        # continued with the default: the file keeps its precision, and its .optim is taken (no fresh optimizer)
        caplog.clear()
        with caplog.at_level(logging.INFO):
            again = services.training.train_lora(
                lora_cfg(name, dataset, steps=4), LoraNetwork(rank=4, alpha=4.0)
            ).wait()
        assert again.error is None and again.step == 4
        assert {v.dtype for k, v in tensors(path)[0].items() if not k.endswith(".alpha")} == {dtype}
        assert "Ignoring" not in caplog.text and f"Resuming lora '{name}' at step 2" in caplog.text
    with pytest.raises(UserError, match="Save precision must be one of fp16, bf16, fp32"):
        services.training.train_lora(
            lora_cfg("zqfp8", dataset, steps=2, save_precision="fp8"), LoraNetwork(rank=4, alpha=4.0)
        )


def test_the_text_encoder_has_its_own_learning_rate(services, dataset):
    clean(services, "zqtelr")
    run = lora_cfg("zqtelr", dataset, steps=3, text_encoder_lr="0", save_precision="fp32")
    result = services.training.train_lora(run, LoraNetwork(rank=4, alpha=4.0, train_text_encoder=True)).wait()
    assert result.error is None
    data, meta = tensors(services.settings.lora_dir / "zqtelr.safetensors")
    ups = {k: v for k, v in data.items() if k.endswith("lora_up.weight")}
    # the up halves start at zero: at rate 0 the text encoder's stay there, the UNet's move
    assert all(not v.any() for k, v in ups.items() if k.startswith("lora_te_"))
    assert any(v.any() for k, v in ups.items() if k.startswith("lora_unet_"))
    assert meta["ss_text_encoder_lr"] == "0" and meta["ss_unet_lr"] == meta["ss_learning_rate"]
    optim = torch.load(services.settings.lora_dir / "zqtelr.optim", weights_only=True)
    assert [g["lr"] for g in optim["optimizer_state_dict"]["param_groups"]][1] == 0.0


def test_a_single_group_optimizer_state_splits_into_the_run_s_groups():
    state = {"state": {0: "a", 1: "b", 2: "c"}, "param_groups": [{"lr": 1.0, "params": [0, 1, 2]}]}
    split = fit_param_groups(state, [2, 1])
    assert split["param_groups"] == [{"lr": 1.0, "params": [0, 1]}, {"lr": 1.0, "params": [2]}]
    assert split["state"] is state["state"]
    assert fit_param_groups(state, [3]) is state and fit_param_groups(state, [1, 1]) is state


def test_diffusers_loads_the_trained_file_with_the_same_result(services, dataset):
    from diffusers import StableDiffusionPipeline

    from app.lora.apply import Application, lora_applied
    from app.lora.files import bind
    from app.lora.names import layer_table, model_components
    from app.models.default_model import build_default_pipeline

    clean(services, "zqdiff")
    assert (
        services.training.train_lora(lora_cfg("zqdiff", dataset, steps=4), LoraNetwork(rank=4, alpha=8.0)).wait().error
        is None
    )
    path = services.settings.lora_dir / "zqdiff.safetensors"
    pipe = build_default_pipeline()  # same layout as the default model, its own copy for diffusers to change
    run = unet_probe(pipe, seed=0, timestep=400)
    base = run()
    bound = bind(read_lora_file(path), layer_table(model_components(pipe)), "SD 1.x")
    with lora_applied([Application(bound, 1.0, 1.0)]):
        ours = run()
    assert isinstance(pipe, StableDiffusionPipeline)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="t")
    theirs = run()
    assert (ours - base).abs().max() > 1e-4
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("rank", "alpha", "name", "word"),
    [
        (0, 4, "zqbad", "Rank"),
        (2000, 4, "zqbad", "Rank"),
        (4, -1, "zqbad", "Alpha"),
        (4, float("nan"), "zqbad", "Alpha"),
        (4, 4, "///", "no usable characters"),
    ],
)
def test_bad_settings_are_refused_before_anything_runs(services, dataset, rank, alpha, name, word):
    with pytest.raises(UserError, match=word):
        services.training.train_lora(lora_cfg(name, dataset), LoraNetwork(rank=rank, alpha=alpha))
    assert not (services.settings.lora_dir / "zqbad.safetensors").exists()


def test_a_foreign_file_cannot_be_continued(services, dataset):
    folder = services.settings.lora_dir
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "zqforeign.safetensors").write_bytes(b"garbage")
    try:
        with pytest.raises(UserError, match="cannot be continued"):
            services.training.train_lora(lora_cfg("zqforeign", dataset), LoraNetwork(rank=4, alpha=4))
        assert (folder / "zqforeign.safetensors").read_bytes() == b"garbage"
    finally:
        (folder / "zqforeign.safetensors").unlink()


def test_train_lora_route(server, dataset):
    api = server.url + "/sdapi/v1"
    payload = {
        "lora_name": "zqapitrain",
        "data_root": str(dataset),
        "steps": 2,
        "training_width": 64,
        "training_height": 64,
        "create_image_every": 0,
        "save_lora_every": 0,
        "rank": 2,
        "alpha": 2,
    }
    answer = requests.post(api + "/train/lora", json=payload, timeout=300)
    assert answer.status_code == 200, answer.text
    assert answer.json()["info"].endswith("error: None") and "zqapitrain.safetensors" in answer.json()["info"]
    names = [row["name"] for row in requests.get(api + "/loras", timeout=30).json()]
    assert "zqapitrain" in names
    bad = requests.post(api + "/train/lora", json={**payload, "rank": 0}, timeout=30)
    assert bad.status_code == 400 and "Rank" in bad.json()["detail"]


def test_a_locon_trains_the_resnet_convolutions_resumes_exactly_and_diffusers_loads_it(services, dataset):
    """kohya's LoCon (`conv_dim`, `conv_alpha`): the 3x3 convolutions of the ResNet blocks and the down/upsamplers
    get LoRA layers of their own rank; the file is kohya's, and diffusers reads it with the same result."""
    from app.lora.apply import Application, lora_applied
    from app.lora.files import bind
    from app.lora.names import layer_table, model_components
    from app.models.default_model import build_default_pipeline

    run = dict(steps=4, seed=2)
    clean(services, "zqlocon")
    result = services.training.train_lora(
        lora_cfg("zqlocon", dataset, **run),
        LoraNetwork(rank=4, alpha=4.0, train_text_encoder=False, conv_dim=2, conv_alpha=1.0),
    ).wait()
    assert result.error is None
    data, meta = tensors(result.path)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    down, up = data[conv + ".lora_down.weight"], data[conv + ".lora_up.weight"]
    assert down.shape[0] == 2 and tuple(down.shape[2:]) == (3, 3) and tuple(up.shape[2:]) == (1, 1)
    assert float(data[conv + ".alpha"]) == 1.0 and up.any()  # its up half started at zero: it learned
    assert any("downsamplers" in k for k in data) and any("upsamplers" in k for k in data)
    assert not any(k.startswith(("lora_unet_conv_in", "lora_unet_conv_out")) for k in data)
    assert data["lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight"].shape[0] == 4
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}

    # interrupted and continued (the file's own layers, whatever the request says), it ends on the same file
    straight = data
    clean(services, "zqlocon")
    first = services.training.train_lora(
        lora_cfg("zqlocon", dataset, **{**run, "steps": 2}),
        LoraNetwork(rank=4, alpha=4.0, train_text_encoder=False, conv_dim=2, conv_alpha=1.0),
    )
    assert first.wait().step == 2
    assert (
        services.training.train_lora(lora_cfg("zqlocon", dataset, **run), LoraNetwork(rank=8, alpha=8.0)).wait().step
        == 4
    )
    resumed, resumed_meta = tensors(result.path)
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in straight)
    assert resumed_meta["ss_network_args"] == meta["ss_network_args"]

    pipe = build_default_pipeline()
    probe = unet_probe(pipe, seed=0, timestep=400)
    base = probe()
    bound = bind(read_lora_file(result.path), layer_table(model_components(pipe)), "SD 1.x")
    with lora_applied([Application(bound, 1.0, 1.0)]):
        ours = probe()
    pipe.load_lora_weights(str(result.path.parent), weight_name=result.path.name, adapter_name="t")
    theirs = probe()
    assert (ours - base).abs().max() > 1e-4
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("conv_dim", "conv_alpha", "word"), [(-1, 1, "Conv dim"), (5000, 1, "Conv dim"), (4, 0, "Conv alpha")]
)
def test_bad_locon_settings_are_refused(services, dataset, conv_dim, conv_alpha, word):
    with pytest.raises(UserError, match=word) as caught:
        services.training.train_lora(
            lora_cfg("zqbad", dataset),
            LoraNetwork(rank=4, alpha=4.0, train_text_encoder=False, conv_dim=conv_dim, conv_alpha=conv_alpha),
        )
    assert caught.value.field == word.lower().replace(" ", "_")
    assert not (services.settings.lora_dir / "zqbad.safetensors").exists()
