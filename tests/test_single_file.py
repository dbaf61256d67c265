"""Single-file (LDM layout) checkpoints: exported tiny model loads back and draws the same image; detection; bad
files refused while the current model stays loaded."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import requests
import torch
from safetensors.torch import save_file

from app.errors import UserError
from app.generation.txt2img import Txt2ImgParams
from app.models.default_model import DEFAULT_MODEL_NAME, build_default_pipeline
from app.models.ldm_export import export_sd1, meta_pipeline
from app.models.single_file import CONFIG_DIR, detect, read_header
from tests.conftest import make_data_dir

PARAMS = dict(
    prompt="a red circle",
    negative_prompt="blurry",
    width=64,
    height=64,
    steps=6,
    seed=5,
    sampler_name="Euler",
    save_images=False,
)


@pytest.fixture(scope="module")
def own(tmp_path_factory, model_store):
    """Services of their own (this module switches checkpoints), with the tiny model also as a single file."""
    from app.services import build_services
    from app.settings import Settings

    data = make_data_dir(tmp_path_factory.mktemp("single"), model_store)
    save_file(export_sd1(folder_pipeline(model_store)), str(data / "models" / "Stable-diffusion" / "tiny.safetensors"))
    return build_services(Settings(data_dir=data))


def folder_pipeline(model_store):
    """The default model's architecture with the weights of its folder (the shipped, trained ones)."""
    from safetensors.torch import load_file

    pipe = build_default_pipeline()
    folder = model_store / DEFAULT_MODEL_NAME
    for name in ("unet", "vae", "text_encoder"):
        (weights,) = (folder / name).glob("*.safetensors")
        getattr(pipe, name).load_state_dict(load_file(str(weights)))
    return pipe


def image(services):
    return np.asarray(services.txt2img.generate(Txt2ImgParams(**PARAMS)).images[0], dtype=np.int16)


def test_exported_single_file_gives_the_folders_image(own):
    folder_image = image(own)
    info = own.select_checkpoint("tiny.safetensors")
    assert info.title.startswith("tiny.safetensors [") and info.model_name == "tiny"
    single_image = image(own)
    assert np.abs(folder_image - single_image).max() <= 1
    result = own.txt2img.generate(Txt2ImgParams(**PARAMS))
    assert "Model: tiny," in result.infotexts[0] and f"Model hash: {info.short_hash}," in result.infotexts[0]
    own.select_checkpoint("shapes-64")


def test_ckpt_loads_only_through_weights_only(own, tmp_path):
    ckpt_dir = own.settings.ckpt_dir
    torch.save({"state_dict": export_sd1(build_default_pipeline())}, ckpt_dir / "plain.ckpt")
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"state_dict": {"model.diffusion_model.x": Payload()}}, ckpt_dir / "evil.ckpt")
    own.models.refresh()
    own.select_checkpoint("plain.ckpt")
    assert own.models.get().info.name == "plain.ckpt"
    with pytest.raises(UserError, match="refused: it holds Python objects"):
        own.select_checkpoint("evil.ckpt")
    assert not marker.exists()
    assert own.models.get().info.name == "plain.ckpt"  # the previous model stays loaded
    own.select_checkpoint("shapes-64")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x00\x01not a header", "not a readable safetensors file"),
        ("truncate", "not a readable safetensors file"),
    ],
)
def test_broken_files_are_refused_and_the_model_stays(own, content, message):
    path = own.settings.ckpt_dir / "broken.safetensors"
    if content == "truncate":
        save_file(export_sd1(build_default_pipeline()), str(path))
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(content)
    own.models.refresh()
    before = own.models.get()
    with pytest.raises(UserError, match=message):
        own.select_checkpoint("broken.safetensors")
    assert own.models.get() is before
    path.unlink()
    own.models.refresh()


def meta_sd1_header(config: str) -> dict[str, tuple]:
    """Key -> shape of a full-size checkpoint of a shipped config, built on the meta device (no memory)."""
    return {k: tuple(v.shape) for k, v in export_sd1(meta_pipeline(CONFIG_DIR / config)).items()}


def test_full_size_sd15_layout_is_detected_as_sd1():
    header = meta_sd1_header("sd1")
    assert header["model.diffusion_model.input_blocks.0.0.weight"] == (320, 4, 3, 3)
    assert detect(header, "v1-5-pruned-emaonly.safetensors").name == "sd1"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"conditioner.embedders.1.model.ln_final.weight": (1280,)}, "XL-like with 768-wide text conditioning"),
        ({"model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}, "inpainting"),
    ],
)
def test_other_architectures_say_what_they_are(extra, message):
    header = {**meta_sd1_header("sd1"), **extra}
    with pytest.raises(UserError, match=message):
        detect(header, "model.safetensors")


def test_lora_and_vae_files_are_recognised():
    with pytest.raises(UserError, match="looks like a LoRA"):
        detect({"lora_unet_down_blocks_0_attentions_0.lora_down.weight": (4, 320)}, "style.safetensors")
    with pytest.raises(UserError, match="looks like a VAE"):
        detect({"encoder.down.0.block.0.conv1.weight": (128, 128, 3, 3)}, "vae.safetensors")


def test_tiny_config_matches_the_default_model():
    pipe = build_default_pipeline()
    for component in ("unet", "vae"):
        shipped = json.loads((CONFIG_DIR / "tiny-sd1" / component / "config.json").read_text())
        built = {k: v for k, v in dict(getattr(pipe, component).config).items() if not k.startswith("_")}
        assert {k: (list(v) if isinstance(v, tuple) else v) for k, v in built.items()} == shipped


def test_shapes_xl_saved_as_a_single_file_loads_back_weight_for_weight(model_store, tmp_path):
    """shapes-xl's architecture has a shipped config (`shapes-sdxl`), so a file made from it (a merge, a LoRA baked
    in, an export) loads: every weight of the loaded file is the folder model's, and the config is the model's."""
    from app.models.checkpoints import CheckpointInfo
    from app.models.ldm_export import export_sdxl
    from app.models.manager import read_pipeline
    from app.models.single_file import load_single_file

    folder = model_store / "shapes-xl"
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        shipped = json.loads((CONFIG_DIR / "shapes-sdxl" / component / "config.json").read_text())
        built = json.loads((folder / component / "config.json").read_text())
        assert {k: v for k, v in built.items() if k in shipped} == shipped, component
    pipe = read_pipeline(CheckpointInfo(folder, "shapes-xl", "diffusers"), torch.float32)
    path = tmp_path / "shapes-xl.safetensors"
    save_file(export_sdxl(pipe), str(path))
    assert detect(read_header(path), path.name).name == "shapes-sdxl"
    loaded = load_single_file(path, torch.float32)
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        mine = dict(getattr(loaded, component).state_dict())
        for key, value in getattr(pipe, component).state_dict().items():
            if key.endswith("position_ids"):
                continue
            assert torch.equal(mine[key], value), (component, key)


def test_switch_to_a_single_file_through_the_api(server):
    save_file(
        export_sd1(build_default_pipeline()),
        str(server.data_dir / "models" / "Stable-diffusion" / "apitiny.safetensors"),
    )
    url = f"{server.url}/sdapi/v1"
    assert requests.post(f"{url}/refresh-checkpoints", timeout=30).status_code == 200
    titles = [m["title"] for m in requests.get(f"{url}/sd-models", timeout=30).json()]
    assert "apitiny.safetensors" in titles  # hash unknown until first load, as A1111
    assert (
        requests.post(f"{url}/options", json={"sd_model_checkpoint": "apitiny.safetensors"}, timeout=60).status_code
        == 200
    )
    current = requests.get(f"{url}/options", timeout=30).json()["sd_model_checkpoint"]
    assert current.startswith("apitiny.safetensors [")
    body = requests.post(
        f"{url}/txt2img", json={"prompt": "x", "steps": 2, "width": 64, "height": 64}, timeout=60
    ).json()
    assert "Model: apitiny," in json.loads(body["info"])["infotexts"][0]
    requests.post(f"{url}/options", json={"sd_model_checkpoint": "shapes-64"}, timeout=60)


def test_old_a1111_hash_finds_the_checkpoint(own):
    from app.models.hashes import old_hash

    path = own.settings.ckpt_dir / "tiny.safetensors"
    assert own.models.find(old_hash(path)).path == path


@pytest.fixture(scope="module")
def sd2_files(own):
    """A tiny SD 2.x-style model as a diffusers folder and as an exported single file."""
    from app.models.default_model import build_tiny_sd2_pipeline
    from app.models.ldm_export import export_sd2

    pipe = build_tiny_sd2_pipeline()
    ckpt = own.settings.ckpt_dir
    pipe.save_pretrained(ckpt / "tiny2-folder")
    for name in ("vocab.json", "merges.txt"):
        (ckpt / "tiny2-folder" / "tokenizer" / name).write_bytes((CONFIG_DIR.parent / "tokenizer" / name).read_bytes())
    save_file(export_sd2(pipe), str(ckpt / "tiny2.safetensors"))
    own.models.refresh()
    return ckpt


def test_sd2_style_single_file_matches_its_diffusers_folder(own, sd2_files):
    own.select_checkpoint("tiny2-folder")
    folder_model = own.models.get()
    assert folder_model.pipe.tokenizer.pad_token_id == 0  # OpenCLIP pads with "!"
    folder_image = image(own)
    own.select_checkpoint("tiny2.safetensors")
    single = own.models.get()
    assert single.pipe.tokenizer.pad_token_id == 0 and single.text_width == 96
    assert np.abs(folder_image - image(own)).max() <= 1
    own.select_checkpoint("shapes-64")


def test_sidecar_yaml_selects_v_prediction(own, sd2_files):
    (sd2_files / "tiny2.yaml").write_text('model:\n  params:\n    parameterization: "v"\n', encoding="utf-8")
    try:
        own.select_checkpoint("tiny2.safetensors")
        assert own.models.get().pipe.scheduler.config.prediction_type == "v_prediction"
        assert image(own).std() > 1
    finally:
        own.select_checkpoint("shapes-64")
        (sd2_files / "tiny2.yaml").unlink()


def test_full_size_sd2_layout_is_detected_as_sd2():
    from app.models.ldm_export import export_sd2

    header = {k: tuple(v.shape) for k, v in export_sd2(meta_pipeline(CONFIG_DIR / "sd2")).items()}
    assert detect(header, "v2-1_768-ema-pruned.safetensors").name == "sd2"


def test_ckpt_flag_picks_the_model_at_start(tmp_path, model_store):
    from app.services import build_services
    from app.settings import Settings

    data = make_data_dir(tmp_path / "data", model_store)
    single = tmp_path / "elsewhere" / "chosen.safetensors"
    single.parent.mkdir()
    save_file(export_sd1(build_default_pipeline()), str(single))
    services = build_services(Settings(data_dir=data, ckpt=single))
    assert services.models.get().info.path == single
    assert services.options["sd_model_checkpoint"].startswith("chosen.safetensors [")


def test_hypernetwork_applies_to_sd2_context_width(own, sd2_files):
    own.select_checkpoint("tiny2.safetensors")
    try:
        own.hypernetworks.create("sd2hn", [96], "1, 2, 1", "relu", "XavierNormal", overwrite=True)
        plain = image(own)
        with_hn = own.txt2img.generate(Txt2ImgParams(**{**PARAMS, "prompt": "a red circle <hypernet:sd2hn:1>"}))
        assert with_hn.notes == []
        assert not np.array_equal(plain, np.asarray(with_hn.images[0], dtype=np.int16))
    finally:
        own.select_checkpoint("shapes-64")
