"""Hypernetworks: A1111's file layout read and written, the forward against a hand-written reference, use in
prompts, bad files and tags, and training on the shared engine."""

from __future__ import annotations

import hashlib
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from app.errors import UserError
from app.generation.txt2img import Txt2ImgParams
from app.hypernetworks.attention import HypernetworkStack, attention_widths, install
from app.hypernetworks.files import read_hypernetwork_file, save_hypernetwork
from app.hypernetworks.hypernetwork import Hypernetwork, HypernetworkFormatError
from app.training.config import TrainConfig
from tests.test_training import make_dataset

W = 64  # the tiny model's cross-attention context width (its self-attention widths are 32 and 64)


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.1


def a1111_module_state(width, keys_shapes, seed):
    """A state dict built by hand from a list of (key, shape) pairs, as A1111 names them."""
    return OrderedDict((key, rand(*shape, seed=seed + i)) for i, (key, shape) in enumerate(keys_shapes))


# Layouts from formats.md: [1, 2, 1], relu, layer norm, dropout [0, 0.3, 0]: Linear(0), ReLU(1), LN(2), Dropout(3),
# Linear(4), LN(5).
LN_RELU_DROPOUT = [
    ("linear.0.weight", (2 * W, W)),
    ("linear.0.bias", (2 * W,)),
    ("linear.2.weight", (2 * W,)),
    ("linear.2.bias", (2 * W,)),
    ("linear.4.weight", (W, 2 * W)),
    ("linear.4.bias", (W,)),
    ("linear.5.weight", (W,)),
    ("linear.5.bias", (W,)),
]


def reference_forward(state, x, activation, layer_norm, activate_output, multiplier):
    """x + mlp(x) * multiplier, written out by hand from the A1111 layout."""
    linears = sorted({int(k.split(".")[1]) for k in state if k.endswith("weight") and state[k].ndim == 2})
    h = x
    for n, index in enumerate(linears):
        h = F.linear(h, state[f"linear.{index}.weight"], state[f"linear.{index}.bias"])
        last = n == len(linears) - 1
        if activation and (not last or activate_output):
            h = activation(h)
        if layer_norm:
            after = [
                i
                for i in range(index + 1, index + 4)
                if f"linear.{i}.weight" in state and state[f"linear.{i}.weight"].ndim == 1
            ]
            h = F.layer_norm(h, (h.shape[-1],), state[f"linear.{after[0]}.weight"], state[f"linear.{after[0]}.bias"])
    return x + h * multiplier


def write_a1111_file(path, state_k, state_v, **options):
    torch.save({W: (state_k, state_v), **options}, path)


@pytest.mark.parametrize(
    ("options", "layout", "activation", "layer_norm", "activate_output"),
    [
        (
            dict(
                layer_structure=[1, 2, 1],
                activation_func="relu",
                is_layer_norm=True,
                use_dropout=True,
                dropout_structure=[0, 0.3, 0],
                activate_output=False,
            ),
            LN_RELU_DROPOUT,
            F.relu,
            True,
            False,
        ),
        (
            dict(layer_structure=[1, 2, 1], activation_func="relu", is_layer_norm=False, activate_output=True),
            [
                ("linear.0.weight", (2 * W, W)),
                ("linear.0.bias", (2 * W,)),
                ("linear.2.weight", (W, 2 * W)),
                ("linear.2.bias", (W,)),
            ],
            F.relu,
            False,
            True,
        ),
        (
            dict(layer_structure=[1, 1.5, 2, 1], activation_func="tanh", is_layer_norm=False, activate_output=False),
            [
                ("linear.0.weight", (96, W)),
                ("linear.0.bias", (96,)),
                ("linear.2.weight", (128, 96)),
                ("linear.2.bias", (128,)),
                ("linear.4.weight", (W, 128)),
                ("linear.4.bias", (W,)),
            ],
            torch.tanh,
            False,
            False,
        ),
        # An old file: no options at all, legacy linear1/linear2 keys (activate_output then defaults to True, but
        # with no activation function that changes nothing).
        (
            dict(),
            [
                ("linear1.weight", (2 * W, W)),
                ("linear1.bias", (2 * W,)),
                ("linear2.weight", (W, 2 * W)),
                ("linear2.bias", (W,)),
            ],
            None,
            False,
            True,
        ),
    ],
)
def test_a1111_layouts_load_and_match_a_hand_written_forward(
    tmp_path, options, layout, activation, layer_norm, activate_output
):
    k_state, v_state = a1111_module_state(W, layout, 1), a1111_module_state(W, layout, 100)
    write_a1111_file(tmp_path / "net.pt", k_state, v_state, **options)
    hn = read_hypernetwork_file(tmp_path / "net.pt")
    assert hn.widths == [W]
    k_module, v_module = hn.layers[W]
    x = rand(2, 5, W, seed=7)
    for module, state in ((k_module, k_state), (v_module, v_state)):
        ref_state = {k.replace("linear1", "linear.0").replace("linear2", "linear.1"): v for k, v in state.items()}
        with torch.no_grad():
            torch.testing.assert_close(
                module(x, 0.7), reference_forward(ref_state, x, activation, layer_norm, activate_output, 0.7)
            )
    assert hn.activate_output is (options.get("activate_output", True))


def test_files_we_write_have_a1111s_keys_and_indices(tmp_path):
    hn = Hypernetwork.create("mine", [W, 32], [1, 2, 1], "relu", "Normal", True, True, [0, 0.3, 0])
    save_hypernetwork(hn, tmp_path / "mine.pt")
    data = torch.load(tmp_path / "mine.pt", weights_only=True)
    assert set(k for k in data if isinstance(k, int)) == {W, 32}
    assert isinstance(data[W], tuple) and len(data[W]) == 2
    assert list(data[W][0]) == [k for k, _ in LN_RELU_DROPOUT]
    assert {k for k in data if isinstance(k, str)} == {
        "step",
        "name",
        "layer_structure",
        "activation_func",
        "is_layer_norm",
        "weight_initialization",
        "sd_checkpoint",
        "sd_checkpoint_name",
        "activate_output",
        "use_dropout",
        "dropout_structure",
        "last_layer_dropout",
        "optional_info",
    }
    assert data["activate_output"] is False and data["step"] == 0 and data["name"] == "mine"
    # LayerNorm weights get A1111's N(0, 0.01) init, Linear biases zero.
    assert data[W][0]["linear.2.weight"].abs().max() < 0.1 and data[W][0]["linear.0.bias"].abs().max() == 0
    # .safetensors with the same content round-trips too.
    save_hypernetwork(hn, tmp_path / "mine.safetensors")
    again = read_hypernetwork_file(tmp_path / "mine.safetensors")
    for (k1, v1), (k2, v2) in zip(
        hn.layers[W][0].state_dict().items(), again.layers[W][0].state_dict().items(), strict=True
    ):
        assert k1 == k2 and torch.equal(v1, v2)
    assert again.layer_structure == [1, 2, 1] and again.is_layer_norm


def test_chained_hypernetworks_apply_in_prompt_order():
    a = Hypernetwork.create("a", [W], [1, 2, 1], "relu", "XavierNormal", False, False, None, seed=1)
    b = Hypernetwork.create("b", [W], [1, 2, 1], "tanh", "XavierNormal", False, False, None, seed=2)
    stack = HypernetworkStack()
    x = rand(1, 3, W, seed=3)
    with torch.no_grad(), stack.using([(a, 0.5), (b, 2.0)]):
        k, v = stack.apply(x)
        torch.testing.assert_close(k, b.layers[W][0](a.layers[W][0](x, 0.5), 2.0))
        torch.testing.assert_close(v, b.layers[W][1](a.layers[W][1](x, 0.5), 2.0))
    with stack.using([(a, 0.0)]):
        assert stack.active == []


@pytest.fixture(scope="module")
def folder(services):
    path = services.settings.hypernetwork_dir
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def outline(services, folder):
    path, warnings = services.hypernetworks.create(
        "zqoutline", [64, 32], "1, 2, 1", "relu", "XavierNormal", overwrite=True
    )
    assert warnings == []
    return path


def gen(services, prompt, **kw):
    base = dict(
        prompt=prompt,
        negative_prompt="",
        width=64,
        height=64,
        steps=6,
        seed=11,
        sampler_name="Euler",
        save_images=False,
    )
    base.update(kw)
    return services.txt2img.generate(Txt2ImgParams(**base))


def pixels(result):
    return np.asarray(result.images[0], dtype=np.int16)


def test_tag_applies_removes_itself_and_multiplier_zero_is_bitwise_the_plain_image(services, outline):
    plain = gen(services, "a red circle")
    zero = gen(services, "a red circle <hypernet:zqoutline:0>")
    on = gen(services, "a red circle <hypernet:zqoutline:1>")
    assert np.array_equal(pixels(plain), pixels(zero))
    assert not np.array_equal(pixels(plain), pixels(on))
    assert on.notes == []
    assert on.infotexts[0].startswith("a red circle <hypernet:zqoutline:1>\n")  # A1111 keeps the tag in the prompt
    default = gen(services, "a red circle <hypernet:zqoutline>")
    assert np.array_equal(pixels(default), pixels(on))  # multiplier defaults to 1


def test_sliced_attention_gives_the_same_image(services, outline):
    model = services.models.get()
    normal = gen(services, "a red circle <hypernet:zqoutline:0.8>")
    install(model.pipe.unet, services.txt2img.stack, slice_size=1)
    try:
        sliced = gen(services, "a red circle <hypernet:zqoutline:0.8>")
    finally:
        install(model.pipe.unet, services.txt2img.stack, None)
    assert np.abs(pixels(normal) - pixels(sliced)).max() <= 1


def test_bad_tags_generate_without_them_and_say_why(services, outline, tmp_path, folder):
    outside = folder.parent / "x.pt"
    torch.save({"bogus": 1}, outside)
    result = gen(services, "cat <hypernet:zqoutline:abc> <hypernet:../x:1> <hypernet:nobody:1> <loractl:l:1>")
    notes = " | ".join(result.notes)
    assert "multiplier 'abc' is not a number" in notes
    assert "'../x' not found" in notes and "'nobody' not found" in notes
    assert "type 'loractl' is not supported" in notes
    assert np.array_equal(pixels(result), pixels(gen(services, "cat")))


def test_sd2_width_hypernetwork_is_listed_as_not_matching(services, folder):
    hn = Hypernetwork.create("zqsd2", [1024], [1, 2, 1], "linear", "Normal", False, False, None)
    save_hypernetwork(hn, folder / "zqsd2.pt")
    row = next(d for d in services.hypernetworks.details() if d["name"] == "zqsd2")
    assert row["usable"] is False and "[1024]" in row["reason"]
    result = gen(services, "cat <hypernet:zqsd2:1>")
    assert "none of which the loaded model uses" in result.notes[0]


def test_bad_files_are_refused_with_reasons(services, folder, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({W: (Payload(), {})}, folder / "zqevil.pt")
    (folder / "zqcorrupt.pt").write_bytes(b"\x80\x02 definitely not")
    torch.save({W: ({"linear.0.weight": torch.zeros(3, 3)}, {}), "layer_structure": [1, 2, 1]}, folder / "zqshape.pt")
    rows = {d["name"]: d for d in services.hypernetworks.details()}
    assert not marker.exists()
    assert "could run code" in rows["zqevil"]["reason"]
    assert "not a readable torch file" in rows["zqcorrupt"]["reason"]
    assert "does not match its layer structure" in rows["zqshape"]["reason"]
    result = gen(services, "cat <hypernet:zqevil:1>")
    assert "could run code" in result.notes[0]
    assert not marker.exists()
    for name in ("zqevil", "zqcorrupt", "zqshape"):
        (folder / f"{name}.pt").unlink()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(layer_structure="1, 0, 1"), "zero or negative"),
        (dict(layer_structure="2, 1"), "must start and end with 1"),
        (dict(layer_structure="1, x, 1"), "expected numbers"),
        (dict(enable_sizes=[]), "at least one module width"),
        (dict(activation_func="wobble"), "Activation function 'wobble' is unknown"),
        (dict(weight_init="Random"), "Weight initialization 'Random' is unknown"),
        (dict(use_dropout=True, dropout_structure="0, 1.5, 0"), "Dropout structure"),
        (dict(name="///"), "no usable characters"),
    ],
)
def test_create_refuses_bad_options(services, folder, kwargs, message):
    args = dict(name="zqbadhn", enable_sizes=[64])
    args.update(kwargs)
    with pytest.raises(UserError, match=message):
        services.hypernetworks.create(**args)
    assert not (folder / "zqbadhn.pt").exists()


def test_create_warns_for_widths_the_model_lacks_and_refuses_overwrite(services, folder):
    path, warnings = services.hypernetworks.create("zqwarn", [64, 768], "1, 2, 1")
    assert len(warnings) == 1 and "768" in warnings[0]
    with pytest.raises(UserError, match="already exists"):
        services.hypernetworks.create("zqwarn", [64], "1, 2, 1")
    assert read_hypernetwork_file(path).widths == [64, 768]


def state_hash(module) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        digest.update(key.encode() + value.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def hn_cfg(name, dataset, **kw):
    base = dict(
        name=name,
        data_root=str(dataset),
        training_width=64,
        training_height=64,
        steps=8,
        save_every=4,
        create_image_every=4,
        template_filename="hypernetwork.txt",
        learn_rate="0.001",
        seed=2,
    )
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def hn_dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("outlined"))


def fresh_hn(services, name, dropout=False):
    path, _ = services.hypernetworks.create(
        name,
        [64, 32],
        "1, 2, 1",
        "relu",
        "XavierNormal",
        use_dropout=dropout,
        dropout_structure="0, 0.2, 0" if dropout else None,
        overwrite=True,
    )
    path.with_suffix(".optim").unlink(missing_ok=True)
    return path


def test_training_changes_only_the_hypernetwork_and_writes_its_logs(services, hn_dataset):
    path = fresh_hn(services, "zqhntrain")
    model = services.models.get()
    before = {n: state_hash(getattr(model.pipe, n)) for n in ("unet", "text_encoder", "vae")}
    initial = read_hypernetwork_file(path)
    result = services.training.train_hypernetwork(hn_cfg("zqhntrain", hn_dataset)).wait()
    assert result.error is None and result.step == 8
    after = read_hypernetwork_file(path)
    assert after.step == 8 and after.sd_checkpoint == model.info.short_hash
    assert not torch.equal(after.layers[64][0].linear[0].weight, initial.layers[64][0].linear[0].weight)
    assert before == {n: state_hash(getattr(model.pipe, n)) for n in ("unet", "text_encoder", "vae")}
    assert sorted(p.name for p in (result.log_dir / "hypernetworks").iterdir()) == ["zqhntrain-4.pt", "zqhntrain-8.pt"]
    assert read_hypernetwork_file(result.log_dir / "hypernetworks" / "zqhntrain-4.pt").step == 4
    assert (result.log_dir / "images" / "zqhntrain-8.png").is_file()
    rows = (result.log_dir / "hypernetwork_loss.csv").read_text().splitlines()
    assert rows[0] == "step,epoch,epoch_step,loss,learn_rate" and len(rows) == 9
    assert attention_widths(model.pipe.unet) == {32, 64}


def test_hypernetwork_resume_is_bitwise_even_with_dropout(services, hn_dataset):
    path = fresh_hn(services, "zqhnresume", dropout=True)
    initial = path.read_bytes()  # new hypernetworks start from random weights: reuse the same start
    services.training.train_hypernetwork(
        hn_cfg("zqhnresume", hn_dataset, steps=8, save_every=0, create_image_every=0)
    ).wait()
    straight = read_hypernetwork_file(path)
    path.write_bytes(initial)
    path.with_suffix(".optim").unlink()
    services.training.train_hypernetwork(
        hn_cfg("zqhnresume", hn_dataset, steps=3, save_every=0, create_image_every=0)
    ).wait()
    services.training.train_hypernetwork(
        hn_cfg("zqhnresume", hn_dataset, steps=8, save_every=0, create_image_every=0)
    ).wait()
    resumed = read_hypernetwork_file(path)
    for width in (32, 64):
        for a, b in zip(straight.layers[width], resumed.layers[width], strict=True):
            for (k1, t1), (_, t2) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
                assert torch.equal(t1, t2), k1


def test_hypernetwork_nan_guard(services, hn_dataset):
    path = fresh_hn(services, "zqhnnan")
    result = services.training.train_hypernetwork(
        hn_cfg("zqhnnan", hn_dataset, steps=30, learn_rate="1e38", create_image_every=0, save_every=0)
    ).wait()
    assert result.error and "lower learning rate" in result.error
    read_hypernetwork_file(path)  # still loadable: NaN weights would be refused


def test_train_hypernetwork_refusals(services, hn_dataset):
    with pytest.raises(UserError, match="not found"):
        services.training.train_hypernetwork(hn_cfg("zqnobody", hn_dataset))
    fresh_hn(services, "zqhnbad")
    with pytest.raises(UserError, match="does not exist"):
        services.training.train_hypernetwork(hn_cfg("zqhnbad", "/no/such/dir"))


def test_hypernetwork_format_error_is_a_user_error():
    assert issubclass(HypernetworkFormatError, UserError)


def test_cross_attention_cache_returns_the_uncached_result_and_follows_changes():
    a = Hypernetwork.create("a", [W], [1, 2, 1], "relu", "XavierNormal", False, False, None, seed=4)
    stack = HypernetworkStack()
    context = rand(2, 77, W, seed=5)
    with torch.no_grad(), stack.using([(a, 0.6)]):
        first = stack.apply(context, cross_attention=True)
        again = stack.apply(context, cross_attention=True)
        assert again[0] is first[0]  # reused, not recomputed
        torch.testing.assert_close(first[0], a.layers[W][0](context, 0.6))
        context.mul_(2)  # changed in place: the cache must not answer for the old values
        torch.testing.assert_close(stack.apply(context, cross_attention=True)[1], a.layers[W][1](context, 0.6))
