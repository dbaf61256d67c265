"""Embeddings bundled in LoRA files (A1111's `bundle_emb.<name>.*` keys, as OneTrainer and pivotal-tuning tools write
them): a prompt that applies the LoRA can use them by name, exactly as if the same embedding were a file in
`embeddings/`; for that generation only, never over a file of the same name, and each one that cannot be used says
why while the LoRA itself still applies."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.test_lora import gen, kohya_file, make_layers, pixels


def vectors(width: int, seed: int, n: int = 2) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def cleared(services):
    folders = (services.settings.lora_dir, services.settings.embeddings_dir)
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    yield folders
    for folder in folders:
        for f in folder.rglob("*"):
            if f.is_file():
                f.unlink()
    services.embeddings.db.refresh()


@pytest.fixture
def folders(services):
    yield from cleared(services)


@pytest.fixture
def xl_folders(xl):
    yield from cleared(xl)


def test_a_bundled_embedding_works_as_the_same_file_in_embeddings_would_for_that_generation_only(services, folders):
    loras, embeddings = folders
    model = services.models.get()
    layers = kohya_file(model.pipe, make_layers(model.pipe, seed=5))
    vec = vectors(model.text_width, seed=6)
    save_file({**layers, "bundle_emb.zqbun.string_to_param.*": vec}, str(loras / "zqpiv.safetensors"))
    ours = gen(services, "a zqbun circle <lora:zqpiv:0.8>")
    assert ours.notes == []
    assert 'TI hashes: "zqbun: zqpiv"' in ours.infotexts[0], "A1111 writes the LoRA's name as a bundled TI's hash"

    # The same vectors as an A1111 file in embeddings/, with the same LoRA layers but no bundle: the same image.
    save_file(layers, str(loras / "zqplain.safetensors"))
    torch.save({"string_to_param": {"*": vec}, "name": "zqbun"}, embeddings / "zqbun.pt")
    reference = gen(services, "a zqbun circle <lora:zqplain:0.8>")
    assert np.abs(pixels(ours) - pixels(reference)).max() <= 1
    (embeddings / "zqbun.pt").unlink()

    # Without the LoRA that bundles it, the name is just text again (the bundle was not left registered).
    plain = gen(services, "a zqbun circle <lora:zqplain:0.8>")
    assert np.abs(pixels(plain) - pixels(ours)).max() > 10
    assert "TI hashes" not in plain.infotexts[0]
    assert "zqbun" not in services.embeddings.listing()["loaded"]


def test_a_file_of_embeddings_only_is_listed_and_usable(services, folders):
    loras, embeddings = folders
    model = services.models.get()
    vec = vectors(model.text_width, seed=7, n=3)
    save_file({"bundle_emb.zqonly.emb_params": vec}, str(loras / "zqembonly.safetensors"))
    row = next(r for r in services.loras.details() if r["name"] == "zqembonly")
    assert row["usable"] and row["layers"] == 0 and row["embeddings"] == ["zqonly"]
    ours = gen(services, "two zqonly squares <lora:zqembonly>")
    assert ours.notes == []
    save_file({"emb_params": vec}, str(embeddings / "zqonly.safetensors"))
    reference = gen(services, "two zqonly squares")
    assert np.abs(pixels(ours) - pixels(reference)).max() <= 1


def test_bundles_that_cannot_be_used_say_why_and_the_lora_still_applies(services, folders):
    loras, embeddings = folders
    model = services.models.get()
    width = model.text_width
    layers = kohya_file(model.pipe, make_layers(model.pipe, seed=8))
    save_file(
        {
            **layers,
            "bundle_emb.zqdup.string_to_param.*": vectors(width, seed=9),
            "bundle_emb.zqxlpart.clip_l": vectors(width, seed=10),
            "bundle_emb.zqxlpart.clip_g": vectors(width * 2, seed=11),
            "bundle_emb.zqhalf.clip_l": vectors(width, seed=12),
            "bundle_emb.zqtwice.emb_params": vectors(width, seed=13),
            "bundle_emb.zqgood.emb_params": vectors(width, seed=14),
        },
        str(loras / "zqmixed.safetensors"),
    )
    save_file({"bundle_emb.zqtwice.emb_params": vectors(width, seed=15)}, str(loras / "zqsecond.safetensors"))
    own = vectors(width, seed=16)
    torch.save({"string_to_param": {"*": own}, "name": "zqdup"}, embeddings / "zqdup.pt")
    save_file(layers, str(loras / "zqplain.safetensors"))

    prompt = "zqdup zqtwice zqgood"
    ours = gen(services, f"{prompt} <lora:zqmixed:0.5> <lora:zqsecond>")
    notes = "\n".join(ours.notes)
    assert len(ours.notes) == 4, notes
    assert "<lora:zqmixed:0.5>: its bundled embedding 'zqdup' is not used: zqdup.pt in the embeddings folder" in notes
    assert f"'zqxlpart' has vectors {width * 3} wide but the loaded model needs {width}" in notes
    assert "'zqhalf' cannot be used: an SDXL embedding needs both 'clip_l' and 'clip_g'" in notes
    assert "<lora:zqsecond>: its bundled embedding 'zqtwice' is not used: LoRA 'zqmixed' bundles one" in notes

    # What was used: the LoRA's layers, the folder's zqdup, zqmixed's zqtwice and zqgood.
    save_file({"emb_params": vectors(width, seed=13)}, str(embeddings / "zqtwice.safetensors"))
    save_file({"emb_params": vectors(width, seed=14)}, str(embeddings / "zqgood.safetensors"))
    reference = gen(services, f"{prompt} <lora:zqplain:0.5>")
    assert np.abs(pixels(ours) - pixels(reference)).max() <= 1


def test_sdxl_bundles_with_clip_l_and_clip_g(xl, xl_folders):
    loras, embeddings = xl_folders
    model = xl.models.get()
    width_l = int(model.pipe.text_encoder.config.hidden_size)
    width_g = int(model.pipe.text_encoder_2.config.hidden_size)
    layers = kohya_file(model.pipe, make_layers(model.pipe, seed=17, convs=False))
    parts = {"clip_l": vectors(width_l, seed=18), "clip_g": vectors(width_g, seed=19)}
    bundle = {f"bundle_emb.zqxlbun.{k}": v for k, v in parts.items()}
    save_file({**layers, **bundle}, str(loras / "zqxlpiv.safetensors"))
    save_file(layers, str(loras / "zqxlplain.safetensors"))
    params = dict(steps=4, width=64, height=64)
    ours = gen(xl, "a zqxlbun circle <lora:zqxlpiv>", **params)
    assert ours.notes == []
    save_file(parts, str(embeddings / "zqxlbun.safetensors"))
    reference = gen(xl, "a zqxlbun circle <lora:zqxlplain>", **params)
    assert np.abs(pixels(ours) - pixels(reference)).max() <= 1
    (embeddings / "zqxlbun.safetensors").unlink()
    plain = gen(xl, "a zqxlbun circle <lora:zqxlplain>", **params)
    assert np.abs(pixels(plain) - pixels(ours)).max() > 10
