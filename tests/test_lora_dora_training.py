"""DoRA training (LyCORIS's `dora_wd` with a magnitude per input column, the layout A1111 applies): the training
forward is LyCORIS's own for the same weights, a new file has the layout A1111, ComfyUI and LyCORIS read, resume is
exact, a LyCORIS-made per-column file continues, and a per-row one is refused with the reason."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import requests
import torch
from safetensors.torch import save_file

from app.errors import UserError
from app.lora.files import DoraLayer, read_lora_file
from app.training.config import LoraNetwork
from app.training.lora_target import LoraTarget, column_norms
from tests.test_lora import folder, gen, pixels  # noqa: F401 - `folder` is a fixture
from tests.test_lora_training import clean, lora_cfg, tensors
from tests.test_lycoris import lycoris_network
from tests.test_training import interrupt_at, make_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("dora-stars"))


def lycoris_dora(services, path, seed, **kw):
    """A LyCORIS DoRA LoRA (random weights) on a copy of the UNet's transformer blocks, saved to `path`; the copy
    runs LyCORIS's own forward."""
    unet_copy = copy.deepcopy(services.models.get().pipe.unet)
    settings = dict(linear_dim=2, linear_alpha=1, dora_wd=True, **kw)
    network = lycoris_network(unet_copy, ["Transformer2DModel"], "lora_unet", "lora", seed=seed, **settings)
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(path))
    return unet_copy


def unet_inputs(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = model.pipe.text_encoder.config.hidden_size
    return torch.randn(1, 4, 8, 8, generator=g), torch.tensor([500]), torch.randn(1, 77, width, generator=g)


def test_the_training_forward_is_lycoris_s_own_for_the_same_weights(services, folder):  # noqa: F811
    path = folder / "zqdoralyco.safetensors"
    unet_copy = lycoris_dora(services, path, seed=5, wd_on_output=False)
    existing = read_lora_file(path)
    assert existing.layers and all(
        isinstance(layer, DoraLayer) and not layer.per_output for layer in existing.layers.values()
    )
    model = services.models.get()
    x, t, cond = unet_inputs(model)
    with torch.no_grad():
        plain = model.pipe.unet(x, t, encoder_hidden_states=cond).sample
        theirs = unet_copy(x, t, encoder_hidden_states=cond).sample
    target = LoraTarget(path, model, 2, 1.0, False, 0, {}, existing)
    try:
        assert target.dora and len(target.parameters()) == 3 * len(existing.layers)  # down, up, magnitudes
        with torch.no_grad():
            ours = model.pipe.unet(x, t, encoder_hidden_states=cond).sample
    finally:
        target.close()
    assert float((theirs - plain).abs().max()) > 1e-3  # the DoRA network changes the output ...
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)  # ... and the training forward is LyCORIS's
    with torch.no_grad():
        after = model.pipe.unet(x, t, encoder_hidden_states=cond).sample
    assert torch.equal(after, plain)  # the model got its own layers back


def test_a_new_dora_lora_has_the_layout_a1111_applies_and_resumes_exactly(services, dataset):
    model = services.models.get()
    run = dict(steps=8, save_every=4, learn_rate="0.005")
    clean(services, "zqdora")
    job = services.training.train_lora(
        lora_cfg("zqdora", dataset, **run), LoraNetwork(rank=2, alpha=1.0, conv_dim=2, dora_wd=True)
    )
    result = job.wait()
    assert result.error is None and result.step == 8
    data, meta = tensors(result.path)
    straight = data
    assert meta["ss_network_module"] == "lycoris.kohya"
    args = json.loads(meta["ss_network_args"])
    assert (args["algo"], args["dora_wd"], args["wd_on_output"], args["conv_dim"]) == ("locon", "True", "False", "2")
    scales = {k: v for k, v in data.items() if k.endswith(".dora_scale")}
    downs = [k for k in data if k.endswith(".lora_down.weight")]
    assert len(scales) == len(downs) > 0
    unet = model.pipe.unet
    changed = 0
    for key, scale in scales.items():
        down = data[key.replace(".dora_scale", ".lora_down.weight")]
        conv = down.dim() == 4
        assert scale.shape == ((1, down.shape[1], 1, 1) if conv else (1, down.shape[1]))  # one per input column
        path = key.removeprefix("lora_unet_").removesuffix(".dora_scale")
        module = next(m for n, m in unet.named_modules() if n.replace(".", "_") == path)
        start = column_norms(module.weight.detach().float())  # where a new layer's magnitudes start
        changed += not torch.allclose(scale.float().reshape(-1), start, rtol=1e-3, atol=1e-3)
    assert changed > len(scales) // 2  # the magnitudes learned
    # The reader takes the file as per-column DoRA, and the tag changes the image.
    parsed = read_lora_file(result.path)
    assert all(isinstance(layer, DoraLayer) and not layer.per_output for layer in parsed.layers.values())
    assert not (pixels(gen(services, "a yellow star <lora:zqdora:1>")) == pixels(gen(services, "a yellow star"))).all()
    # Interrupted and continued, the file is the straight run's, bit for bit (fp16 file, fp32 values in .optim).
    clean(services, "zqdora")
    first = services.training.train_lora(
        lora_cfg("zqdora", dataset, **run), LoraNetwork(rank=2, alpha=1.0, conv_dim=2, dora_wd=True)
    )
    assert interrupt_at(services, first, 3).interrupted
    services.training.train_lora(
        lora_cfg("zqdora", dataset, **run), LoraNetwork(rank=2, alpha=1.0)
    ).wait()  # continues as DoRA
    resumed, _ = tensors(result.path)
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in straight)
    # The same run without DoRA learns something else.
    clean(services, "zqdora")
    services.training.train_lora(lora_cfg("zqdora", dataset, **run), LoraNetwork(rank=2, alpha=1.0, conv_dim=2)).wait()
    plain, plain_meta = tensors(result.path)
    assert not any(k.endswith(".dora_scale") for k in plain) and plain_meta["ss_network_module"] == "networks.lora"
    key = downs[0].replace("lora_down", "lora_up")
    assert not torch.equal(plain[key], straight[key])
    clean(services, "zqdora")


def test_a_lycoris_per_column_dora_file_continues(services, dataset, folder):  # noqa: F811
    path = folder / "zqdoracontinue.safetensors"
    lycoris_dora(services, path, seed=7, wd_on_output=False)
    before, _ = tensors(path)
    result = services.training.train_lora(
        lora_cfg("zqdoracontinue", dataset, steps=2), LoraNetwork(rank=4, alpha=4.0)
    ).wait()
    assert result.error is None and result.step == 2
    after, meta = tensors(path)
    assert set(before) <= set(after) and meta["ss_steps"] == "2"
    for key, value in before.items():
        if key.endswith(".dora_scale"):
            assert after[key].shape == value.shape
    assert any(not torch.equal(after[k].float(), before[k].float()) for k in before if k.endswith(".dora_scale"))
    path.with_suffix(".optim").unlink(missing_ok=True)


def test_a_per_row_dora_file_is_refused_with_the_reason(services, dataset, folder):  # noqa: F811
    path = folder / "zqdorarows.safetensors"
    lycoris_dora(services, path, seed=9, wd_on_output=True)
    before = path.read_bytes()
    with pytest.raises(UserError, match=r"has DoRA magnitudes per output row \(LyCORIS's default\); training"):
        services.training.train_lora(lora_cfg("zqdorarows", dataset, steps=2), LoraNetwork(rank=4, alpha=4.0))
    assert path.read_bytes() == before


def test_dora_through_the_api(server, dataset):
    api = server.url + "/sdapi/v1"
    body = dict(data_root=str(dataset), steps=2, training_width=64, training_height=64, create_image_every=0)
    body.update(lora_name="zqapidora", network_type="loha", rank=2, alpha=2, dora_wd=True, learn_rate="0.001")
    body["template_filename"] = "hypernetwork.txt"
    answer = requests.post(api + "/train/lora", json=body, timeout=300)
    assert answer.status_code == 200 and answer.json()["info"].endswith("error: None"), answer.text
    path = answer.json()["info"].split("filename: ")[1].split(" error: ")[0]
    data, meta = tensors(path)
    args = json.loads(meta["ss_network_args"])
    assert (args["algo"], args["dora_wd"], args["wd_on_output"]) == ("loha", "True", "False")
    scales = [v for k, v in data.items() if k.endswith(".dora_scale")]
    assert scales and all(s.shape[0] == 1 for s in scales) and any(k.endswith(".hada_w1_a") for k in data)
    assert all(isinstance(layer, DoraLayer) for layer in read_lora_file(Path(path)).layers.values())


def test_a_dora_lokr_trains_on_sdxl_with_both_text_encoders(xl, tmp_path):
    from app.lora.files import bind
    from app.lora.names import layer_table, model_components

    for suffix in (".safetensors", ".optim"):
        (xl.settings.lora_dir / f"zqxldora{suffix}").unlink(missing_ok=True)
    run = lora_cfg("zqxldora", make_dataset(tmp_path / "stars"), steps=2, learn_rate="0.002")
    result = xl.training.train_lora(
        run, LoraNetwork(rank=4, alpha=4.0, train_text_encoder=True, network_type="lokr", dora_wd=True)
    ).wait()
    assert result.error is None
    data, meta = tensors(result.path)
    scaled = {k.split("_text_model")[0] if "_text_model" in k else "lora_unet" for k in data if "dora_scale" in k}
    assert scaled == {"lora_unet", "lora_te1", "lora_te2"} and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    lora = read_lora_file(result.path)
    assert all(isinstance(layer, DoraLayer) and not layer.per_output for layer in lora.layers.values())
    bound = bind(lora, layer_table(model_components(xl.models.get().pipe)), "the loaded model")
    assert len(bound) == len(lora.layers)
    for suffix in (".safetensors", ".optim"):
        (xl.settings.lora_dir / f"zqxldora{suffix}").unlink(missing_ok=True)
