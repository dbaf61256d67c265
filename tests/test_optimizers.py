"""The optimizer choice (kohya's `optimizer_type` and `optimizer_args`) on the real tiny model: each optimizer trains,
resumes bit for bit from its `.optim`, is recorded in a LoRA's `ss_optimizer`; a bad name or argument is refused
before the run starts; a run continued with another optimizer starts that optimizer afresh and says so."""

from __future__ import annotations

import logging
import math

import pytest
import requests
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from app.errors import UserError
from app.training.config import LoraNetwork
from app.training.optimizers import OPTIMIZERS, check_optimizer, optimizer_name, parse_optimizer_args
from tests.test_lora_training import clean, lora_cfg, tensors
from tests.test_training import cfg, fresh, interrupt_at, make_dataset, vectors

RATES = {"AdamW": "0.001", "Prodigy": "1", "Lion": "0.0003", "Adafactor": "0.001"}  # each one's usual scale


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("optim-stars"))


def test_optimizer_arguments_are_kohya_s_key_value_pairs():
    text = "d_coef=2 safeguard_warmup=True betas=(0.9, 0.99),weight_decay=1e-2 mode=fast"
    assert parse_optimizer_args(text) == {
        "d_coef": 2,
        "safeguard_warmup": True,
        "betas": (0.9, 0.99),  # commas inside brackets belong to the value
        "weight_decay": 0.01,
        "mode": "fast",  # not a Python literal: text
    }
    assert parse_optimizer_args("") == parse_optimizer_args("  ") == {}
    for bad in ("d_coef", "=2", "2=d_coef", "d_coef=nan"):
        with pytest.raises(UserError) as caught:
            parse_optimizer_args(bad)
        assert caught.value.field == "optimizer_args"
    assert optimizer_name("prodigy") == "Prodigy" and optimizer_name("") == "AdamW"
    with pytest.raises(UserError, match="Optimizer must be one of AdamW, Prodigy, Lion, Adafactor") as caught:
        optimizer_name("Nadam")
    assert caught.value.field == "optimizer_type"


values = st.one_of(
    st.integers(-1000, 1000),
    st.floats(allow_nan=False, allow_infinity=False, width=32),
    st.booleans(),
    st.tuples(st.floats(0, 1, width=32), st.floats(0, 1, width=32)),
)


@given(st.dictionaries(st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True), values, max_size=5))
def test_any_arguments_written_as_key_value_read_back(args):
    text = " ".join(f"{k}={v!r}" for k, v in args.items())
    assert parse_optimizer_args(text) == args


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_each_optimizer_trains_a_lora_resumes_exactly_and_is_recorded(services, dataset, name):
    run = dict(steps=6, optimizer_type=name, learn_rate=RATES[name])
    lora = f"zqopt{name.lower()}"
    clean(services, lora)
    result = services.training.train_lora(lora_cfg(lora, dataset, **run), LoraNetwork(rank=4, alpha=4.0)).wait()
    assert result.error is None and result.step == 6
    straight, meta = tensors(result.path)
    ups = [v for k, v in straight.items() if k.endswith("lora_up.weight")]
    assert any(float(v.abs().max()) > 0 for v in ups)  # the up weights start at zero: it learned something
    assert all(math.isfinite(float(v.float().abs().max())) for v in straight.values())
    assert meta["ss_optimizer"].endswith(f".{name}")  # kohya's module.Class
    stored = torch.load(result.path.with_suffix(".optim"), weights_only=True)
    assert stored["optimizer_type"] == name

    clean(services, lora)
    first = interrupt_at(
        services, services.training.train_lora(lora_cfg(lora, dataset, **run), LoraNetwork(rank=4, alpha=4.0)), 2
    )
    assert first.interrupted and first.step < 6
    assert services.training.train_lora(lora_cfg(lora, dataset, **run), LoraNetwork(rank=4, alpha=4.0)).wait().step == 6
    resumed, _ = tensors(result.path)
    assert all(torch.equal(resumed[k], v) for k, v in straight.items()), name


def test_the_optimizers_learn_differently(services, dataset):
    finals = {}
    for name in ("AdamW", "Lion"):
        clean(services, "zqoptdiff")
        run = dict(steps=4, optimizer_type=name, learn_rate="0.001")
        path = (
            services.training.train_lora(lora_cfg("zqoptdiff", dataset, **run), LoraNetwork(rank=4, alpha=4.0))
            .wait()
            .path
        )
        finals[name] = tensors(path)[0]
    assert any(not torch.equal(finals["AdamW"][k], v) for k, v in finals["Lion"].items())


def test_an_embedding_trains_with_prodigy_at_rate_1(services, dataset):
    path = fresh(services, "zqoptemb")
    before = vectors(path).clone()
    result = services.training.train_embedding(
        cfg("zqoptemb", dataset, steps=5, optimizer_type="Prodigy", learn_rate="1")
    ).wait()
    assert result.error is None and result.step == 5
    after = vectors(path)
    assert torch.isfinite(after).all() and not torch.equal(after, before)


def test_continuing_with_another_optimizer_starts_its_state_afresh_and_says_so(services, dataset, caplog):
    clean(services, "zqoptswitch")
    services.training.train_lora(lora_cfg("zqoptswitch", dataset, steps=2), LoraNetwork(rank=4, alpha=4.0)).wait()
    with caplog.at_level(logging.WARNING):
        result = services.training.train_lora(
            lora_cfg("zqoptswitch", dataset, steps=4, optimizer_type="Prodigy", learn_rate="1"),
            LoraNetwork(rank=4, alpha=4.0),
        ).wait()
    assert result.error is None and result.step == 4
    assert "was trained with AdamW; continuing with Prodigy, whose state starts afresh" in caplog.text
    assert torch.load(result.path.with_suffix(".optim"), weights_only=True)["optimizer_type"] == "Prodigy"


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        (dict(optimizer_type="Nadam"), "optimizer_type", "Optimizer must be one of"),
        (dict(optimizer_args="d_coef=2"), "optimizer_args", "AdamW refused the optimizer arguments: .*d_coef"),
        (dict(optimizer_type="Lion", optimizer_args="betas=5"), "optimizer_args", "Lion refused"),
        (dict(optimizer_args="lr"), "optimizer_args", "key=value pairs"),
        (dict(optimizer_type="Prodigy", optimizer_args="d_coef=abc"), "optimizer_args", "Prodigy refused"),
        (dict(optimizer_args="eps=-1e30"), "optimizer_args", "NaN or infinity|refused"),
        (
            dict(optimizer_type="Prodigy", learn_rate="1", text_encoder_lr="0.5"),
            "text_encoder_lr",
            "Prodigy finds one step size",
        ),
    ],
)
def test_bad_optimizer_settings_are_refused_before_anything_starts(services, dataset, change, field, message):
    clean(services, "zqoptbad")
    with pytest.raises(UserError, match=message) as caught:
        services.training.train_lora(
            lora_cfg("zqoptbad", dataset, **change), LoraNetwork(rank=4, alpha=4.0, train_text_encoder=True)
        )
    assert caught.value.field == field
    assert not (services.settings.lora_dir / "zqoptbad.safetensors").exists()


def test_the_optimizer_through_the_api(server, dataset):
    api = server.url + "/sdapi/v1"
    body = dict(data_root=str(dataset), steps=2, training_width=64, training_height=64, create_image_every=0)
    body.update(lora_name="zqapiopt", rank=2, alpha=2, optimizer_type="Prodigy", learn_rate=1)
    body["optimizer_args"] = "d_coef=0.5 safeguard_warmup=True"
    answer = requests.post(api + "/train/lora", json=body, timeout=300)
    assert answer.status_code == 200 and answer.json()["info"].endswith("error: None"), answer.text
    path = answer.json()["info"].split("filename: ")[1].split(" error: ")[0]
    assert tensors(path)[1]["ss_optimizer"] == "prodigyopt.prodigy.Prodigy(d_coef=0.5,safeguard_warmup=True)"
    bad = requests.post(api + "/train/lora", json={**body, "optimizer_type": "Nadam"}, timeout=30)
    assert bad.status_code == 400 and bad.json()["field"] == "optimizer_type"


ARG_NAMES = ["betas", "eps", "weight_decay", "d_coef", "d0", "growth_rate", "beta3", "safeguard_warmup", "decouple"]
ARG_NAMES += ["use_bias_correction", "slice_p", "beta2_decay", "d", "maximize", "foreach", "amsgrad", "lr", "x"]
arg_values = st.recursive(
    st.one_of(
        st.integers(),
        st.integers(min_value=10**30, max_value=10**400),
        st.floats(),
        st.booleans(),
        st.none(),
        st.text(alphabet="abc01.-", max_size=5),
    ),
    lambda inner: st.tuples(inner) | st.tuples(inner, inner) | st.tuples(inner, inner, inner),
    max_leaves=4,
)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(list(OPTIMIZERS)), st.dictionaries(st.sampled_from(ARG_NAMES), arg_values, max_size=3))
def test_any_optimizer_arguments_are_taken_or_refused_with_a_reason(name, args):
    """Whatever a user types as arguments (wrong types, short tuples, huge ints, NaN): the optimizer is made and
    steps, or the run is refused with a UserError naming the field; never another exception (once a 500)."""
    text = " ".join(f"{k}={v!r}" for k, v in args.items())
    try:
        check_optimizer(name, text)
    except UserError as e:
        assert e.field == "optimizer_args"
