"""LoRA use: `<lora:name:m>` must give the image of a model whose weights are W + m (alpha/rank) up @ down, in every
file layout people have, and leave the model exactly as it was; files that cannot be used say why.

The reference merge here names layers through the test's own LDM exporter, independently of the app's name table.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from safetensors.torch import save_file

from app.generation.txt2img import Txt2ImgParams
from app.models.ldm_export import unet_to_ldm


@dataclass
class Layer:
    component: str  # unet / text_encoder / text_encoder_2
    path: str  # module path in the diffusers / transformers model
    module: torch.nn.Module
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None

    def delta(self) -> torch.Tensor:
        rank = self.down.shape[0]
        scale = 1.0 if self.alpha is None else self.alpha / rank
        d = self.up.flatten(1) @ self.down.flatten(1)
        return scale * d.reshape(self.module.weight.shape)


def ldm_names(unet) -> dict[str, str]:
    """diffusers module path -> kohya LDM-style name, through the test exporter."""
    state = unet.state_dict()
    ldm = unet_to_ldm(state, unet.config.layers_per_block)
    return {
        key[: -len(".weight")]: "lora_unet_"
        + new.removeprefix("model.diffusion_model.")[: -len(".weight")].replace(".", "_")
        for key, new in zip(state, ldm, strict=True)
        if key.endswith(".weight")
    }


def make_layers(pipe, rank=4, seed=0, convs=True, te=True, unet=True, alpha=2.0) -> list[Layer]:
    g = torch.Generator().manual_seed(seed)
    layers = []
    parts = []
    if unet:
        parts.append(("unet", pipe.unet))
    if te:
        parts.append(("text_encoder", pipe.text_encoder))
        if getattr(pipe, "text_encoder_2", None) is not None:
            parts.append(("text_encoder_2", pipe.text_encoder_2))
    for component, root in parts:
        for path, module in root.named_modules():
            is_attention = isinstance(module, torch.nn.Linear) and ("attn" in path or "proj" in path)
            is_conv = convs and isinstance(module, torch.nn.Conv2d) and path.endswith(("conv1", "proj_in"))
            if not (is_attention or is_conv):
                continue
            w = module.weight
            down_shape = (rank, *w.shape[1:]) if w.ndim == 4 else (rank, w.shape[1])
            down = torch.randn(down_shape, generator=g) * 0.15
            up = torch.randn((w.shape[0], rank, 1, 1) if w.ndim == 4 else (w.shape[0], rank), generator=g) * 0.15
            layers.append(Layer(component, path, module, down, up, alpha))
    return layers


def kohya_file(pipe, layers: list[Layer], style: str = "ldm") -> dict[str, torch.Tensor]:
    xl = getattr(pipe, "text_encoder_2", None) is not None
    names = ldm_names(pipe.unet) if style == "ldm" else {}
    te_prefix = {"text_encoder": "lora_te1_" if xl else "lora_te_", "text_encoder_2": "lora_te2_"}
    out = {}
    for layer in layers:
        if layer.component == "unet":
            name = names[layer.path] if style == "ldm" else "lora_unet_" + layer.path.replace(".", "_")
        else:
            inner = layer.path.removeprefix("text_model.")  # transformers 5 has the level in one class only
            name = te_prefix[layer.component] + "text_model_" + inner.replace(".", "_")
        out[name + ".lora_down.weight"] = layer.down
        out[name + ".lora_up.weight"] = layer.up
        if layer.alpha is not None:
            out[name + ".alpha"] = torch.tensor(layer.alpha)
    return out


def peft_file(layers: list[Layer]) -> dict[str, torch.Tensor]:
    """diffusers' current LoRA layout: `unet.<path>.lora_A.weight`, text encoders under `text_model.`, no alpha."""
    out = {}
    for layer in layers:
        path = layer.path if layer.component == "unet" else "text_model." + layer.path.removeprefix("text_model.")
        out[f"{layer.component}.{path}.lora_A.weight"] = layer.down
        out[f"{layer.component}.{path}.lora_B.weight"] = layer.up
    return out


def unet_probe(pipe, seed: int, timestep: int):
    """A function giving the UNet's output for one fixed random latent and text context (no gradients)."""
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(1, 77, pipe.unet.config.cross_attention_dim, generator=g)
    sample = torch.randn(1, 4, 8, 8, generator=g)

    def run() -> torch.Tensor:
        with torch.no_grad():
            return pipe.unet(sample, timestep, context).sample

    return run


@contextmanager
def merged(layers: list[Layer], te: float, unet: float):
    """The model with W + m * delta written into its weights (the definition a LoRA must match); restored after."""
    saved = [(layer.module, layer.module.weight.detach().clone()) for layer in layers]
    with torch.no_grad():
        for layer in layers:
            m = unet if layer.component == "unet" else te
            layer.module.weight += m * layer.delta().to(layer.module.weight.dtype)
    try:
        yield
    finally:
        with torch.no_grad():
            for module, weight in saved:
                module.weight.copy_(weight)


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0], dtype=np.int16)


def gen(services, prompt: str, **kw):
    params = dict(prompt=prompt, steps=6, width=64, height=64, seed=11, sampler_name="Euler", save_images=False)
    params.update(kw)
    return services.txt2img.generate(Txt2ImgParams(**params))


@pytest.fixture
def folder(services):
    folder = services.settings.lora_dir
    folder.mkdir(parents=True, exist_ok=True)
    yield folder
    for f in folder.rglob("*"):
        if f.is_file():
            f.unlink()


def snapshot(model):
    """Every module object and tensor of the model, to prove nothing was left changed."""
    parts = {"unet": model.pipe.unet, "te": model.pipe.text_encoder}
    return {
        name: ([id(m) for m in root.modules()], {k: v.clone() for k, v in root.state_dict().items()})
        for name, root in parts.items()
    }


def same(a, b) -> bool:
    return all(
        a[n][0] == b[n][0]
        and a[n][1].keys() == b[n][1].keys()
        and all(torch.equal(a[n][1][k], b[n][1][k]) for k in a[n][1])
        for n in a
    )


@pytest.mark.parametrize("style", ["ldm", "diffusers", "peft"])
def test_lora_equals_merged_weights_and_leaves_the_model_untouched(services, folder, style):
    model = services.models.get()
    layers = make_layers(model.pipe, alpha=None if style == "peft" else 2.0)
    assert any(isinstance(layer.module, torch.nn.Conv2d) for layer in layers)
    data = peft_file(layers) if style == "peft" else kohya_file(model.pipe, layers, style)
    save_file(data, str(folder / "zq.safetensors"))
    before = snapshot(model)
    base = pixels(gen(services, "a red circle"))
    with_lora = gen(services, "a red circle <lora:zq:0.7>")
    assert with_lora.notes == []
    with merged(layers, 0.7, 0.7):
        reference = pixels(gen(services, "a red circle"))
    assert np.abs(pixels(with_lora) - base).max() > 20, "the LoRA must visibly change the image"
    assert np.abs(pixels(with_lora) - reference).max() <= 1
    assert same(before, snapshot(model))
    assert np.array_equal(pixels(gen(services, "a red circle")), base)


def test_multipliers_follow_a1111(services, folder):
    model = services.models.get()
    layers = make_layers(model.pipe, seed=1)
    save_file(kohya_file(model.pipe, layers), str(folder / "zq.safetensors"))
    base = pixels(gen(services, "a blue square"))
    assert np.array_equal(pixels(gen(services, "a blue square <lora:zq:0>")), base)
    cases = {
        "<lora:zq>": (1, 1),
        "<lora:zq:-0.5>": (-0.5, -0.5),
        "<lora:zq:0:1>": (0, 1),
        "<lora:zq:1:0>": (1, 0),
        "<lora:zq:unet=0.6>": (1, 0.6),
        "<lora:zq:0.3:te=0.8>": (0.8, 0.8),  # A1111: te= replaces the first value, and unet follows te
        "<lora:zq:0.3:unet=0.8>": (0.3, 0.8),
        "<lora:zq:0.4> <lora:zq:0.4>": (0.8, 0.8),
    }
    for tag, (te, unet) in cases.items():
        ours = gen(services, f"a blue square {tag}")
        assert ours.notes == [], tag
        with merged(layers, te, unet):
            reference = pixels(gen(services, "a blue square"))
        assert np.abs(pixels(ours) - reference).max() <= 1, tag

    # A1111's `dyn` (DyLoRA): the first ranks of each layer, at the file's alpha / full rank; a rank at or above the
    # file's is the whole file
    rank = layers[0].down.shape[0]
    first_two = [
        Layer(x.component, x.path, x.module, x.down[:2], x.up[:, :2], (x.alpha or rank) * 2 / rank) for x in layers
    ]
    for tag, (te, unet), reference_layers in [
        ("<lora:zq:1:1:2>", (1, 1), first_two),
        ("<lora:zq:0.7:dyn=2>", (0.7, 0.7), first_two),
        (f"<lora:zq:dyn={rank}>", (1, 1), layers),
    ]:
        ours = gen(services, f"a blue square {tag}")
        assert ours.notes == [], tag
        with merged(reference_layers, te, unet):
            reference = pixels(gen(services, "a blue square"))
        assert np.abs(pixels(ours) - reference).max() <= 1, tag
    assert not np.array_equal(
        pixels(gen(services, "a blue square <lora:zq:1:1:2>")), pixels(gen(services, "a blue square <lora:zq>"))
    )
    for bad in ("<lora:zq:1:1:0>", "<lora:zq:dyn=two>"):
        result = gen(services, f"a blue square {bad}")
        assert len(result.notes) == 1 and "is not a rank" in result.notes[0] and np.array_equal(pixels(result), base)


def test_two_loras_add_up_and_hashes_go_in_the_infotext(services, folder):
    model = services.models.get()
    a, b = make_layers(model.pipe, seed=2, te=False), make_layers(model.pipe, seed=3, convs=False, rank=2)
    save_file(kohya_file(model.pipe, a), str(folder / "zqa.safetensors"), metadata={"ss_output_name": "zq_alias"})
    (folder / "sub").mkdir()
    save_file(kohya_file(model.pipe, b, "diffusers"), str(folder / "sub" / "zqb.safetensors"))
    result = gen(services, "a green star <lora:zq_alias:0.5> <lora:zqb:1.2>")
    with merged(a, 0, 0.5), merged(b, 1.2, 1.2):
        reference = pixels(gen(services, "a green star"))
    assert np.abs(pixels(result) - reference).max() <= 1

    def addnet_hash(path):
        raw = path.read_bytes()
        return hashlib.sha256(raw[8 + int.from_bytes(raw[:8], "little") :]).hexdigest()[:12]

    expected = f'Lora hashes: "zq_alias: {addnet_hash(folder / "zqa.safetensors")}, zqb: ' + addnet_hash(
        folder / "sub" / "zqb.safetensors"
    )
    assert expected in result.infotexts[0]
    assert "<lora:zq_alias:0.5>" in result.infotexts[0].splitlines()[0], "the tags stay in the saved prompt"
    # one of them as LyCORIS's old `<lyco:...>` tag: both still apply together, as A1111 reads it
    mixed = gen(services, "a green star <lora:zq_alias:0.5> <lyco:zqb:1.2>")
    assert mixed.notes == [] and np.array_equal(pixels(mixed), pixels(result))
    assert expected in mixed.infotexts[0]


@pytest.fixture
def broken(services, folder):
    """One file of each kind that cannot be used, with a word its reason must contain."""
    model = services.models.get()
    good = kohya_file(model.pipe, make_layers(model.pipe, seed=4))
    save_file(good, str(folder / "zqgood.safetensors"))
    raw = (folder / "zqgood.safetensors").read_bytes()
    (folder / "zqtrunc.safetensors").write_bytes(raw[: len(raw) // 2])
    (folder / "zqempty.safetensors").write_bytes(b"")
    save_file(
        {"lora_unet_x.hada_w1_a": torch.zeros(2, 2), "lora_unet_x.hada_w1_b": torch.zeros(2, 2)},
        str(folder / "zqloha.safetensors"),
    )
    save_file(
        {k.replace("lora_te_", "lora_te2_"): v for k, v in good.items()},
        str(folder / "zqxl.safetensors"),
        metadata={"ss_base_model_version": "sdxl_base_v1-0"},
    )
    wide = {
        k: (torch.randn(v.shape[0], v.shape[1] * 2) if k.endswith("to_k.lora_down.weight") and v.ndim == 2 else v)
        for k, v in good.items()
    }
    save_file(wide, str(folder / "zqsd2.safetensors"))
    nan = dict(good)
    key = next(iter(nan))
    nan[key] = torch.full_like(nan[key], float("nan"))
    save_file(nan, str(folder / "zqnan.safetensors"))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, folder / "zqevil.pt")
    return {
        "zqtrunc": "safetensors",
        "zqempty": "empty",
        "zqloha": "LoHa",
        "zqxl": "sdxl",
        "zqsd2": "does not fit",
        "zqnan": "NaN",
        "zqevil": "could run code",
    }


def test_files_that_cannot_be_used_are_listed_with_the_reason(services, broken):
    rows = {r["name"]: r for r in services.loras.details()}
    assert rows["zqgood"]["usable"] is True
    # Listing reads headers only: no weights are held for it (NaN values show when the file is used).
    header = services.loras.db.load_path(services.settings.lora_dir / "zqgood.safetensors")
    assert all(layer.down.device.type == "meta" for layer in header.layers.values())
    assert rows["zqnan"]["usable"] is True
    for name, word in broken.items():
        if name == "zqnan":
            continue
        assert rows[name]["usable"] is False, name
        assert word.lower() in rows[name]["reason"].lower(), (name, rows[name]["reason"])


def test_bad_tags_generate_the_rest_and_say_why(services, broken):
    model = services.models.get()
    before = snapshot(model)
    base = pixels(gen(services, "a red circle"))
    tags = " ".join(f"<lora:{name}:1>" for name in broken)
    result = gen(services, f"a red circle {tags} <lora:nobody:1> <lora:zqgood:abc> <lora:zqgood:nan>")
    notes = " | ".join(result.notes)
    assert "'nobody' not found" in notes and "'abc' is not a number" in notes and "'nan'" in notes
    for name in broken:
        assert f"<lora:{name}:1>" in notes
    assert np.array_equal(pixels(result), base)
    assert "Lora hashes" not in result.infotexts[0]
    assert same(before, snapshot(model))


def test_switching_loras_keeps_the_loaded_checkpoint(services, folder):
    model = services.models.get()
    for i in range(2):
        save_file(kohya_file(model.pipe, make_layers(model.pipe, seed=10 + i)), str(folder / f"zqs{i}.safetensors"))
    images = [pixels(gen(services, f"a red circle <lora:zqs{i % 2}:1>")) for i in range(3)]
    assert services.models.get() is model
    assert np.array_equal(images[0], images[2]) and not np.array_equal(images[0], images[1])


# --lowvram's sequential offload cannot run on a CPU (accelerate fails moving weights between `meta` and the CPU even
# without a LoRA), so its weights-map path is checked by benchmarks/gpu_check.sh on a GPU.
@pytest.mark.parametrize("offload", [None, "model"])
def test_sdxl_lora_with_both_text_encoders_and_offload_hooks(offload):
    """Both SDXL text encoders and the UNet, also with --medvram's accelerate hooks moving the model."""
    from app.lora.apply import Application, lora_applied
    from app.lora.files import bind, parse_lora
    from app.lora.names import layer_table, model_components
    from app.models.default_model import build_tiny_sdxl_pipeline

    pipe = build_tiny_sdxl_pipeline()
    layers = make_layers(pipe, seed=5)
    assert {layer.component for layer in layers} == {"unet", "text_encoder", "text_encoder_2"}
    tokens = torch.tensor([[49406, 320, 1929, 49407]])
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def run():
        with torch.no_grad():
            e1 = pipe.text_encoder(tokens, output_hidden_states=True).hidden_states[-2]
            out2 = pipe.text_encoder_2(tokens, output_hidden_states=True)
            context = torch.cat([e1, out2.hidden_states[-2]], dim=-1)
            cond = {"text_embeds": out2.text_embeds, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
            return pipe.unet(sample, 10, context, added_cond_kwargs=cond).sample

    base = run()
    with merged(layers, 0.6, 0.9):
        reference = run()
    if offload == "model":
        pipe.enable_model_cpu_offload(device="cpu")
    bound = bind(parse_lora(kohya_file(pipe, layers)), layer_table(model_components(pipe)), "SDXL")
    assert len(bound) == len(layers)
    with lora_applied([Application(bound, 0.6, 0.9)]):
        ours = run()
    assert torch.equal(run(), base)
    assert (ours - base).abs().max() > 1e-2
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)


def decoded(answer: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))).convert("RGB"))


def test_api_lists_loras_and_generates_with_them(server, services):
    model = services.models.get()  # the same default model the server loaded
    folder = server.data_dir / "models" / "Lora"
    folder.mkdir(parents=True, exist_ok=True)
    api = server.url + "/sdapi/v1"
    assert "zqapi" not in [row["name"] for row in requests.get(api + "/loras", timeout=30).json()]
    save_file(
        kohya_file(model.pipe, make_layers(model.pipe, seed=6)),
        str(folder / "zqapi.safetensors"),
        metadata={"ss_output_name": "zqalias", "ss_network_dim": "4"},
    )
    (folder / "zqbad.safetensors").write_bytes(b"not a safetensors file")
    assert requests.post(api + "/refresh-loras", timeout=30).status_code == 200
    listing = {row["name"]: row for row in requests.get(api + "/loras", timeout=30).json()}
    assert listing["zqapi"]["alias"] == "zqalias" and listing["zqapi"]["metadata"]["ss_network_dim"] == "4"
    assert listing["zqapi"]["path"].endswith("zqapi.safetensors") and "zqbad" in listing
    payload = {"prompt": "a red circle", "steps": 4, "width": 64, "height": 64, "seed": 3}
    plain = requests.post(api + "/txt2img", json=payload, timeout=120).json()
    tagged = requests.post(api + "/txt2img", json={**payload, "prompt": "a red circle <lora:zqapi:0.8>"}, timeout=120)
    assert tagged.status_code == 200
    info = tagged.json()["info"]
    assert "Lora hashes" in info and not np.array_equal(decoded(tagged.json()), decoded(plain))
    bad = requests.post(api + "/txt2img", json={**payload, "prompt": "a red circle <lora:zqbad:1>"}, timeout=120)
    assert bad.status_code == 200 and np.array_equal(decoded(bad.json()), decoded(plain))
    assert "zqbad" in " ".join(json.loads(bad.json()["info"])["notes"])


def test_medvram_offload_hooks_keep_working_with_a_lora(services, folder):
    """--medvram: the model hook moves the whole UNet, merged weights included; hooks stay, the model is restored."""
    from app.models.manager import model_offloaded

    model = services.models.get()
    layers = make_layers(model.pipe, seed=8)
    save_file(kohya_file(model.pipe, layers), str(folder / "zqoff.safetensors"))
    with merged(layers, 0.9, 0.9):
        reference = pixels(gen(services, "a red circle"))
    base = pixels(gen(services, "a red circle"))
    before = snapshot(model)
    model.pipe.enable_model_cpu_offload(device="cpu")
    try:
        ours = pixels(gen(services, "a red circle <lora:zqoff:0.9>"))
        assert model_offloaded(model.pipe)
        assert np.abs(ours - reference).max() <= 1
        assert np.array_equal(pixels(gen(services, "a red circle")), base)
    finally:
        model.pipe.remove_all_hooks()
    assert same(before, snapshot(model))


def test_same_result_as_diffusers_load_lora_weights():
    """diffusers' own kohya loader (PEFT layers) as an independent implementation of the same file."""
    from app.lora.apply import Application, lora_applied
    from app.lora.files import bind, parse_lora
    from app.lora.names import layer_table, model_components
    from app.models.default_model import build_default_pipeline

    pipe = build_default_pipeline()
    layers = make_layers(pipe, seed=3, te=False)
    assert any(isinstance(layer.module, torch.nn.Conv2d) for layer in layers)
    data = kohya_file(pipe, layers, "diffusers")  # diffusers maps LDM names only for SD's own block counts
    run = unet_probe(pipe, seed=1, timestep=500)
    base = run()
    bound = bind(parse_lora(data), layer_table(model_components(pipe)), "SD 1.x")
    with lora_applied([Application(bound, 1.0, 0.7)]):
        ours = run()
    pipe.load_lora_weights({k: v.clone() for k, v in data.items()}, adapter_name="x")
    pipe.set_adapters(["x"], adapter_weights=[0.7])
    theirs = run()
    assert (ours - base).abs().max() > 0.1
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("style", ["ldm", "diffusers", "peft"])
def test_sd2_layout_loras(style):
    """SD 2.x: linear proj_in/proj_out, a 1024-wide OpenCLIP text encoder under HF names (as kohya writes them)."""
    from app.lora.apply import Application, lora_applied
    from app.lora.files import bind, parse_lora
    from app.lora.names import layer_table, model_components
    from app.models.default_model import build_tiny_sd2_pipeline

    pipe = build_tiny_sd2_pipeline()
    layers = make_layers(pipe, seed=9, alpha=None if style == "peft" else 3.0)
    assert any(layer.path.endswith("proj_in") and isinstance(layer.module, torch.nn.Linear) for layer in layers)
    data = peft_file(layers) if style == "peft" else kohya_file(pipe, layers, style)
    bound = bind(parse_lora(data), layer_table(model_components(pipe)), "SD 2.x")
    tokens = torch.tensor([[49406, 320, 1929, 49407]])
    sample = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))

    def run():
        with torch.no_grad():
            context = pipe.text_encoder(tokens, output_hidden_states=True).hidden_states[-1]
            return pipe.unet(sample, 10, context).sample

    base = run()
    with lora_applied([Application(bound, 0.5, 1.5)]):
        ours = run()
    assert torch.equal(run(), base)
    with merged(layers, 0.5, 1.5):
        reference = run()
    assert (ours - base).abs().max() > 1e-2
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-4)
