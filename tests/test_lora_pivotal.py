"""Pivotal tuning: a LoRA trained together with a new embedding (its trigger word), both saved in one file as A1111
bundles embeddings in LoRAs. The embedding starts from its init text, has its own learning rate, resumes bit for
bit with the layers, and works with `<lora:...>` in a prompt."""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from app.embeddings.service import model_initial_vectors
from app.errors import UserError
from app.training.config import LoraNetwork, PivotalEmbedding
from tests.test_lora import gen, pixels
from tests.test_lora_training import clean, lora_cfg, tensors
from tests.test_training import make_dataset

KEY = "bundle_emb.zqtok.string_to_param.*"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("pivotal-stars"))


def pivotal_cfg(name, dataset, **kw):
    return lora_cfg(name, dataset, template_filename="subject_filewords.txt", **kw)


def test_the_embedding_starts_from_its_init_text_trains_at_its_own_rate_and_the_word_works(services, dataset):
    model = services.models.get()
    start = model_initial_vectors(model, "star", 2)
    vectors = {}
    for name, rate in (("zqpivfrozen", "0"), ("zqpiv", "0.01")):
        clean(services, name)
        run = pivotal_cfg(name, dataset, steps=6, embedding_lr=rate, create_image_every=3)
        result = services.training.train_lora(
            run, LoraNetwork(rank=4, alpha=4.0), PivotalEmbedding(name="zqtok", vectors=2, init_text="star")
        ).wait()
        assert result.error is None and result.step == 6
        data, meta = tensors(services.settings.lora_dir / f"{name}.safetensors")
        assert data[KEY].dtype == torch.float32 and data[KEY].shape == (2, model.text_width)
        assert any(k.startswith("lora_unet_") for k in data) and meta["ss_steps"] == "6"
        vectors[name] = data[KEY]
        preview = Image.open(result.log_dir / "images" / f"{name}-3.png")
        assert preview.info["parameters"].startswith("a "), "previews use the training prompt"
        assert "zqtok" in preview.info["parameters"].splitlines()[0]
    # at rate 0 the vectors are exactly the init text's token embeddings (A1111's spreading over the rows) ...
    assert torch.equal(vectors["zqpivfrozen"], start)
    # ... at its own rate they move: the word was in the prompts and its gradient reached it
    assert (vectors["zqpiv"] - start).abs().max() > 1e-3

    used = gen(services, "a zqtok <lora:zqpiv>")
    assert used.notes == []
    assert 'TI hashes: "zqtok: zqpiv"' in used.infotexts[0]
    assert np.abs(pixels(used) - pixels(gen(services, "a zqtok <lora:zqpivfrozen>"))).max() > 0


def test_resume_ends_bit_identical_with_the_embedding_in_its_own_group(services, dataset):
    for name in ("zqpivstraight", "zqpivresumed"):
        clean(services, name)
    settings = dict(steps=6, batch_size=2, seed=5, embedding_lr="0.02", text_encoder_lr="0.0005")
    network = LoraNetwork(rank=4, alpha=4.0, train_text_encoder=True)
    bundle = PivotalEmbedding(name="zqtok", vectors=2, init_text="yellow star")
    straight = services.training.train_lora(pivotal_cfg("zqpivstraight", dataset, **settings), network, bundle)
    assert straight.wait().error is None
    first = services.training.train_lora(
        pivotal_cfg("zqpivresumed", dataset, **{**settings, "steps": 3}), network, bundle
    )
    assert first.wait().step == 3
    # continued: the file's bundled embedding trains on, without naming it again
    rest = services.training.train_lora(
        pivotal_cfg("zqpivresumed", dataset, **settings), LoraNetwork(rank=4, alpha=4.0, train_text_encoder=True)
    ).wait()
    assert rest.error is None and rest.step == 6
    a, _ = tensors(services.settings.lora_dir / "zqpivstraight.safetensors")
    b, _ = tensors(services.settings.lora_dir / "zqpivresumed.safetensors")
    assert KEY in a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    optim = torch.load(services.settings.lora_dir / "zqpivresumed.optim", weights_only=True)
    groups = optim["optimizer_state_dict"]["param_groups"]
    assert [g["lr"] for g in groups] == [0.001, 0.0005, 0.02]  # the UNet's, the text encoder's, the embedding's
    assert len(groups[2]["params"]) == 1


def test_bundle_settings_that_cannot_work_are_refused_before_anything_runs(services, dataset):
    embeddings = services.settings.embeddings_dir
    embeddings.mkdir(parents=True, exist_ok=True)
    torch.save({"string_to_param": {"*": torch.zeros(1, services.models.get().text_width)}}, embeddings / "zqhas.pt")
    cases = [
        (dict(name="zq.dot"), "bundle_embedding", "letters, digits"),
        (dict(name="zqhas"), "bundle_embedding", "zqhas.pt in the embeddings folder"),
        (dict(name="zqtok", vectors=0), "bundle_vectors", "between 1 and 75"),
        (dict(name="zqtok", template="hypernetwork.txt"), "template_filename", "never be in a training"),
        (dict(name="zqtok", optimizer_type="Prodigy", embedding_lr="0.5"), "embedding_lr", "Prodigy"),
    ]
    try:
        for kw, field, words in cases:
            clean(services, "zqpivbad")
            kw = dict(kw)
            template = kw.pop("template", "subject_filewords.txt")
            config = {k: kw.pop(k) for k in ("optimizer_type", "embedding_lr") if k in kw}
            run = lora_cfg("zqpivbad", dataset, steps=2, template_filename=template, **config)
            with pytest.raises(UserError, match=words) as caught:
                services.training.train_lora(run, LoraNetwork(rank=4, alpha=4.0), PivotalEmbedding(**kw))
            assert caught.value.field == field
            assert not (services.settings.lora_dir / "zqpivbad.safetensors").exists()
    finally:
        (embeddings / "zqhas.pt").unlink()


def test_a_caption_holding_the_word_is_enough_and_a_continued_file_keeps_its_own_embedding(services, tmp_path):
    data = make_dataset(tmp_path / "captions", n=2)
    for image in data.glob("*.png"):
        image.with_suffix(".txt").write_text("zqcap, a yellow star")
    clean(services, "zqpivcap")
    run = lora_cfg("zqpivcap", data, steps=2, embedding_lr="0.01")  # hypernetwork.txt: [filewords] only
    result = services.training.train_lora(run, LoraNetwork(rank=4, alpha=4.0), PivotalEmbedding(name="zqcap")).wait()
    assert result.error is None
    before, _ = tensors(services.settings.lora_dir / "zqpivcap.safetensors")
    # the word is the LoRA's activation text in A1111's NAME.json, so its card writes a prompt that works ...
    sidecar = services.settings.lora_dir / "zqpivcap.json"
    assert services.loras.user_metadata("zqpivcap").card_prompt("lora", "zqpivcap") == "<lora:zqpivcap:1> zqcap"
    sidecar.write_text(json.dumps({"activation text": "zqcap, my own words"}))  # ... and a user's own is kept
    with pytest.raises(UserError, match="bundles 'zqcap'") as caught:
        services.training.train_lora(
            lora_cfg("zqpivcap", data, steps=4), LoraNetwork(rank=4, alpha=4.0), PivotalEmbedding(name="zqother")
        )
    assert caught.value.field == "bundle_embedding"
    more = services.training.train_lora(
        lora_cfg("zqpivcap", data, steps=4, embedding_lr="0.01"), LoraNetwork(rank=4, alpha=4.0)
    ).wait()
    assert more.error is None and more.step == 4
    after, _ = tensors(services.settings.lora_dir / "zqpivcap.safetensors")
    key = "bundle_emb.zqcap.string_to_param.*"
    assert (after[key] - before[key]).abs().max() > 0
    assert json.loads(sidecar.read_text()) == {"activation text": "zqcap, my own words"}


def test_sdxl_bundles_clip_l_and_clip_g_each_from_its_own_encoder(xl, tmp_path):
    data = make_dataset(tmp_path / "xl", n=2)
    model = xl.models.get()
    for name, rate in (("zqxlpivfrozen", "0"), ("zqxlpiv", "0.01")):
        clean(xl, name)
        run = pivotal_cfg(name, data, steps=2, embedding_lr=rate)
        result = xl.training.train_lora(
            run, LoraNetwork(rank=4, alpha=4.0), PivotalEmbedding(name="zqxltok", init_text="star")
        ).wait()
        assert result.error is None
    frozen, _ = tensors(xl.settings.lora_dir / "zqxlpivfrozen.safetensors")
    trained, _ = tensors(xl.settings.lora_dir / "zqxlpiv.safetensors")
    width_l = int(model.pipe.text_encoder.config.hidden_size)
    start = model_initial_vectors(model, "star", 1)
    assert torch.equal(frozen["bundle_emb.zqxltok.clip_l"], start[:, :width_l])
    assert torch.equal(frozen["bundle_emb.zqxltok.clip_g"], start[:, width_l:])
    for part in ("clip_l", "clip_g"):
        key = f"bundle_emb.zqxltok.{part}"
        assert (trained[key] - frozen[key]).abs().max() > 1e-4, f"{part} trains too"
    used = gen(xl, "a zqxltok <lora:zqxlpiv>", steps=4)
    assert used.notes == [] and 'TI hashes: "zqxltok: zqxlpiv"' in used.infotexts[0]


def test_train_lora_route_takes_the_bundle(server, dataset):
    base = dict(
        lora_name="zqpivapi",
        data_root=str(dataset),
        template_filename="subject_filewords.txt",
        training_width=64,
        training_height=64,
        steps=2,
        bundle_embedding="zqapitok",
        bundle_vectors=2,
        embedding_lr="0.01",
    )
    r = requests.post(f"{server.url}/sdapi/v1/train/lora", json={**base, "bundle_embedding": "bad.name"}, timeout=60)
    assert r.status_code == 400 and r.json()["field"] == "bundle_embedding"
    r = requests.post(f"{server.url}/sdapi/v1/train/lora", json=base, timeout=300)
    assert r.status_code == 200, r.text
    info = r.json()["info"]
    assert info.endswith("error: None"), info
    path = info.split("filename: ", 1)[1].split(" ")[0] if "filename: " in info else None
    loras = {row["name"]: row for row in requests.get(f"{server.url}/sdapi/v1/loras", timeout=30).json()}
    data, _ = tensors(loras["zqpivapi"]["path"])
    assert data["bundle_emb.zqapitok.string_to_param.*"].shape[0] == 2, path
