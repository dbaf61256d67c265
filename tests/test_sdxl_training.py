"""Training on SDXL with the one engine: clip_l/clip_g embeddings (created, trained, resumed, loaded by diffusers),
the size conditioning and pooled embedding every sample gets, hypernetworks and LoRAs, and what is refused."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from app.embeddings.service import initial_vectors
from app.errors import UserError
from app.hypernetworks.attention import attention_widths
from app.lora.files import read_lora_file
from app.training.config import LoraNetwork
from app.training.dataset import crop_of_fit, load_dataset
from tests.test_lora_training import tensors
from tests.test_training import cfg, make_dataset, state_hash


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("xl-stars"))


def fresh_embedding(xl, name, n=2, init="red circle"):
    path = xl.embeddings.create(name, n, init, overwrite=True)
    path.with_suffix(".optim").unlink(missing_ok=True)
    return path


# -- size conditioning -------------------------------------------------------------------------------------------


def test_crop_of_fit_is_where_the_kept_box_starts():
    assert crop_of_fit((1000, 500), 256, 256) == (0, 128)  # wide: the sides are cut
    assert crop_of_fit((500, 1000), 256, 256) == (128, 0)  # tall: top and bottom are cut
    assert crop_of_fit((640, 480), 64, 48) == (0, 0)  # same aspect: nothing is cut


def test_dataset_keeps_each_images_original_size_and_crop(tmp_path):
    Image.new("RGB", (1000, 500), (200, 10, 10)).save(tmp_path / "wide.png")
    Image.new("RGB", (100, 60), (10, 200, 10)).save(tmp_path / "small.png")
    images, _ = load_dataset(str(tmp_path), 256, 256, ["[filewords]"], 0, False)
    by_name = {im.path.stem: im for im in images}
    assert by_name["wide"].time_ids() == [500, 1000, 0, 128, 256, 256]
    assert by_name["small"].time_ids() == [60, 100, 0, 85, 256, 256]
    # "Do not resize images": each image keeps its own size (rounded down to 8) and says so.
    images, _ = load_dataset(str(tmp_path), 256, 256, ["[filewords]"], 0, True)
    by_name = {im.path.stem: im for im in images}
    assert by_name["wide"].time_ids() == [500, 1000, 2, 0, 496, 1000]
    assert by_name["small"].time_ids() == [60, 100, 1, 0, 56, 96]


def test_every_training_sample_gets_its_pooled_embedding_and_size_conditioning(xl, tmp_path):
    folder = tmp_path / "sizes"
    folder.mkdir()
    for i, size in enumerate([(96, 64), (64, 128), (64, 64)]):
        Image.new("RGB", size, (60 * i, 100, 200)).save(folder / f"{i}-a shape.png")
    fresh_embedding(xl, "zqxlsizes")
    unet = xl.models.get().pipe.unet
    seen = []

    def hook(module, args, kwargs):
        added = kwargs.get("added_cond_kwargs")
        seen.append(None if added is None else {k: v.detach().clone() for k, v in added.items()})

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        result = xl.training.train_embedding(
            cfg("zqxlsizes", folder, steps=3, batch_size=3, template_filename="subject.txt")
        ).wait()
    finally:
        handle.remove()
    assert result.error is None, result.error
    assert len(seen) == 3 and all(s is not None for s in seen)
    for added in seen:
        assert added["text_embeds"].shape == (3, 32)
        rows = sorted(tuple(r) for r in added["time_ids"].tolist())
        assert rows == [(64, 64, 0, 0, 64, 64), (64, 96, 0, 16, 64, 64), (128, 64, 32, 0, 64, 64)]


def test_with_buckets_each_sample_is_conditioned_on_its_bucket_and_crop(xl, tmp_path):
    """Bucketing: batches of one bucket each, and the target size in SDXL's conditioning is the bucket's."""
    folder = tmp_path / "buckets"
    folder.mkdir()
    for i, size in enumerate([(96, 64), (96, 64), (64, 128), (64, 128)]):
        Image.new("RGB", size, (60 * i, 100, 200)).save(folder / f"{i}-a shape.png")
    fresh_embedding(xl, "zqxlbuckets")
    unet = xl.models.get().pipe.unet
    seen = []

    def hook(module, args, kwargs):
        seen.append((args[0].shape, kwargs["added_cond_kwargs"]["time_ids"].tolist()))

    handle = unet.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        result = xl.training.train_embedding(
            cfg("zqxlbuckets", folder, steps=4, batch_size=2, template_filename="subject.txt", enable_bucket=True)
        ).wait()
    finally:
        handle.remove()
    assert result.error is None, result.error
    wide = (64, 96, 3, 0, 48, 80)  # 3:2 in the 5:3 bucket (80x48 px): a little of the top and bottom cut
    tall = (128, 64, 0, 2, 88, 40)  # 1:2 in the 5:11 bucket (40x88 px): a little of the sides cut
    assert len(seen) == 4
    for shape, rows in seen:
        assert len({tuple(r) for r in rows}) == 1  # one bucket per batch
        target = rows[0]
        assert tuple(target) in (wide, tall), target
        assert shape[-2:] == (target[4] // 8, target[5] // 8)  # the latents are the bucket's size


# -- embeddings ----------------------------------------------------------------------------------------------------


def test_create_on_sdxl_makes_clip_l_and_clip_g_from_each_tokenizer(xl):
    path = fresh_embedding(xl, "zqxlnew", n=3, init="red circle")
    assert path.name == "zqxlnew.safetensors"
    data, metadata = tensors(path)
    assert set(data) == {"clip_l", "clip_g"} and metadata["step"] == "0" and metadata["name"] == "zqxlnew"
    pipe = xl.models.get().pipe
    expected_l = initial_vectors(pipe.tokenizer, pipe.text_encoder.get_input_embeddings(), "red circle", 3)
    expected_g = initial_vectors(pipe.tokenizer_2, pipe.text_encoder_2.get_input_embeddings(), "red circle", 3)
    assert data["clip_l"].shape == (3, 32) and data["clip_g"].shape == (3, 64)
    torch.testing.assert_close(data["clip_l"], expected_l, rtol=0, atol=0)
    torch.testing.assert_close(data["clip_g"], expected_g, rtol=0, atol=0)
    assert xl.embeddings.listing()["loaded"]["zqxlnew"]["shape"] == 96


def test_sdxl_embedding_trains_both_parts_resumes_exactly_and_touches_nothing_else(xl, dataset):
    model = xl.models.get()
    frozen = ("unet", "text_encoder", "text_encoder_2", "vae")
    before = {name: state_hash(getattr(model.pipe, name)) for name in frozen}
    path = fresh_embedding(xl, "zqxltrain")
    initial, _ = tensors(path)
    result = xl.training.train_embedding(
        cfg("zqxltrain", dataset, steps=6, save_every=3, create_image_every=3, template_filename="subject.txt")
    ).wait()
    assert result.error is None, result.error
    straight, metadata = tensors(path)
    assert metadata["step"] == "6" and metadata["sd_checkpoint_name"] == model.info.model_name
    for part in ("clip_l", "clip_g"):
        assert not torch.equal(straight[part], initial[part]), part
    copies = sorted(p.name for p in (result.log_dir / "embeddings").iterdir())
    assert copies == ["zqxltrain-3.safetensors", "zqxltrain-6.safetensors"]
    copy_data, copy_meta = tensors(result.log_dir / "embeddings" / "zqxltrain-3.safetensors")
    assert set(copy_data) == {"clip_l", "clip_g"} and copy_meta["step"] == "3"
    assert (result.log_dir / "images" / "zqxltrain-6.png").is_file()
    assert before == {name: state_hash(getattr(model.pipe, name)) for name in frozen}

    # Three steps, then on to six from the file's own step count: bit for bit the same file.
    fresh_embedding(xl, "zqxltrain")
    first = xl.training.train_embedding(cfg("zqxltrain", dataset, steps=3, template_filename="subject.txt")).wait()
    assert first.error is None
    assert tensors(path)[1]["step"] == "3"
    second = xl.training.train_embedding(cfg("zqxltrain", dataset, steps=6, template_filename="subject.txt")).wait()
    assert second.error is None and second.step == 6
    resumed, _ = tensors(path)
    for part in ("clip_l", "clip_g"):
        assert torch.equal(resumed[part], straight[part]), part


def test_nan_on_sdxl_stops_and_keeps_the_last_good_file(xl, dataset):
    path = fresh_embedding(xl, "zqxlnan")
    before, _ = tensors(path)
    result = xl.training.train_embedding(
        cfg("zqxlnan", dataset, steps=20, learn_rate="1e38", template_filename="subject.txt")
    ).wait()
    assert result.error and "kept" in result.error
    after, _ = tensors(path)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert result.step < 20 or all(torch.equal(before[k], after[k]) for k in before)


def test_trained_sdxl_embedding_loads_in_diffusers_and_encodes_like_ours(xl, dataset):
    from diffusers import StableDiffusionXLPipeline

    path = fresh_embedding(xl, "zqxldiff")
    result = xl.training.train_embedding(cfg("zqxldiff", dataset, steps=3, template_filename="subject.txt")).wait()
    assert result.error is None
    parts, _ = tensors(path)
    model = xl.models.get()
    xl.embeddings.refresh()
    prompt = "a zqxldiff on grass"
    components = {
        **model.pipe.components,
        "text_encoder": copy.deepcopy(model.pipe.text_encoder),
        "text_encoder_2": copy.deepcopy(model.pipe.text_encoder_2),
        "tokenizer": copy.deepcopy(model.pipe.tokenizer),
        "tokenizer_2": copy.deepcopy(model.pipe.tokenizer_2),
    }
    pipe = StableDiffusionXLPipeline(**components)
    with torch.no_grad():
        plain = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)[0]
        # diffusers' documented way: one call per encoder, the same token for both.
        pipe.load_textual_inversion(
            parts["clip_l"], token="zqxldiff", text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
        )
        pipe.load_textual_inversion(
            parts["clip_g"], token="zqxldiff", text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
        )
        theirs, _, pooled_theirs, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        ours, pooled_ours = model.encoder.encode_with_pooled([prompt])
    assert (theirs - plain).abs().max() > 1e-3  # the embedding changed diffusers' conditioning
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled_ours, pooled_theirs, atol=1e-5, rtol=1e-5)


def test_sd1_embedding_on_sdxl_is_refused_with_the_dimensions(xl, dataset):
    folder = xl.settings.embeddings_dir
    torch.save({"emb_params": torch.randn(1, 768)}, folder / "zqsd1emb.pt")
    xl.embeddings.refresh()
    with pytest.raises(UserError, match=r"768 wide but the loaded model needs 96"):
        xl.training.train_embedding(cfg("zqsd1emb", dataset, steps=2, template_filename="subject.txt"))


def test_sdxl_embedding_on_sd1_is_refused_with_the_dimensions(services, dataset):
    folder = services.settings.embeddings_dir
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"clip_l": torch.randn(1, 32), "clip_g": torch.randn(1, 64)}, str(folder / "zqxlonsd1.safetensors"))
    services.embeddings.refresh()
    with pytest.raises(UserError, match=r"96 wide but the loaded model needs \d+"):
        services.training.train_embedding(cfg("zqxlonsd1", dataset, steps=2, template_filename="subject.txt"))


def test_sdxl_embedding_missing_a_part_is_refused_and_left_untouched(xl, dataset):
    path = xl.settings.embeddings_dir / "zqxlhalf.safetensors"
    save_file({"clip_l": torch.randn(2, 32)}, str(path))
    before = path.read_bytes()
    xl.embeddings.refresh()
    with pytest.raises(UserError, match="needs both 'clip_l' and 'clip_g'"):
        xl.training.train_embedding(cfg("zqxlhalf", dataset, steps=2, template_filename="subject.txt"))
    assert path.read_bytes() == before and not path.with_suffix(".optim").exists()


# -- hypernetworks and LoRAs ---------------------------------------------------------------------------------------


def test_hypernetwork_trains_for_the_sdxl_widths(xl, dataset):
    from app.hypernetworks.files import read_hypernetwork_file

    widths = sorted(attention_widths(xl.models.get().pipe.unet))
    assert 96 in widths  # the context: both encoders side by side
    path, warnings = xl.hypernetworks.create("zqxlhn", widths, "1, 2, 1", "relu", "XavierNormal", overwrite=True)
    path.with_suffix(".optim").unlink(missing_ok=True)
    assert warnings == []
    before = read_hypernetwork_file(path)
    result = xl.training.train_hypernetwork(
        cfg("zqxlhn", dataset, steps=4, template_filename="hypernetwork.txt", learn_rate="0.001")
    ).wait()
    assert result.error is None and result.step == 4
    after = read_hypernetwork_file(path)
    assert after.step == 4 and sorted(after.widths) == widths
    pairs = {w: zip(before.parameters_for({w}), after.parameters_for({w}), strict=True) for w in widths}
    changed = {w for w, pair in pairs.items() if any(not torch.equal(a, b) for a, b in pair)}
    assert 96 in changed


def test_lora_trains_on_sdxl_with_both_text_encoders_and_diffusers_loads_it(xl, dataset):
    from diffusers import StableDiffusionXLPipeline

    from app.lora.apply import Application, lora_applied
    from app.lora.files import bind
    from app.lora.names import layer_table, model_components
    from app.models.default_model import build_tiny_sdxl_pipeline

    for suffix in (".safetensors", ".optim"):
        (xl.settings.lora_dir / f"zqxllora{suffix}").unlink(missing_ok=True)
    job = xl.training.train_lora(
        cfg("zqxllora", dataset, steps=3, template_filename="hypernetwork.txt", learn_rate="0.002"),
        LoraNetwork(rank=4, alpha=4.0, train_text_encoder=True),
    )
    assert job.wait().error is None
    path = xl.settings.lora_dir / "zqxllora.safetensors"
    data, metadata = tensors(path)
    prefixes = {k.split("_text_model")[0] if "_text_model" in k else "lora_unet" for k in data}
    assert prefixes == {"lora_unet", "lora_te1", "lora_te2"}
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0" and metadata["ss_steps"] == "3"

    pipe = build_tiny_sdxl_pipeline()  # the same weights as the selected model, a copy for diffusers to change
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 8, 8, generator=g)
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]])

    def run():
        with torch.no_grad():
            cond, _, pooled, _ = pipe.encode_prompt("a red star", device="cpu", do_classifier_free_guidance=False)
            added = {"text_embeds": pooled, "time_ids": time_ids}
            return pipe.unet(sample, 500, cond, added_cond_kwargs=added).sample

    base = run()
    bound = bind(read_lora_file(path), layer_table(model_components(pipe)), "SDXL")
    with lora_applied([Application(bound, 1.0, 1.0)]):
        ours = run()
    assert isinstance(pipe, StableDiffusionXLPipeline)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="t")
    theirs = run()
    assert (ours - base).abs().max() > 1e-4
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


# -- over HTTP, as an A1111 API client does it ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def xl_server(tmp_path_factory, model_store):
    """`webui.py --api` with both shipped shapes models; the client switches to shapes-xl itself."""
    from tests.conftest import make_data_dir, serve

    base = tmp_path_factory.mktemp("xl-server")
    data = make_data_dir(base / "data", model_store, ("shapes-64", "shapes-xl"))
    yield from serve(data, ["--api"], base / "server.log", "/sdapi/v1/sd-models")


def test_sdxl_embedding_and_hypernetwork_train_through_the_api(xl_server, dataset):
    import requests

    from tests.test_training_api import payload

    url = f"{xl_server.url}/sdapi/v1"
    titles = [m["model_name"] for m in requests.get(f"{url}/sd-models", timeout=30).json()]
    assert titles == ["shapes-64", "shapes-xl"]
    assert requests.post(f"{url}/options", json={"sd_model_checkpoint": "shapes-xl"}, timeout=120).status_code == 200
    assert requests.get(f"{url}/options", timeout=30).json()["sd_model_checkpoint"].startswith("shapes-xl")

    created = requests.post(
        f"{url}/create/embedding", json={"name": "apixl", "num_vectors_per_token": 2, "init_text": "red"}, timeout=30
    )
    path = xl_server.data_dir / "embeddings" / "apixl.safetensors"
    assert created.status_code == 200 and created.json() == {"info": f"create embedding filename: {path}"}
    trained = requests.post(f"{url}/train/embedding", json=payload("apixl", dataset, steps=4), timeout=300)
    assert trained.json() == {"info": f"train embedding complete: filename: {path} error: None"}
    entry = requests.get(f"{url}/embeddings", timeout=30).json()["loaded"]["apixl"]
    assert entry["step"] == 4 and entry["shape"] == 64 + 64 and entry["vectors"] == 2  # clip_l + clip_g
    data, metadata = tensors(path)
    assert set(data) == {"clip_l", "clip_g"} and metadata["step"] == "4"

    # shapes-xl's cross-attention context: both encoders side by side, 64 + 64 wide.
    created = requests.post(f"{url}/create/hypernetwork", json={"name": "apixlhn", "enable_sizes": [128]}, timeout=30)
    assert created.status_code == 200, created.text
    skip = ("embedding_name", "save_embedding_every", "save_image_with_stored_embedding")
    body = {k: v for k, v in payload("apixlhn", dataset, steps=3).items() if k not in skip}
    body.update(hypernetwork_name="apixlhn", save_hypernetwork_every=0, learn_rate="0.0001")
    trained = requests.post(f"{url}/train/hypernetwork", json=body, timeout=300)
    assert trained.status_code == 200 and trained.json()["info"].endswith("error: None"), trained.text
    image = requests.post(
        f"{url}/txt2img",
        json={"prompt": "a apixl circle <hypernet:apixlhn:1>", "steps": 4, "width": 64, "height": 64},
        timeout=120,
    ).json()
    assert "TI hashes" in image["info"] and "apixlhn" in image["info"]


def test_do_not_resize_gives_each_image_its_own_size_conditioning(xl, tmp_path):
    folder = tmp_path / "varsize"
    folder.mkdir()
    Image.new("RGB", (100, 60), (200, 100, 20)).save(folder / "0-a shape.png")
    Image.new("RGB", (72, 80), (20, 100, 200)).save(folder / "1-a shape.png")
    fresh_embedding(xl, "zqxlvarsize")
    unet = xl.models.get().pipe.unet
    seen = []
    handle = unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(tuple(kwargs["added_cond_kwargs"]["time_ids"][0].tolist())),
        with_kwargs=True,
    )
    try:
        result = xl.training.train_embedding(
            cfg("zqxlvarsize", folder, steps=4, varsize=True, template_filename="subject.txt")
        ).wait()
    finally:
        handle.remove()
    assert result.error is None, result.error
    assert set(seen) == {(60, 100, 1, 0, 56, 96), (80, 72, 0, 0, 80, 72)}
