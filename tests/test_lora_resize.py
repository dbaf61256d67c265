"""Resizing a LoRA to a lower rank (kohya's resize_lora): the update of each layer is the best one of the new rank
(its error is exactly the discarded singular values), at the file's own rank nothing changes, dynamic resizing
keeps the asked share of each layer's norm, the result applies as the original does, and files that cannot be
resized are refused with the reason, the original untouched."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from app.errors import NotFoundError, UserError
from app.lora.files import read_lora_file
from app.lora.resize import resize_layer
from tests.test_lora import folder, gen, kohya_file, make_layers, pixels  # noqa: F401  (folder: a fixture)


def update(down: torch.Tensor, up: torch.Tensor, alpha: float) -> torch.Tensor:
    return (up.reshape(up.shape[0], -1).double() @ down.reshape(down.shape[0], -1).double()) * alpha / down.shape[0]


@pytest.mark.parametrize("conv", [False, True])
def test_a_resized_layer_is_the_best_update_of_its_rank(conv):
    g = torch.Generator().manual_seed(1)
    shape_down, shape_up = ((16, 8, 3, 3), (12, 16, 1, 1)) if conv else ((16, 40), (24, 16))
    down, up = torch.randn(shape_down, generator=g), torch.randn(shape_up, generator=g)
    full = update(down, up, 8.0)
    singular = torch.linalg.svdvals(full)
    new_down, new_up, alpha, kept = resize_layer(down, up, 8.0, 4)
    assert new_down.shape[0] == 4 and alpha == 4.0 and new_down.ndim == down.ndim and new_up.ndim == up.ndim
    error = float(torch.linalg.norm(full - update(new_down, new_up, alpha)))
    assert error == pytest.approx(float(singular[4:].norm()), rel=1e-5)  # Eckart-Young: nothing of rank 4 is closer
    assert kept == pytest.approx(math.sqrt(float((singular[:4] ** 2).sum() / (singular**2).sum())), rel=1e-6)
    same_down, same_up, same_alpha, same_kept = resize_layer(down, up, 8.0, 16)  # the full rank: the same update
    torch.testing.assert_close(update(same_down, same_up, same_alpha), full, rtol=1e-5, atol=1e-5)
    assert same_kept == pytest.approx(1.0)


def test_dynamic_resizing_keeps_the_asked_share_with_the_least_rank():
    g = torch.Generator().manual_seed(2)
    down, up = torch.randn(32, 64, generator=g), torch.randn(64, 32, generator=g)
    down[8:] *= 0.01  # most of the update lives in 8 directions
    for keep in (0.5, 0.9, 0.99):
        new_down, _, _, kept = resize_layer(down, up, 32.0, 32, keep)
        assert kept >= keep
        if new_down.shape[0] > 1:
            _, _, _, less = resize_layer(down, up, 32.0, new_down.shape[0] - 1)
            assert less < keep  # one rank fewer would not keep it
    assert resize_layer(down, up, 32.0, 32, 0.99)[0].shape[0] <= 9


def test_resizing_a_file_applies_as_the_original_and_records_it(services, folder):  # noqa: F811
    pipe = services.models.get().pipe
    layers = make_layers(pipe, rank=8, seed=3, alpha=4.0)
    tensors = {k: v.half() if v.ndim > 0 else v for k, v in kohya_file(pipe, layers).items()}
    tensors["bundle_emb.zqword.string_to_param.*"] = torch.randn(1, 64)
    save_file(tensors, str(folder / "zqbig.safetensors"), metadata={"ss_network_dim": "8", "ss_output_name": "zqbig"})
    before = (folder / "zqbig.safetensors").read_bytes()
    path, report = services.loras.resize("zqbig", "zqbig-r8", 8)  # its own rank: unchanged
    assert report.resized == 0 and report.kept_min == 1.0
    path, report = services.loras.resize("zqbig", "zqsmall", 2)
    assert (folder / "zqbig.safetensors").read_bytes() == before  # the original is never touched
    assert path == folder / "zqsmall.safetensors" and report.new_ranks == (2, 2) and report.old_ranks == (8, 8)
    assert report.new_bytes < report.old_bytes and 0 < report.kept_min <= report.kept_mean < 1
    assert "rank 8 -> 2" in report.sentence()
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert f.get_tensor("bundle_emb.zqword.string_to_param.*").shape == (1, 64)  # kept as it was
        some_down = next(k for k in f.keys() if k.endswith(".lora_down.weight"))  # noqa: SIM118
        assert f.get_tensor(some_down).dtype == torch.float16  # the file's own precision
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_output_name"]) == ("2", "2", "zqsmall")
    assert meta["ss_training_comment"].startswith("dimension is resized from 8 to 2")
    assert read_lora_file(path).bundles  # it reads as a LoRA, bundle included
    row = next(d for d in services.loras.details() if d["name"] == "zqsmall")
    assert row["usable"], row
    # At its full rank the resized file generates what the original does; at rank 2, something close to it.
    services.loras.resize("zqbig", "zqsame", 8, keep=1.0)
    original = pixels(gen(services, "a red circle <lora:zqbig:1>"))
    assert np.abs(pixels(gen(services, "a red circle <lora:zqsame:1>")) - original).max() <= 2
    base = pixels(gen(services, "a red circle"))
    small = pixels(gen(services, "a red circle <lora:zqsmall:1>"))
    assert np.abs(small - original).mean() < np.abs(base - original).mean()


def test_what_cannot_be_resized_is_refused_with_the_reason(services, folder):  # noqa: F811
    pipe = services.models.get().pipe
    save_file(kohya_file(pipe, make_layers(pipe, seed=4)), str(folder / "zqok.safetensors"))
    cases = [
        (dict(name="nobody", new_name="x", rank=2), NotFoundError, "No LoRA named 'nobody'"),
        (dict(name="zqok", new_name="zqok", rank=2), UserError, "already exists"),
        (dict(name="zqok", new_name="../evil", rank=2), UserError, "not a usable file name"),
        (dict(name="zqok", new_name="zqnew", rank=0), UserError, "between 1 and 1024"),
        (dict(name="zqok", new_name="zqnew", rank=2, keep=1.5), UserError, "up to 1"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            services.loras.resize(**kwargs)
    hada = {
        "lora_unet_x.hada_w1_a": torch.ones(4, 2),
        "lora_unet_x.hada_w1_b": torch.ones(2, 4),
        "lora_unet_x.hada_w2_a": torch.ones(4, 2),
        "lora_unet_x.hada_w2_b": torch.ones(2, 4),
    }
    save_file(hada, str(folder / "zqhada.safetensors"))
    with pytest.raises(UserError, match="cannot be resized: it holds LoHa layers"):
        services.loras.resize("zqhada", "zqhada2", 1)
    ia3 = {"lora_unet_x.weight": torch.ones(4), "lora_unet_x.on_input": torch.tensor(0)}
    save_file(ia3, str(folder / "zqia3.safetensors"))
    with pytest.raises(UserError, match=r"cannot be resized: it holds \(IA\)³ layers"):
        services.loras.resize("zqia3", "zqia32", 1)
    (folder / "zqbroken.safetensors").write_bytes(b"\x00" * 40)
    with pytest.raises(UserError, match=r"zqbroken\.safetensors cannot be resized"):
        services.loras.resize("zqbroken", "zqbroken2", 1)
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    # nothing new, nothing changed
    assert names == ["zqbroken.safetensors", "zqhada.safetensors", "zqia3.safetensors", "zqok.safetensors"]


def test_a_pickled_lora_with_shared_tensors_resizes_to_safetensors(services, folder):  # noqa: F811
    pipe = services.models.get().pipe
    tensors = kohya_file(pipe, make_layers(pipe, rank=4, seed=6, te=False, convs=False))
    shared_alpha = torch.tensor(4.0)
    for key in [k for k in tensors if k.endswith(".alpha")]:
        tensors[key] = shared_alpha  # one tensor under many names: a pickle keeps that, safetensors refuses it
    torch.save(tensors, folder / "zqpickle.pt")
    path, report = services.loras.resize("zqpickle", "zqpickle-r8", 8)  # nothing to cut: the tensors as they are
    assert path.suffix == ".safetensors" and report.resized == 0
    assert read_lora_file(path).layers
