"""kohya's regularization options for LoRA, LoHa and LoKr training.

- `scale_weight_norms` (max-norm): after every step, no layer's update (as the file applies it) has a norm above the
  limit; the limit really binds; a resumed run ends on the same file.
- `network_dropout`, `rank_dropout`, `module_dropout`: they act in the training forward only, as kohya's do; a run
  with them resumes bit-identical (the loop replays the random numbers); they are recorded as kohya records them.

Bad values are refused before anything starts."""

from __future__ import annotations

import json
import re

import pytest
import torch

from app.errors import UserError
from app.lora.files import read_lora_file
from app.training.config import LoraNetwork
from app.training.lora_target import NetworkDropout, _dropped
from tests.test_lora_training import clean, dataset, lora_cfg, tensors  # noqa: F401 - `dataset` is a fixture


def update_norms(path) -> dict[str, float]:
    """Each layer's update norm as a reader applies the file (alpha / rank included)."""
    return {name: float(layer.delta(torch.device("cpu")).norm()) for name, layer in read_lora_file(path).layers.items()}


@pytest.mark.parametrize("network_type", ["lora", "loha", "lokr"])
def test_every_layers_update_stays_under_the_limit_and_resume_is_exact(services, dataset, network_type):  # noqa: F811
    name = f"zqmaxnorm{network_type}"
    run = dict(steps=4, seed=2, learn_rate="0.02", save_precision="fp32")
    clean(services, name)
    free = services.training.train_lora(
        lora_cfg(name, dataset, **run), LoraNetwork(rank=4, alpha=4.0, network_type=network_type)
    ).wait()
    assert free.error is None
    unlimited = update_norms(free.path)
    limit = 0.3 * max(unlimited.values())  # below what the largest layers reach without it

    clean(services, name)
    job = services.training.train_lora(
        lora_cfg(name, dataset, **run),
        LoraNetwork(rank=4, alpha=4.0, network_type=network_type, scale_weight_norms=limit),
    )
    result = job.wait()
    assert result.error is None and result.step == 4
    limited = update_norms(result.path)
    assert max(limited.values()) <= limit * (1 + 1e-5)
    assert sum(abs(n - limit) < 1e-4 * limit for n in limited.values()) >= 1  # held at the limit, not just under
    assert sum(n > limit for n in unlimited.values()) >= 1
    scaled = re.search(r"keys scaled: (\d+), average key norm: ([\d.]+)", job.progress.text)
    assert scaled and int(scaled.group(1)) >= 1, job.progress.text
    assert abs(float(scaled.group(2)) - sum(limited.values()) / len(limited)) < 1e-3
    data, meta = tensors(result.path)
    assert meta["ss_scale_weight_norms"] == str(limit)

    # interrupted after 2 steps and continued: the same file, bit for bit
    clean(services, name)
    first = services.training.train_lora(
        lora_cfg(name, dataset, **{**run, "steps": 2}),
        LoraNetwork(rank=4, alpha=4.0, network_type=network_type, scale_weight_norms=limit),
    )
    assert first.wait().step == 2
    again = services.training.train_lora(
        lora_cfg(name, dataset, **run), LoraNetwork(rank=4, alpha=4.0, scale_weight_norms=limit)
    ).wait()
    assert again.step == 4
    resumed, _ = tensors(again.path)
    assert resumed.keys() == data.keys() and all(torch.equal(resumed[k], data[k]) for k in data)
    clean(services, name)


@pytest.mark.parametrize("value", [-1, float("nan"), float("inf"), 5000, "x"])
def test_bad_scale_weight_norms_are_refused_before_anything_starts(services, dataset, value):  # noqa: F811
    with pytest.raises(UserError, match="Scale weight norms") as caught:
        services.training.train_lora(
            lora_cfg("zqbadnorm", dataset), LoraNetwork(rank=4, alpha=4.0, scale_weight_norms=value)
        )
    assert caught.value.field == "scale_weight_norms"
    assert not (services.settings.lora_dir / "zqbadnorm.safetensors").exists()


def test_all_off_by_default_and_off_is_written_as_kohya_writes_it(services, dataset):  # noqa: F811
    clean(services, "zqnonorm")
    job = services.training.train_lora(lora_cfg("zqnonorm", dataset, steps=1), LoraNetwork(rank=4, alpha=4.0))
    result = job.wait()
    assert result.error is None and "keys scaled" not in job.progress.text
    meta = tensors(result.path)[1]
    assert meta["ss_scale_weight_norms"] == meta["ss_network_dropout"] == "None"
    assert "ss_network_args" not in meta
    clean(services, "zqnonorm")


def test_each_dropout_drops_what_kohya_drops():
    """On a down projection's output: elements (network), whole ranks of a sample (rank, the rest scaled up by
    1 / (1 - p)), or the whole output (module)."""
    torch.manual_seed(0)
    tokens = torch.ones(4, 10, 8)  # [batch, tokens, rank]: a Linear's
    kept = _dropped(NetworkDropout(network=0.5), tokens)
    assert set(kept.unique().tolist()) == {0.0, 2.0} and 0.3 < float((kept == 0).float().mean()) < 0.7
    by_rank = _dropped(NetworkDropout(rank=0.5), tokens)
    assert set(by_rank.unique().tolist()) == {0.0, 2.0}
    assert torch.equal(by_rank, by_rank[:, :1].expand_as(by_rank))  # a rank is dropped for all of a sample's tokens
    assert not torch.equal(by_rank[0], by_rank[1]) or not torch.equal(by_rank[1], by_rank[2])  # per sample
    channels = torch.ones(4, 8, 3, 3)  # [batch, rank, h, w]: a convolution's
    by_channel = _dropped(NetworkDropout(rank=0.5), channels)
    assert torch.equal(by_channel, by_channel[:, :, :1, :1].expand_as(by_channel))
    skipped = [bool((_dropped(NetworkDropout(module=0.5), tokens) == 0).all()) for _ in range(200)]
    assert 60 < sum(skipped) < 140  # about half of the forwards
    assert torch.equal(_dropped(NetworkDropout(), tokens), tokens)


@pytest.mark.parametrize(
    ("network_type", "dropouts"),
    [
        ("lora", dict(network_dropout=0.1, rank_dropout=0.2, module_dropout=0.1)),
        ("loha", dict(rank_dropout=0.2, module_dropout=0.1)),
    ],
)
def test_a_run_with_dropouts_differs_records_them_and_resumes_bit_identical(services, dataset, network_type, dropouts):  # noqa: F811
    name = f"zqdrop{network_type}"
    run = dict(steps=4, seed=2, learn_rate="0.01", save_precision="fp32")
    clean(services, name)
    plain = services.training.train_lora(
        lora_cfg(name, dataset, **run), LoraNetwork(rank=4, alpha=4.0, network_type=network_type)
    ).wait()
    assert plain.error is None
    without, _ = tensors(plain.path)
    clean(services, name)
    network = LoraNetwork(rank=4, alpha=4.0, network_type=network_type, **dropouts)
    result = services.training.train_lora(lora_cfg(name, dataset, **run), network).wait()
    assert result.error is None and result.step == 4
    data, meta = tensors(result.path)
    assert data.keys() == without.keys() and any(not torch.equal(data[k], without[k]) for k in data)
    assert meta["ss_network_dropout"] == str(dropouts.get("network_dropout") or None)
    args = json.loads(meta["ss_network_args"])
    assert (args["rank_dropout"], args["module_dropout"]) == (
        str(dropouts["rank_dropout"]),
        str(dropouts["module_dropout"]),
    )

    clean(services, name)  # interrupted after 2 steps and continued: the same file, bit for bit
    first = services.training.train_lora(lora_cfg(name, dataset, **{**run, "steps": 2}), network)
    assert first.wait().step == 2
    again = services.training.train_lora(
        lora_cfg(name, dataset, **run), LoraNetwork(rank=4, alpha=4.0, **dropouts)
    ).wait()
    assert again.step == 4
    resumed, resumed_meta = tensors(again.path)
    assert all(torch.equal(resumed[k], data[k]) for k in data)
    assert json.loads(resumed_meta["ss_network_args"]) == args
    clean(services, name)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(network_dropout=1.0), "network_dropout"),
        (dict(rank_dropout=-0.1), "rank_dropout"),
        (dict(module_dropout=float("nan")), "module_dropout"),
        (dict(network_dropout="lots"), "network_dropout"),
        (dict(network_dropout=0.1, network_type="lokr"), "network_dropout"),  # LoHa/LoKr: rank and module only
    ],
)
def test_bad_dropouts_are_refused_before_anything_starts(services, dataset, kwargs, field):  # noqa: F811
    with pytest.raises(UserError) as caught:
        services.training.train_lora(lora_cfg("zqbaddrop", dataset), LoraNetwork(rank=4, alpha=4.0, **kwargs))
    assert caught.value.field == field, caught.value
    assert not (services.settings.lora_dir / "zqbaddrop.safetensors").exists()
