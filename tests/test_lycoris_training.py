"""Training LyCORIS networks (LoHa, LoKr) on the shared engine: the file means what was trained (our reader and
LyCORIS's own modules give the output the PEFT layers gave while training), it is recorded as kohya + LyCORIS
record it, a run resumes bit for bit, and a LyCORIS-made file is continued."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from lycoris import LycorisNetwork, create_lycoris_from_weights
from safetensors.torch import save_file

from app.errors import UserError
from app.lora.apply import Application, lora_applied
from app.lora.files import LohaLayer, LokrLayer, bind, read_lora_file
from app.lora.names import layer_table, model_components
from app.training.config import LoraNetwork
from app.training.lora_target import LoraTarget
from tests.test_lora import gen, pixels, snapshot
from tests.test_lora_training import clean, lora_cfg, tensors
from tests.test_lycoris import UNET_BLOCKS, lycoris_network, outputs
from tests.test_training import interrupt_at, make_dataset

KIND = {"loha": LohaLayer, "lokr": LokrLayer}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("lyco-stars"))


@pytest.mark.parametrize(("network_type", "rank"), [("loha", 4), ("lokr", 2), ("lokr", 64)])
def test_the_file_means_what_was_trained(services, tmp_path, network_type, rank):
    """Random values in the trained layers (rank 64 makes LoKr's halves full matrices, which have no rank): the
    model's output with the PEFT layers in it equals the output with the saved file applied by our reader, and by
    LyCORIS's own modules (what kohya, A1111 and ComfyUI apply)."""
    model = services.models.get()
    pipe = model.pipe
    base = outputs(pipe, pipe.unet, pipe.text_encoder)
    path = tmp_path / f"zqlyt-{network_type}.safetensors"
    target = LoraTarget(path, model, rank, 2.0, True, 0, {}, None, torch.float32, 2, 1.0, network_type)
    try:
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in target.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        trained = outputs(pipe, pipe.unet, pipe.text_encoder)
        target.save(7, model)
    finally:
        target.close()
    lora = read_lora_file(path)
    assert {type(layer) for layer in lora.layers.values()} == {KIND[network_type]}
    assert any("resnets" in name for name in lora.layers) and any(n.startswith("lora_te_") for n in lora.layers)
    bound = bind(lora, layer_table(model_components(pipe)), "shapes-64")
    with lora_applied([Application(bound, 1.0, 1.0)]):
        ours = outputs(pipe, pipe.unet, pipe.text_encoder)
    for got, want, before in zip(ours, trained, base, strict=True):
        assert float((want - before).abs().max()) > 0.05
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))

    LycorisNetwork.apply_preset({"lora_prefix": "lora_unet"})  # LyCORIS reads the UNet's layers of the file
    unet_copy = copy.deepcopy(pipe.unet)
    unet_only = {k: v for k, v in tensors(path)[0].items() if k.startswith("lora_unet_")}
    network, _ = create_lycoris_from_weights(1.0, "", unet_copy, weights_sd=unet_only)
    network.apply_to()
    network.load_state_dict(unet_only, strict=False)
    context = (pipe.unet, pipe.text_encoder)
    with lora_applied([Application(bound, 0.0, 1.0)]):  # the UNet's layers alone, as LyCORIS's network has them
        ours_unet = outputs(pipe, *context)[0]
    theirs = outputs(pipe, unet_copy, pipe.text_encoder)[0]
    torch.testing.assert_close(ours_unet, theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max()))


@pytest.mark.parametrize("network_type", ["loha", "lokr"])
def test_a_lycoris_network_trains_is_recorded_and_resumes_exactly(services, dataset, network_type):
    name = f"zqlyt{network_type}"
    run = dict(steps=6, batch_size=2, seed=4)
    clean(services, name)
    model = services.models.get()
    before = snapshot(model)
    image = pixels(gen(services, "a yellow star"))
    job = services.training.train_lora(
        lora_cfg(name, dataset, **run),
        LoraNetwork(rank=4, alpha=2.0, train_text_encoder=False, conv_dim=2, conv_alpha=1.0, network_type=network_type),
    )
    result = job.wait()
    assert result.error is None and result.step == 6
    straight, meta = tensors(result.path)
    prefix = "hada_" if network_type == "loha" else "lokr_"
    assert all(k.split(".", 1)[1].startswith(prefix) or k.endswith(".alpha") for k in straight)
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["ss_network_args"]) == {"algo": network_type, "conv_dim": "2", "conv_alpha": "1.0"}
    row = next(r for r in services.loras.details() if r["name"] == name)
    assert row["usable"] and row["kind"] == {"loha": "LoHa", "lokr": "LoKr"}[network_type]
    assert snapshot(model).keys() == before.keys() and np.array_equal(pixels(gen(services, "a yellow star")), image)
    used = gen(services, f"a yellow star <lora:{name}:1>")
    assert used.notes == [] and np.abs(pixels(used) - image).max() > 0

    clean(services, name)
    first = services.training.train_lora(
        lora_cfg(name, dataset, **run),
        LoraNetwork(rank=4, alpha=2.0, train_text_encoder=False, conv_dim=2, conv_alpha=1.0, network_type=network_type),
    )
    assert interrupt_at(services, first, 2).interrupted
    # continued as what the file is, whatever the request says
    assert services.training.train_lora(lora_cfg(name, dataset, **run), LoraNetwork(rank=8, alpha=8.0)).wait().step == 6
    resumed, _ = tensors(result.path)
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_a_lokr_made_by_lycoris_is_continued(services, dataset):
    model = services.models.get()
    unet_copy = copy.deepcopy(model.pipe.unet)
    network = lycoris_network(unet_copy, UNET_BLOCKS, "lora_unet", "lokr", seed=9, linear_dim=2, linear_alpha=1)
    path = services.settings.lora_dir / "zqlytmade.safetensors"
    clean(services, "zqlytmade")
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(path), metadata={"ss_steps": "3"})
    before = read_lora_file(path)
    result = services.training.train_lora(
        lora_cfg("zqlytmade", dataset, steps=5), LoraNetwork(rank=4, alpha=4.0)
    ).wait()
    assert result.error is None and result.step == 5
    after = read_lora_file(path)
    assert after.layers.keys() == before.layers.keys()
    assert all(isinstance(layer, LokrLayer) for layer in after.layers.values())
    assert after.metadata["ss_steps"] == "5"


def test_bad_network_types_and_unsupported_files_are_refused(services, dataset):
    with pytest.raises(UserError, match="Network type must be one of lora, loha, lokr") as caught:
        services.training.train_lora(
            lora_cfg("zqlytbad", dataset),
            LoraNetwork(rank=4, alpha=4.0, train_text_encoder=False, conv_dim=0, conv_alpha=1.0, network_type="glora"),
        )
    assert caught.value.field == "network_type"
    unet_copy = copy.deepcopy(services.models.get().pipe.unet)
    tucker = lycoris_network(unet_copy, UNET_BLOCKS, "lora_unet", "loha", seed=1, conv_dim=2, use_tucker=True)
    path = services.settings.lora_dir / "zqlyttucker.safetensors"
    save_file({k: v.contiguous() for k, v in tucker.state_dict().items()}, str(path))
    with pytest.raises(UserError, match=r"holds LoHa \(with Tucker cores\) layers"):
        services.training.train_lora(lora_cfg("zqlyttucker", dataset), LoraNetwork(rank=4, alpha=4.0))
    path.unlink()


def test_a_lokr_factor_splits_the_layers_as_lycoris_does_and_a_continued_run_keeps_it(services, dataset):
    """LyCORIS's `factor`: each layer's sides split as LyCORIS's own `factorization` splits them (w1 holds the
    smaller halves), recorded in `ss_network_args`, and read back by a continued run (which ends on the file an
    uninterrupted run writes, whatever factor the request gives)."""
    from lycoris.functional import factorization

    name = "zqlytfactor"
    run = dict(steps=4, seed=4, save_precision="fp32")
    clean(services, name)
    result = services.training.train_lora(
        lora_cfg(name, dataset, **run), LoraNetwork(rank=2, alpha=1.0, network_type="lokr", lokr_factor=4)
    ).wait()
    assert result.error is None
    straight, meta = tensors(result.path)
    assert json.loads(meta["ss_network_args"]) == {"algo": "lokr", "factor": "4"}
    table = layer_table(model_components(services.models.get().pipe))
    w1 = {k.removesuffix(".lokr_w1"): v for k, v in straight.items() if k.endswith(".lokr_w1")}
    assert w1
    for layer, tensor in w1.items():
        out_dim, in_dim = table[layer].shape[:2]
        assert tuple(tensor.shape) == (factorization(out_dim, 4)[0], factorization(in_dim, 4)[0]), layer
    default = {k: v.shape for k, v in straight.items()}
    clean(services, name)
    assert (
        services.training.train_lora(
            lora_cfg(name, dataset, **run), LoraNetwork(rank=2, alpha=1.0, network_type="lokr")
        )
        .wait()
        .error
        is None
    )
    assert {k: v.shape for k, v in tensors(result.path)[0].items()} != default  # the factor changed the layout

    clean(services, name)
    first = services.training.train_lora(
        lora_cfg(name, dataset, **run), LoraNetwork(rank=2, alpha=1.0, network_type="lokr", lokr_factor=4)
    )
    assert interrupt_at(services, first, 2).interrupted
    again = services.training.train_lora(
        lora_cfg(name, dataset, **run), LoraNetwork(rank=2, alpha=1.0, lokr_factor=8)
    ).wait()
    assert again.step == 4
    resumed, _ = tensors(result.path)
    assert resumed.keys() == straight.keys() and all(torch.equal(resumed[k], straight[k]) for k in straight)
    clean(services, name)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(network_type="lokr", lokr_factor=0), "-1 \\(automatic\\) or between 1"),
        (dict(network_type="lokr", lokr_factor="x"), "whole number"),
        (dict(network_type="lora", lokr_factor=4), "applies to a LoKr"),
    ],
)
def test_bad_lokr_factors_are_refused(services, dataset, kwargs, message):
    with pytest.raises(UserError, match=message) as caught:
        services.training.train_lora(lora_cfg("zqlytbadfactor", dataset), LoraNetwork(rank=4, alpha=4.0, **kwargs))
    assert caught.value.field == "lokr_factor"
