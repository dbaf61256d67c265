"""Embeddings in prompts, checked against hand-built conditioning; create; diffusers compatibility; API."""

from __future__ import annotations

import copy
import hashlib

import numpy as np
import pytest
import requests
import torch
from diffusers import StableDiffusionPipeline

from app.embeddings.formats import read_embedding_file
from app.errors import UserError
from app.generation.samplers import build_scheduler
from app.generation.txt2img import Txt2ImgParams
from app.models.tokenizer import load_clip_tokenizer

START, END = 49406, 49407
# Rarely used token ids whose rows the manual reference overwrites in its own copy of the text encoder.
PLACEHOLDERS = list(range(40000, 40010))


@pytest.fixture(scope="module")
def model(services):
    return services.models.get()


@pytest.fixture(scope="module")
def width(model):
    return model.text_width


@pytest.fixture(scope="module")
def emb(services, width):
    """Three embeddings written as A1111 .pt files into the services' embeddings folder."""
    folder = services.settings.embeddings_dir
    folder.mkdir(parents=True, exist_ok=True)
    made = {}
    for name, n, seed in (("zqtwo", 2, 1), ("zqfour", 4, 2), ("zqone", 1, 3)):
        vectors = torch.randn(n, width, generator=torch.Generator().manual_seed(seed))
        torch.save(
            {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors}, "name": name, "step": 0},
            folder / f"{name}.pt",
        )
        made[name] = vectors
    services.embeddings.refresh()
    return made


def words(model, text):
    return model.pipe.tokenizer(text, add_special_tokens=False)["input_ids"]


def manual_encode(model, chunks: list[list], weights: list[list[float]] | None = None) -> torch.Tensor:
    """Reference conditioning: token ids (ints) and embedding tensors, placed in a copy of the text encoder.

    Each chunk is a list of ints (token ids) and tensors (embedding vectors); padded with END to 77.
    """
    encoder = copy.deepcopy(model.pipe.text_encoder)
    table = encoder.get_input_embeddings().weight
    outputs = []
    next_placeholder = iter(PLACEHOLDERS)
    for c, chunk in enumerate(chunks):
        ids = [START]
        for item in chunk:
            if isinstance(item, torch.Tensor):
                for row in item:
                    pid = next(next_placeholder)
                    with torch.no_grad():
                        table[pid] = row
                    ids.append(pid)
            else:
                ids.append(item)
        ids += [END] * (77 - len(ids))
        with torch.no_grad():
            z = encoder(input_ids=torch.tensor([ids])).last_hidden_state
        if weights is not None:
            w = torch.tensor([[1.0, *weights[c], *[1.0] * (76 - len(weights[c]))]]).unsqueeze(-1)
            mean = z.mean()
            z = z * w
            z = z * (mean / z.mean())
        outputs.append(z)
    return torch.cat(outputs, dim=1)


def ours(model, text):
    with torch.no_grad():
        return model.encoder.encode([text])


def test_embedding_equals_hand_built_conditioning(model, emb):
    expected = manual_encode(model, [[*words(model, "a photo of"), emb["zqtwo"], *words(model, "cat")]])
    torch.testing.assert_close(ours(model, "a photo of zqtwo cat"), expected)


def test_several_embeddings_and_the_same_one_twice(model, emb):
    expected = manual_encode(model, [[emb["zqtwo"], *words(model, "and"), emb["zqone"], emb["zqtwo"]]])
    torch.testing.assert_close(ours(model, "zqtwo and zqone zqtwo"), expected)


def test_embedding_inside_emphasis(model, emb):
    expected = manual_encode(model, [[*words(model, "a"), emb["zqtwo"]]], weights=[[1.0, 1.2, 1.2]])
    torch.testing.assert_close(ours(model, "a (zqtwo:1.2)"), expected)


def test_multi_vector_embedding_moves_whole_to_next_chunk(model, emb):
    cat = words(model, "cat")[0]
    expected = manual_encode(model, [[cat] * 73, [emb["zqfour"]]])
    torch.testing.assert_close(ours(model, "cat " * 73 + "zqfour"), expected)


def test_generation_with_embedding_equals_pipeline_with_manual_embeds(services, model, emb):
    prompt = "a photo of zqtwo"
    image = services.txt2img.generate(
        Txt2ImgParams(
            prompt=prompt,
            negative_prompt="",
            width=64,
            height=64,
            steps=8,
            seed=4,
            sampler_name="Euler",
            save_images=False,
        )
    ).images[0]
    cond = manual_encode(model, [[*words(model, "a photo of"), emb["zqtwo"]]])
    uncond = manual_encode(model, [[]])
    pipe = StableDiffusionPipeline(
        **{
            **model.pipe.components,
            "scheduler": build_scheduler("Euler", "Automatic", dict(model.pipe.scheduler.config)),
        }
    )
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(4))
    reference = pipe(
        prompt_embeds=cond,
        negative_prompt_embeds=uncond,
        latents=noise,
        num_inference_steps=8,
        guidance_scale=7.0,
        height=64,
        width=64,
    ).images[0]
    diff = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(reference, dtype=np.int16))
    assert diff.max() <= 1


def test_infotext_records_ti_hashes(services, emb):
    result = services.txt2img.generate(
        Txt2ImgParams(
            prompt="zqone and zqtwo", negative_prompt="zqfour", width=64, height=64, steps=2, seed=1, save_images=False
        )
    )
    folder = services.settings.embeddings_dir
    hashes = {n: hashlib.sha256((folder / f"{n}.pt").read_bytes()).hexdigest()[:12] for n in emb}
    assert (
        f'TI hashes: "zqone: {hashes["zqone"]}, zqtwo: {hashes["zqtwo"]}, zqfour: {hashes["zqfour"]}"'
        in (result.infotexts[0])
    )


def test_create_initialises_from_init_text_a1111_way(services, model):
    table = model.pipe.text_encoder.get_input_embeddings().weight.detach()
    ids = words(model, "red circle")
    path = services.embeddings.create("zq created", 3, "red circle")
    data = read_embedding_file(path)
    assert data.name == "zq created" and data.step == 0
    expected = torch.stack([table[ids[i * len(ids) // 3]] for i in range(3)])  # rows 0, 0, 1
    torch.testing.assert_close(data.vectors, expected)
    raw = torch.load(path, weights_only=True)
    assert raw["string_to_token"] == {"*": 265} and raw["name"] == "zq created"
    assert raw["sd_checkpoint"] is None and raw["sd_checkpoint_name"] is None
    # Round trip through the database: identical tensors, step and name.
    loaded = services.embeddings.db.get("zq created")
    torch.testing.assert_close(loaded.vectors, expected)
    assert loaded.step == 0


def test_create_with_empty_init_text_is_zeros(services):
    path = services.embeddings.create("zqzeros", 2, "")
    assert torch.count_nonzero(read_embedding_file(path).vectors) == 0


def test_create_refuses_existing_name_and_changes_nothing(services):
    path = services.embeddings.create("zqkeep", 1, "cat")
    before = path.read_bytes()
    with pytest.raises(UserError, match="already exists"):
        services.embeddings.create("zqkeep", 4, "dog")
    assert path.read_bytes() == before
    services.embeddings.create("zqkeep", 4, "dog", overwrite=True)
    assert read_embedding_file(path).count == 4


@pytest.mark.parametrize(
    ("name", "count", "message"),
    [("///", 1, "no usable characters"), ("ok", 0, "between 1 and 75"), ("ok", 500, "between 1 and 75")],
)
def test_create_bad_input(services, name, count, message):
    with pytest.raises(UserError, match=message):
        services.embeddings.create(name, count, "*")


def test_create_filters_illegal_characters(services):
    path = services.embeddings.create("zq:bad/na*me?", 1, "*")
    assert path.name == "zqbadname.pt"


def test_our_files_load_in_diffusers_load_textual_inversion(services, model):
    path = services.embeddings.create("zqdiff", 3, "blue square")
    tokenizer = load_clip_tokenizer()
    pipe = StableDiffusionPipeline(
        **{**model.pipe.components, "tokenizer": tokenizer, "text_encoder": copy.deepcopy(model.pipe.text_encoder)}
    )
    pipe.load_textual_inversion(str(path))
    prompt = "a photo of zqdiff"
    with torch.no_grad():
        theirs, _ = pipe.encode_prompt(prompt, "cpu", 1, False)
    torch.testing.assert_close(theirs, ours(model, prompt))


def test_api_lists_creates_and_refreshes(server):
    url = f"{server.url}/sdapi/v1"
    folder = server.data_dir / "embeddings"
    folder.mkdir(exist_ok=True)
    marker = folder.parent / "marker"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"emb_params": Payload()}, folder / "evil.pt")
    torch.save({"emb_params": torch.randn(2, 768)}, folder / "sd15.pt")
    created = requests.post(
        f"{url}/create/embedding", json={"name": "apiemb", "num_vectors_per_token": 2, "init_text": "cat"}, timeout=30
    )
    assert created.status_code == 200
    assert created.json()["info"] == f"create embedding filename: {folder / 'apiemb.pt'}"
    again = requests.post(f"{url}/create/embedding", json={"name": "apiemb"}, timeout=30)
    assert again.status_code == 400
    assert again.json()["info"].startswith("create embedding error: ")
    assert requests.post(f"{url}/refresh-embeddings", timeout=30).status_code == 200
    listing = requests.get(f"{url}/embeddings", timeout=30).json()
    assert listing["loaded"]["apiemb"] == {
        "step": 0,
        "sd_checkpoint": None,
        "sd_checkpoint_name": None,
        "shape": 64,
        "vectors": 2,
        "path": str(folder / "apiemb.pt"),
    }
    assert "could run code" in listing["skipped"]["evil"]["reason"]
    assert listing["skipped"]["sd15"]["shape"] == 768
    assert not marker.exists()
    image = requests.post(
        f"{url}/txt2img", json={"prompt": "apiemb", "steps": 2, "width": 64, "height": 64}, timeout=60
    )
    assert image.status_code == 200 and "TI hashes" in image.json()["info"]
