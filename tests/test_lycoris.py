"""LyCORIS files (LoHa, LoKr, LoCon with Tucker cores, DoRA, (IA)³, OFT, GLoRA, full difference, norm) as LyCORIS
itself writes them: `<lora:name:m>` must give the image of the model that LyCORIS's own modules make at m, and
leave the model exactly as it was. The reference is the `lycoris-lora` package (a test dependency), not our code;
broken files of these kinds say why."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lycoris import LycorisNetwork, create_lycoris
from safetensors.torch import save_file

from app.errors import UserError
from app.lora.apply import Application, lora_applied
from app.lora.files import DoraLayer, LoraFormatError, bind, check_fits, parse_lora, read_lora_file
from app.lora.names import Target
from app.training.config import LoraNetwork
from tests.test_lora import folder, gen, pixels, same, snapshot  # noqa: F401 - `folder` is a fixture
from tests.test_training import cfg, make_dataset

UNET_BLOCKS = ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"]
TEXT_BLOCKS = ["CLIPAttention", "CLIPMLP"]


def lycoris_network(root: torch.nn.Module, blocks: list[str], prefix: str, algo: str, seed: int, **kw):
    """A LyCORIS network on `root` (a copy of a model part) with random weights, named as kohya + LyCORIS name
    layers (`lora_unet_<path>`, `lora_te_<path>`, dots as underscores)."""
    LycorisNetwork.apply_preset({"target_module": blocks, "lora_prefix": prefix})
    network = create_lycoris(root, 1.0, algo=algo, **kw)
    network.apply_to()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in network.named_parameters():
            noise = torch.randn(param.shape, generator=g)
            if name.endswith(("dora_scale", "rescale")):  # magnitudes and scales: near where LyCORIS starts them
                param.mul_(1 + 0.3 * noise)
                continue
            spread = 0.6 if "hada" in name or "t1" in name or "t2" in name else 0.25
            param.copy_(noise * spread)
    return network


CASES = {
    "loha": dict(algo="loha", linear_dim=4, linear_alpha=2, conv_dim=4, conv_alpha=2),
    "loha-tucker": dict(algo="loha", linear_dim=4, linear_alpha=2, conv_dim=4, conv_alpha=2, use_tucker=True),
    "lokr": dict(algo="lokr", linear_dim=2, linear_alpha=1, conv_dim=2, conv_alpha=1),
    "lokr-both-tucker": dict(algo="lokr", linear_dim=2, linear_alpha=1, decompose_both=True, use_tucker=True),
    "lokr-full": dict(algo="lokr", linear_dim=4, linear_alpha=2, full_matrix=True),
    "locon-tucker": dict(algo="locon", linear_dim=4, linear_alpha=2, conv_dim=4, conv_alpha=2, use_tucker=True),
    # weight-decomposed (DoRA): magnitudes per output row (LyCORIS's default) or per input column (A1111's)
    "lora-dora": dict(algo="lora", linear_dim=4, linear_alpha=2, conv_dim=4, conv_alpha=2, dora_wd=True),
    "loha-dora-columns": dict(algo="loha", linear_dim=4, linear_alpha=2, dora_wd=True, wd_on_output=False),
    "lokr-dora": dict(algo="lokr", linear_dim=2, linear_alpha=1, dora_wd=True),
    "ia3": dict(algo="ia3"),
    # OFT: with a norm constraint that binds (alpha * out below the random blocks' norm), without one, and rescaled
    "oft": dict(algo="diag-oft", linear_dim=4, conv_dim=4, constraint=2e-3),
    "oft-free": dict(algo="diag-oft", linear_dim=4, conv_dim=4),
    "oft-rescaled": dict(algo="diag-oft", linear_dim=4, conv_dim=4, rescaled=True),
    "glora": dict(algo="glora", linear_dim=4, linear_alpha=2, conv_dim=4, conv_alpha=2),
    "full": dict(algo="full"),
    "lora-norms": dict(algo="lora", linear_dim=4, linear_alpha=2, train_norm=True),  # GroupNorm and LayerNorm too
}
KINDS = {
    "loha": "LoHa",
    "lokr": "LoKr",
    "locon": "LoCon (Tucker)",
    "lora": "LoRA + DoRA",
    "ia3": "(IA)³",
    "diag-oft": "OFT",
    "glora": "GLoRA",
    "full": "full difference",
}
CASE_KINDS = {"lora-norms": "LoRA, norm"}


def outputs(pipe, unet, text_encoder) -> tuple[torch.Tensor, torch.Tensor]:
    """The UNet's output for a fixed latent, timestep and context, and the text encoder's for fixed tokens."""
    g = torch.Generator().manual_seed(5)
    context = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    ids = pipe.tokenizer("a red circle", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return unet(sample, 500, context).sample, text_encoder(ids)[0]


@pytest.mark.parametrize("case", list(CASES))
def test_a_lycoris_file_changes_the_model_as_lycoris_itself_runs_it(services, folder, case):  # noqa: F811
    """Reference: LyCORIS's own modules applied to copies of the model (their forward, as they train), at 0.7; a
    DoRA or rescaled OFT file at 1 (see `at_one`)."""
    model = services.models.get()
    pipe = model.pipe
    settings = CASES[case]
    unet_copy, te_copy = copy.deepcopy(pipe.unet), copy.deepcopy(pipe.text_encoder)
    unet_net = lycoris_network(unet_copy, UNET_BLOCKS, "lora_unet", seed=1, **settings)
    te_net = lycoris_network(te_copy, TEXT_BLOCKS, "lora_te", seed=2, **settings)
    # as files made with transformers 4 name them (its CLIPTextModel has a `text_model.` level; 5's has not)
    te_state = {k.replace("lora_te_encoder_", "lora_te_text_model_encoder_"): v for k, v in te_net.state_dict().items()}
    state = {**unet_net.state_dict(), **te_state}
    assert any(k.startswith("lora_te_") for k in state) and any("resnets" in k for k in state)
    save_file(
        {k: v.contiguous() for k, v in state.items()},
        str(folder / "zqlyco.safetensors"),
        metadata={"ss_network_module": "lycoris.kohya", "ss_network_args": f'{{"algo": "{settings["algo"]}"}}'},
    )
    row = next(r for r in services.loras.details() if r["name"] == "zqlyco")
    assert row["usable"] is True, row
    assert CASE_KINDS.get(case, KINDS[settings["algo"]]) in row["kind"]

    # LyCORIS scales a DoRA's magnitudes and an OFT's rescale by the multiplier; A1111 and ComfyUI scale the whole
    # change (W + m * (W1 - W)), as we do: compared with LyCORIS at 1, and with that line at 0.4
    at_one = bool(settings.get("dora_wd") or settings.get("rescaled"))
    multiplier = 1.0 if at_one else 0.7
    base_unet, base_te = outputs(pipe, pipe.unet, pipe.text_encoder)
    for network in (unet_net, te_net):
        network.set_multiplier(multiplier)
    want_unet, want_te = outputs(pipe, unet_copy, te_copy)
    lora = read_lora_file(folder / "zqlyco.safetensors")
    bound = bind(lora, services.loras.table(model), "shapes-64")
    before = snapshot(model)
    with lora_applied([Application(bound, multiplier, multiplier)]):
        got_unet, got_te = outputs(pipe, pipe.unet, pipe.text_encoder)
        changed = {b.target.module: b.target.module.weight.detach().clone() for b in bound}
    assert same(before, snapshot(model))
    for got, want, base in ((got_unet, want_unet, base_unet), (got_te, want_te, base_te)):
        assert float((want - base).abs().max()) > 0.05  # the file changes the output
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    if at_one:  # at 0.4: W + 0.4 * (W1 - W), W1 the weights at 1 (just checked against LyCORIS)
        with lora_applied([Application(bound, 0.4, 0.4)]):
            got_unet, got_te = outputs(pipe, pipe.unet, pipe.text_encoder)
        saved = {module: module.weight.detach().clone() for module in changed}
        with torch.no_grad():
            for module, at_one in changed.items():
                module.weight.copy_(saved[module] + 0.4 * (at_one - saved[module]))
            want_unet, want_te = outputs(pipe, pipe.unet, pipe.text_encoder)
            for module, weight in saved.items():
                module.weight.copy_(weight)
        torch.testing.assert_close(got_unet, want_unet, rtol=1e-4, atol=1e-4 * float(want_unet.abs().max()))
        torch.testing.assert_close(got_te, want_te, rtol=1e-4, atol=1e-4 * float(want_te.abs().max()))
        assert same(before, snapshot(model))

    # and through the prompt tag, as a user uses it: a visible change, nothing left behind
    image = pixels(gen(services, "a red circle"))
    tagged = gen(services, "a red circle <lora:zqlyco:0.7>")
    assert tagged.notes == [] and np.abs(pixels(tagged) - image).max() > 8
    # LyCORIS's old tag, which A1111 reads as a LoRA tag: the same image and the same infotext field
    old_tag = gen(services, "a red circle <lyco:zqlyco:0.7>")
    assert old_tag.notes == [] and np.array_equal(pixels(old_tag), pixels(tagged))
    assert 'Lora hashes: "zqlyco: ' in old_tag.infotexts[0]
    assert same(before, snapshot(model))
    assert np.array_equal(pixels(gen(services, "a red circle")), image)


def test_a_per_row_dora_locon_file_is_not_continued_by_training(services, folder, tmp_path):  # noqa: F811
    unet_copy = copy.deepcopy(services.models.get().pipe.unet)
    network = lycoris_network(unet_copy, UNET_BLOCKS, "lora_unet", "lora", seed=3, linear_dim=2, dora_wd=True)
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(folder / "zqlycotrain.safetensors"))
    before = (folder / "zqlycotrain.safetensors").read_bytes()
    with pytest.raises(UserError, match=r"has DoRA magnitudes per output row \(LyCORIS's default\); training"):
        services.training.train_lora(
            cfg("zqlycotrain", make_dataset(tmp_path / "stars")), LoraNetwork(rank=4, alpha=4.0)
        )
    assert (folder / "zqlycotrain.safetensors").read_bytes() == before


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"x.hada_w1_a": torch.ones(4, 2), "x.hada_w1_b": torch.ones(2, 4)}, "LoHa without hada_w2_a, hada_w2_b"),
        (
            {
                "x.hada_w1_a": torch.ones(4, 2),
                "x.hada_w1_b": torch.ones(2, 4),
                "x.hada_w2_a": torch.ones(4, 2),
                "x.hada_w2_b": torch.ones(2, 6),
            },
            "the two halves of this LoHa are",
        ),
        ({"x.hada_w1_a": torch.ones(4, 2), "x.hada_w1_b": torch.ones(3, 4)}, "do not multiply|LoHa without"),
        ({"x.lokr_w1": torch.ones(2, 2)}, "LoKr without both of its halves"),
        ({"x.lokr_w1": torch.ones(2, 2), "x.lokr_w2": torch.full((2, 2), float("nan"))}, "NaN"),
        ({"x.lokr_w1": torch.ones(2, 2), "x.lora_down.weight": torch.ones(2, 2)}, "mixes tensors of different kinds"),
        (
            {"x.lora_down.weight": torch.ones(2, 4, 1, 1), "x.lora_up.weight": torch.ones(4, 2, 1, 1)}
            | {"x.lora_mid.weight": torch.ones(3, 3, 3, 3)},
            "Tucker core",
        ),
        (
            {
                "x.lora_down.weight": torch.ones(2, 4),
                "x.lora_up.weight": torch.ones(4, 2),
                "x.dora_scale": torch.ones(3, 1),
            }
            | {"x.alpha": torch.tensor(1.0)},
            "DoRA magnitude of shape",
        ),
        ({"x.lora_down.weight": torch.ones(2, 4), "x.on_input": torch.ones(4)}, "mixes tensors of different kinds"),
        ({"x.on_input": torch.tensor(1)}, "lacks weight"),
        ({"x.weight": torch.ones(4), "x.on_input": torch.ones(4)}, "`on_input` must be one number"),
        ({"x.weight": torch.ones(2, 4), "x.on_input": torch.tensor(0)}, "one row of values"),
        ({"x.oft_blocks": torch.ones(2, 2, 3, 3)}, "BOFT"),
        ({"x.oft_blocks": torch.ones(2, 3, 4)}, "\\[blocks, size, size\\]"),
        ({"x.oft_blocks": torch.ones(2, 2, 2), "x.rescale": torch.ones(3, 1)}, "rescale of shape"),
        ({"x.rescale": torch.ones(4, 1)}, "rescale without its oft_blocks"),
        ({"x.oft_blocks": torch.ones(2, 2, 2), "x.oft_diag": torch.ones(2, 2, 2)}, "both oft_blocks and oft_diag"),
        ({"x.a1.weight": torch.ones(8, 2), "x.b1.weight": torch.ones(6, 2)}, "lacks a2, b2"),
        (
            {"x.a1.weight": torch.ones(8, 2), "x.a2.weight": torch.ones(3, 8)}
            | {"x.b1.weight": torch.ones(6, 2), "x.b2.weight": torch.ones(2, 8)},
            "GLoRA factors that do not chain",
        ),
        ({"x.diff": torch.ones(4, 3), "x.diff_b": torch.ones(3)}, "not a layer's weight and bias"),
        ({"x.w_norm": torch.ones(4, 1)}, "one row of values each"),
        ({"x.diff_b": torch.ones(4)}, "lacks diff"),
        ({"x.w_norm": torch.ones(4), "x.diff": torch.ones(4)}, "mixes tensors of different kinds"),
        ({"x.weight": torch.ones(4), "x.on_input": torch.tensor(0), "x.dora_scale": torch.ones(4, 1)}, "DoRA"),
    ],
)
def test_broken_lycoris_layers_say_why(tensors, message):
    with pytest.raises(LoraFormatError, match=message):
        parse_lora(tensors)


@pytest.mark.parametrize("case", ["loha-tucker", "lokr", "ia3", "oft", "glora", "full"])
def test_sdxl_lycoris_files_with_both_text_encoders(case):
    """kohya + LyCORIS's SDXL names (`lora_unet_`, `lora_te1_`, `lora_te2_`), text encoder and UNet multipliers
    apart, against LyCORIS's modules running forward on copies of a tiny SDXL model."""
    from app.lora.names import layer_table, model_components
    from app.models.default_model import build_tiny_sdxl_pipeline

    pipe = build_tiny_sdxl_pipeline()
    parts = {"lora_unet": pipe.unet, "lora_te1": pipe.text_encoder, "lora_te2": pipe.text_encoder_2}
    copies = {prefix: copy.deepcopy(part) for prefix, part in parts.items()}
    state, networks = {}, []
    for seed, (prefix, part) in enumerate(copies.items()):
        blocks = UNET_BLOCKS if prefix == "lora_unet" else TEXT_BLOCKS
        network = lycoris_network(part, blocks, prefix, seed=seed, **CASES[case])
        network.set_multiplier(0.9 if prefix == "lora_unet" else 0.6)
        networks.append(network)
        encoder = f"{prefix}_encoder_"
        state.update({k.replace(encoder, f"{prefix}_text_model_encoder_"): v for k, v in network.state_dict().items()})
    tokens = torch.tensor([[49406, 320, 1929, 49407]])
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def run(unet, te1, te2):
        with torch.no_grad():
            e1 = te1(tokens, output_hidden_states=True).hidden_states[-2]
            out2 = te2(tokens, output_hidden_states=True)
            context = torch.cat([e1, out2.hidden_states[-2]], dim=-1)
            cond = {"text_embeds": out2.text_embeds, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
            return unet(sample, 10, context, added_cond_kwargs=cond).sample

    base = run(*parts.values())
    want = run(*copies.values())
    bound = bind(parse_lora(state), layer_table(model_components(pipe)), "SDXL")
    assert {b.target.component for b in bound} == {"unet", "text_encoder", "text_encoder_2"}
    with lora_applied([Application(bound, 0.6, 0.9)]):
        got = run(*parts.values())
    assert torch.equal(run(*parts.values()), base)
    assert float((want - base).abs().max()) > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


FAMILIES = {  # each kind's required tensors, then the optional ones
    "lora": (["lora_down.weight", "lora_up.weight"], ["lora_mid.weight", "alpha", "dora_scale"]),
    "loha": (["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"], ["hada_t1", "hada_t2", "alpha", "dora_scale"]),
    "lokr": (["lokr_w1", "lokr_w2"], ["lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha"]),
    "ia3": (["weight", "on_input"], ["alpha"]),
    "oft": (["oft_blocks"], ["oft_diag", "rescale", "alpha"]),
    "glora": (["a1.weight", "a2.weight", "b1.weight", "b2.weight"], ["bm.weight", "alpha"]),
    "full": (["diff"], ["diff_b", "alpha"]),
    "norm": (["w_norm"], ["b_norm", "alpha"]),
}
dim = st.integers(1, 2)
shapes = st.one_of(  # mostly matrices and kernels of 1-2 wide dims (so they often chain), now and then anything
    st.tuples(dim, dim),
    st.tuples(dim, dim, dim, dim),
    st.lists(st.integers(0, 3), max_size=5).map(tuple),
)


@st.composite
def layer_parts(draw) -> dict[str, tuple[int, ...]]:
    """The tensors of one layer: a kind's required names (sometimes one dropped) and some optional ones, each of a
    small random shape (small dims, so that shapes often do chain)."""
    required, optional = FAMILIES[draw(st.sampled_from(sorted(FAMILIES)))]
    names = list(required)
    if draw(st.booleans()) and draw(st.integers(0, 9)) == 0:
        names.remove(draw(st.sampled_from(names)))
    names += draw(st.lists(st.sampled_from(optional), unique=True, max_size=3))
    return {name: () if name == "alpha" else draw(shapes) for name in names}


@settings(max_examples=500, deadline=None)
@given(layer_parts())
def test_any_mix_of_layer_tensors_is_a_layer_whose_update_has_its_shape_or_a_reason(parts):
    """Whatever tensor names and shapes a file puts under one layer: a LoraFormatError, or layers whose update
    computes and has the shape they announce (what binding checks against the model)."""
    tensors = {f"lora_unet_x.{part}": torch.ones(shape) * 0.5 for part, shape in parts.items()}
    try:
        lora = parse_lora(tensors)
    except LoraFormatError:
        return
    for layer in lora.layers.values():
        shape = tuple(2 if d is None else d for d in layer.update_shape)  # an axis taken from the weight: any size
        assert len(shape) in (1, 2, 4)
        module = {1: torch.nn.LayerNorm(1), 2: torch.nn.Linear(1, 1), 4: torch.nn.Conv2d(1, 1, 1)}[len(shape)]
        module.weight = torch.nn.Parameter(torch.ones(shape), requires_grad=False)  # a layer of that very shape
        module.bias = torch.nn.Parameter(torch.ones(shape[0]), requires_grad=False)
        if check_fits(layer, Target("unet", "x", module)) is not None:
            assert isinstance(layer, DoraLayer)  # only magnitudes for another axis size: binding refuses those
            continue
        delta = layer.delta(torch.device("cpu"), module.weight)
        assert delta.shape[0] == shape[0] and delta.numel() == math.prod(shape)
        bias = layer.bias_delta(torch.device("cpu"))
        assert (bias is None) == (layer.bias_shape is None)
        assert bias is None or tuple(bias.shape) == layer.bias_shape == (shape[0],)


def merged_weights(pipe, state: dict[str, torch.Tensor], multiplier: float) -> dict[str, torch.Tensor]:
    """Every weight and bias of the UNet while the file in `state` is applied at `multiplier`."""
    from app.lora.names import layer_table, model_components

    bound = bind(parse_lora(state), layer_table(model_components(pipe)), "test")
    with lora_applied([Application(bound, multiplier, multiplier)]):
        return {k: v.clone() for k, v in pipe.unet.state_dict().items()}


def test_other_writers_names_for_oft_and_glora_change_the_model_alike(services):
    """kohya's OFT names its layers `oft_unet_` (A1111 reads them as `lora_unet_`); LyCORIS 2 exported an OFT's
    rotations themselves as `oft_diag`; LyCORIS 1 named GLoRA's factors a2, a1, b2, b1 (what A1111 reads). Each
    gives the change that the same layers under LyCORIS's current names give."""
    pipe = services.models.get().pipe
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    oft_net = lycoris_network(copy.deepcopy(pipe.unet), UNET_BLOCKS, "lora_unet", seed=4, **CASES["oft"])
    oft = oft_net.state_dict()
    want = merged_weights(pipe, oft, 0.8)
    assert max(float((want[k] - before[k]).abs().max()) for k in before) > 1e-2
    kohya = {k.replace("lora_unet_", "oft_unet_", 1): v for k, v in oft.items()}
    got = merged_weights(pipe, kohya, 0.8)
    assert all(torch.equal(got[k], want[k]) for k in want)
    with torch.no_grad():
        rotations = {f"{m.lora_name}.oft_diag": m.get_r().detach().clone() for m in oft_net.loras}
    got = merged_weights(pipe, rotations, 0.8)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5)

    glora = lycoris_network(copy.deepcopy(pipe.unet), UNET_BLOCKS, "lora_unet", seed=5, **CASES["glora"]).state_dict()
    swap = {
        ".a1.weight": ".a2.weight",
        ".a2.weight": ".a1.weight",
        ".b1.weight": ".b2.weight",
        ".b2.weight": ".b1.weight",
    }
    old_names = {}
    for key, value in glora.items():
        end = next((e for e in swap if key.endswith(e)), None)
        old_names[key.removesuffix(end) + swap[end] if end else key] = value
    assert old_names.keys() == glora.keys() and any(not torch.equal(old_names[k], glora[k]) for k in glora)
    want = merged_weights(pipe, glora, 0.8)
    got = merged_weights(pipe, old_names, 0.8)
    assert all(torch.equal(got[k], want[k]) for k in want)
    assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())


@pytest.mark.parametrize("on_input", [False, True])
@pytest.mark.parametrize("conv", [False, True])
def test_ia3_scales_rows_or_columns_as_lycoris_does(on_input, conv):
    """(IA)³ per output row, or per input column (`on_input`, which LyCORIS's network factory does not pass on, so
    its module is made here directly), on a Linear and a 3x3 convolution."""
    from lycoris.modules.ia3 import IA3Module

    g = torch.Generator().manual_seed(3)
    layer = torch.nn.Conv2d(3, 5, 3) if conv else torch.nn.Linear(6, 4)
    module = IA3Module("lora_unet_x", layer, 1.0, train_on_input=on_input)
    with torch.no_grad():
        module.weight.copy_(torch.randn(module.weight.shape, generator=g))
    want = module.get_merged_weight(multiplier=0.6)[0]
    state = module.state_dict()
    lora = parse_lora({f"lora_unet_x.{k}": state[k].detach().clone() for k in ("weight", "on_input")})
    ia3 = lora.layers["lora_unet_x"]
    assert ia3.kind == "(IA)³" and ia3.on_input == on_input
    assert check_fits(ia3, Target("unet", "x", layer)) is None
    got = layer.weight + 0.6 * ia3.delta(torch.device("cpu"), layer.weight).reshape(layer.weight.shape)
    torch.testing.assert_close(got, want.reshape(got.shape))
    other = torch.nn.Conv2d(4, 3, 3) if conv else torch.nn.Linear(5, 3)  # neither axis fits
    assert "the file's update for it is" in check_fits(ia3, Target("unet", "x", other))


def test_a_bias_change_for_a_layer_without_that_bias_is_refused_with_the_reason():
    linear = torch.nn.Linear(3, 4, bias=False)
    table = {"lora_unet_x": Target("unet", "x", linear)}
    with pytest.raises(LoraFormatError, match="has no bias, the file's change of its bias is 4"):
        bind(parse_lora({"lora_unet_x.diff": torch.ones(4, 3), "lora_unet_x.diff_b": torch.ones(4)}), table, "test")
    assert len(bind(parse_lora({"lora_unet_x.diff": torch.ones(4, 3)}), table, "test")) == 1
    norm = torch.nn.LayerNorm(4)
    with pytest.raises(LoraFormatError, match="is 4, the file's update for it is 6"):
        bind(parse_lora({"lora_unet_x.w_norm": torch.ones(6)}), {"lora_unet_x": Target("unet", "x", norm)}, "t")


def test_norm_layers_are_found_under_their_ldm_names_as_sdxl_files_name_them():
    """kohya's SDXL files name UNet layers as the original (LDM) model does; a LyCORIS norm layer there is e.g.
    `input_blocks_1_0_in_layers_0` (a ResNet's first GroupNorm). Names from the test's own LDM exporter."""
    from app.lora.names import layer_table, model_components
    from app.models.default_model import build_tiny_sdxl_pipeline
    from tests.test_lora import ldm_names

    pipe = build_tiny_sdxl_pipeline()
    table = layer_table(model_components(pipe))
    names = ldm_names(pipe.unet)
    norms = {p: m for p, m in pipe.unet.named_modules() if isinstance(m, torch.nn.GroupNorm | torch.nn.LayerNorm)}
    assert norms and any(p.endswith("resnets.0.norm1") for p in norms)
    for path, module in norms.items():
        assert table[names[path]].module is module, path
