"""Embedding files in every common format, written here independently of our writer, and bad files."""

from __future__ import annotations

import base64
import json
import os

import pytest
import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file

from app.embeddings.database import EmbeddingDatabase
from app.embeddings.formats import EmbeddingFileError, read_embedding_file

WIDTH = 64


def vecs(n: int, seed: int = 0, width: int = WIDTH) -> torch.Tensor:
    return torch.randn(n, width, generator=torch.Generator().manual_seed(seed))


def png_with_chunk(path, data: dict) -> None:
    def enc(o):
        if isinstance(o, torch.Tensor):
            return {"TORCHTENSOR": o.tolist()}
        return {k: enc(v) for k, v in o.items()} if isinstance(o, dict) else o

    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", base64.b64encode(json.dumps(enc(data)).encode()).decode())
    Image.new("RGB", (16, 16), "white").save(path, pnginfo=info)


def write_all_formats(folder):
    """One file per format, each with known vectors. Returns {name: tensor}."""
    expected = {}
    folder.mkdir(parents=True, exist_ok=True)
    expected["a1111pt"] = vecs(3, 1)
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": expected["a1111pt"]},
            "name": "ignored",
            "step": 120,
            "sd_checkpoint": "abcdef0123",
            "sd_checkpoint_name": "m",
        },
        folder / "a1111pt.pt",
    )
    expected["kohya"] = vecs(2, 2)
    save_file({"emb_params": expected["kohya"]}, str(folder / "kohya.safetensors"))
    expected["learned_embeds"] = vecs(1, 3)[0]
    torch.save({"<cat-toy>": expected["learned_embeds"]}, folder / "learned_embeds.bin")
    (folder / "sub").mkdir()
    expected["diffusers_st"] = vecs(4, 4)
    save_file({"<tok>": expected["diffusers_st"]}, str(folder / "sub" / "diffusers_st.safetensors"))
    expected["from-png"] = vecs(2, 5)
    png_with_chunk(
        folder / "picture.png",
        {"string_to_token": {"*": 265}, "string_to_param": {"*": expected["from-png"]}, "name": "from-png", "step": 7},
    )
    expected["old_ti"] = vecs(2, 6)
    torch.save(
        {
            "string_to_token": {"*": 265},
            "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(expected["old_ti"])}),
        },
        folder / "old_ti.pt",
    )
    return expected


def test_every_format_loads_with_name_count_and_values(tmp_path):
    folder = tmp_path / "embeddings"
    expected = write_all_formats(folder)
    sdxl = {"clip_l": vecs(2, 7, 768), "clip_g": vecs(2, 8, 1280)}
    save_file(sdxl, str(folder / "xl.safetensors"))
    db = EmbeddingDatabase(folder)
    db.refresh()
    assert set(db.loaded) == set(expected)
    for name, tensor in expected.items():
        loaded = db.loaded[name].vectors
        torch.testing.assert_close(loaded, tensor.reshape(-1, WIDTH), rtol=0, atol=1e-6)
    assert db.loaded["a1111pt"].step == 120 and db.loaded["a1111pt"].sd_checkpoint == "abcdef0123"
    assert db.loaded["from-png"].step == 7  # the name stored in a PNG wins over the file name
    assert "SDXL" in db.skipped["xl"].reason
    data = read_embedding_file(folder / "xl.safetensors")
    assert data.count == 2 and data.width == 2048


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    folder = tmp_path / "embeddings"
    folder.mkdir()
    torch.save({"string_to_param": {"*": Payload()}}, folder / "evil.pt")
    torch.save({"emb": vecs(1)}, folder / "good.pt")
    db = EmbeddingDatabase(folder)
    db.refresh()
    assert not marker.exists()
    reason = db.skipped["evil"].reason
    assert "refused" in reason and "could run code" in reason and "io.open" in reason
    assert "good" in db.loaded


@pytest.mark.parametrize(
    ("writer", "reason"),
    [
        (lambda p: p.with_suffix(".pt").write_bytes(b"\x80\x02garbage that is not a pickle"), "not a readable"),
        (lambda p: p.with_suffix(".safetensors").write_bytes(os.urandom(64)), "not a readable safetensors"),
        (lambda p: Image.new("RGB", (4, 4)).save(p.with_suffix(".png")), "has no 'sd-ti-embedding'"),
        (lambda p: torch.save({"emb_params": torch.zeros(2, 3, 4)}, p.with_suffix(".pt")), "has shape [2, 3, 4]"),
        (lambda p: torch.save({"emb_params": torch.full((1, WIDTH), float("nan"))}, p.with_suffix(".pt")), "NaN"),
        (lambda p: torch.save({"emb_params": torch.full((1, WIDTH), float("inf"))}, p.with_suffix(".pt")), "NaN"),
        (lambda p: torch.save({"a": torch.ones(1, 4), "b": torch.ones(1, 4)}, p.with_suffix(".pt")), "found keys"),
        (lambda p: torch.save([1, 2, 3], p.with_suffix(".pt")), "expected a dict"),
        (lambda p: p.with_suffix(".pt").write_bytes(b""), "empty"),
        (lambda p: torch.save({"emb_params": torch.zeros(0, WIDTH)}, p.with_suffix(".pt")), "is empty"),
    ],
)
def test_bad_files_are_skipped_with_a_reason(tmp_path, writer, reason):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    writer(folder / "bad")
    db = EmbeddingDatabase(folder)
    db.refresh()
    assert not db.loaded
    assert reason in db.skipped["bad"].reason


def test_truncated_pt_is_skipped(tmp_path):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    torch.save({"emb_params": vecs(2)}, folder / "cut.pt")
    raw = (folder / "cut.pt").read_bytes()
    (folder / "cut.pt").write_bytes(raw[: len(raw) // 2])
    db = EmbeddingDatabase(folder)
    db.refresh()
    assert "cut" in db.skipped and "not a readable torch file" in db.skipped["cut"].reason


def test_zero_vectors_load(tmp_path):
    """All-zero vectors are what an embedding with empty init text starts as: valid."""
    folder = tmp_path / "embeddings"
    folder.mkdir()
    torch.save({"emb_params": torch.zeros(2, WIDTH)}, folder / "zeros.pt")
    db = EmbeddingDatabase(folder)
    db.refresh()
    assert db.loaded["zeros"].count == 2


def test_same_name_twice_keeps_one_deterministically(tmp_path):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    torch.save({"emb_params": vecs(1, 1)}, folder / "twin.pt")
    save_file({"emb_params": vecs(1, 2)}, str(folder / "twin.safetensors"))
    db = EmbeddingDatabase(folder)
    db.refresh()
    assert db.loaded["twin"].path.name == "twin.pt"  # first by path order
    skipped = next(s for s in db.skipped.values() if s.path.name == "twin.safetensors")
    assert "already provides the name 'twin'" in skipped.reason


def test_previews_and_hidden_files_are_not_embeddings(tmp_path):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    Image.new("RGB", (4, 4)).save(folder / "thing.preview.png")
    torch.save({"emb_params": vecs(1)}, folder / ".hidden.pt")
    db = EmbeddingDatabase(folder)
    db.refresh()
    assert not db.loaded and not db.skipped


def test_hot_reload_picks_up_changes_and_skips_unchanged_files(tmp_path):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    db = EmbeddingDatabase(folder)
    db.set_model(__import__("app.models.tokenizer", fromlist=["x"]).load_clip_tokenizer(), WIDTH)
    assert not db.loaded
    torch.save({"emb_params": vecs(1, 1)}, folder / "late.pt")
    assert db.refresh_if_changed() is True
    assert "late" in db.loaded
    assert db.refresh_if_changed() is False  # nothing changed: no rebuild
    # Same size and mtime with other bytes: the cached parse is reused (proof the file is not re-read).
    stat = (folder / "late.pt").stat()
    torch.save({"emb_params": vecs(1, 2)}, folder / "late.pt")
    os.utime(folder / "late.pt", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    db.refresh()
    torch.testing.assert_close(db.loaded["late"].vectors, vecs(1, 1))
    os.utime(folder / "late.pt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert db.refresh_if_changed() is True
    torch.testing.assert_close(db.loaded["late"].vectors, vecs(1, 2))
    (folder / "late.pt").unlink()
    assert db.refresh_if_changed() is True and not db.loaded


def test_wrong_width_is_skipped_until_a_matching_model(tmp_path):
    from app.models.tokenizer import load_clip_tokenizer

    folder = tmp_path / "embeddings"
    folder.mkdir()
    torch.save({"emb_params": vecs(1, width=768)}, folder / "sd15.pt")
    db = EmbeddingDatabase(folder)
    tokenizer = load_clip_tokenizer()
    db.set_model(tokenizer, WIDTH)
    assert "768 wide but the loaded model needs 64" in db.skipped["sd15"].reason
    db.set_model(tokenizer, 768)
    assert "sd15" in db.loaded


def test_unknown_suffix_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(EmbeddingFileError, match="not embeddings"):
        read_embedding_file(tmp_path / "notes.txt")
