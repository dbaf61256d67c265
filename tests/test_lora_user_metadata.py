"""A1111's user metadata beside a LoRA (`<name>.json`: activation text, preferred weight, negative text,
description; or `<name>.txt`): read as A1111 reads it, shown in the LoRA list, used by a card click; a damaged or
odd sidecar is a reason, never an error."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from app.errors import NotFoundError, UserError
from app.lora.service import top_tags
from app.networks.user_metadata import UserMetadata, read_user_metadata
from app.ui.extra_networks import lora_about
from app.ui.lora_info_tab import summary_html
from tests.test_lora import folder, kohya_file, make_layers  # noqa: F401  (folder: a fixture)


def sidecar(tmp_path: Path, content: str | bytes, name: str = "style.v2") -> Path:
    lora = tmp_path / f"{name}.safetensors"
    lora.write_bytes(b"")
    target = tmp_path / f"{name}.json"
    target.write_bytes(content if isinstance(content, bytes) else content.encode())
    return lora


def test_a1111_fields_are_read(tmp_path):
    data = {
        "description": "Outlines.\nSecond line.",
        "sd version": "SD1",
        "activation text": " zqstyle, outlined ",
        "preferred weight": 0.6,
        "negative text": "blurry",
        "notes": "trained on 20 images",
    }
    meta = read_user_metadata(sidecar(tmp_path, json.dumps(data)))
    assert meta == UserMetadata(
        description="Outlines.\nSecond line.",
        activation_text="zqstyle, outlined",
        preferred_weight=0.6,
        negative_text="blurry",
        sd_version="SD1",
        notes="trained on 20 images",
    )
    assert meta.card_prompt("lora", "style.v2") == "<lora:style.v2:0.6> zqstyle, outlined"
    assert meta.card_negative() == "(blurry:1)"


@pytest.mark.parametrize(
    ("weight", "expected"),
    [(0, None), (0.0, None), ("0.8", 0.8), ("abc", None), (True, None), (float("inf"), None), (None, None), (-1, -1)],
)
def test_preferred_weight_zero_or_odd_means_the_default(tmp_path, weight, expected):
    raw = json.dumps({"preferred weight": weight}) if weight != float("inf") else '{"preferred weight": 1e999}'
    meta = read_user_metadata(sidecar(tmp_path, raw))
    assert meta.preferred_weight == expected and meta.problem == ""
    assert meta.card_prompt("lora", "x") == f"<lora:x:{expected if expected is not None else 1:g}>"


def test_no_sidecar_and_text_descriptions(tmp_path):
    lora = tmp_path / "plain.safetensors"
    lora.write_bytes(b"")
    assert read_user_metadata(lora) == UserMetadata()
    (tmp_path / "plain.description.txt").write_text("From the .description.txt\n")
    assert read_user_metadata(lora).description == "From the .description.txt"
    (tmp_path / "plain.txt").write_text("From the .txt")  # A1111 looks at <name>.txt first
    assert read_user_metadata(lora).description == "From the .txt"
    (tmp_path / "plain.json").write_text(json.dumps({"description": "From the .json"}))
    assert read_user_metadata(lora).description == "From the .json"


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{not json", "is not valid JSON"),
        ("[1, 2]", "does not hold a JSON object"),
        (b"\xff\xfe\x00garbage", "is not valid JSON"),
        ("{}" + " " * (300 * 1024), "at most 256 KB"),
    ],
)
def test_damaged_sidecars_give_a_reason(tmp_path, content, reason):
    (tmp_path / "plain.txt").write_text("kept")
    meta = read_user_metadata(sidecar(tmp_path, content, "plain"))
    assert reason in meta.problem and meta.description == "kept" and meta.activation_text == ""


def test_wrong_types_are_ignored(tmp_path):
    meta = read_user_metadata(sidecar(tmp_path, json.dumps({"activation text": 3, "sd version": "SD9", "notes": []})))
    assert meta == UserMetadata()


@settings(max_examples=80, deadline=None)
@given(st.one_of(st.binary(max_size=200), st.recursive(st.none() | st.floats() | st.text(), st.lists).map(json.dumps)))
def test_any_sidecar_reads_or_says_why(content):
    with tempfile.TemporaryDirectory() as tmp:
        meta = read_user_metadata(sidecar(Path(tmp), content if isinstance(content, bytes) else content.encode()))
        assert isinstance(meta, UserMetadata)
        meta.card_prompt("lora", "x")


def test_the_lora_list_shows_and_the_service_finds_it(services, folder, tmp_path):  # noqa: F811
    pipe = services.models.get().pipe
    save_file(
        kohya_file(pipe, make_layers(pipe, seed=4)),
        str(folder / "zqmeta.safetensors"),
        metadata={"ss_output_name": "zqmeta_alias"},
    )
    (folder / "zqmeta.json").write_text(json.dumps({"activation text": "zqword", "preferred weight": 0.7}))
    row = next(d for d in services.loras.details() if d["name"] == "zqmeta")
    assert (row["activation_text"], row["preferred_weight"]) == ("zqword", 0.7)
    assert lora_about(row) == "zqword · weight 0.7"
    assert services.loras.user_metadata("zqmeta_alias").activation_text == "zqword"  # found by its alias too
    assert services.loras.user_metadata("nobody") == UserMetadata()
    (folder / "zqmeta.json").write_text("{broken")
    row = next(d for d in services.loras.details() if d["name"] == "zqmeta")
    assert row["usable"] and "not valid JSON" in row["user_metadata_problem"]


def test_saving_keeps_other_keys_and_reads_back(services, folder):  # noqa: F811
    pipe = services.models.get().pipe
    save_file(kohya_file(pipe, make_layers(pipe, seed=5)), str(folder / "zqsave.safetensors"))
    (folder / "zqsave.json").write_text(json.dumps({"sd version": "SD1", "civitai": {"id": 7}, "notes": "old"}))
    path = services.loras.save_user_metadata(
        "zqsave",
        description="Outlines",
        activation_text="zqword",
        preferred_weight=0.8,
        negative_text="",
        notes="new",
    )
    assert path == folder / "zqsave.json"
    data = json.loads(path.read_text())
    assert data["civitai"] == {"id": 7} and data["sd version"] == "SD1"  # an extension's keys survive
    assert (data["activation text"], data["preferred weight"], data["notes"]) == ("zqword", 0.8, "new")
    meta = services.loras.user_metadata("zqsave")
    assert meta.card_prompt("lora", "zqsave") == "<lora:zqsave:0.8> zqword"
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []  # no temp file left


def test_a_damaged_sidecar_is_never_overwritten(services, folder):  # noqa: F811
    pipe = services.models.get().pipe
    save_file(kohya_file(pipe, make_layers(pipe, seed=5)), str(folder / "zqkeep.safetensors"))
    (folder / "zqkeep.json").write_text("{half written")
    with pytest.raises(UserError, match="is not a JSON object that can be read; it is left as it is"):
        services.loras.save_user_metadata(
            "zqkeep", description="", activation_text="x", preferred_weight=None, negative_text="", notes=""
        )
    assert (folder / "zqkeep.json").read_text() == "{half written"
    with pytest.raises(NotFoundError):
        services.loras.save_user_metadata(
            "nobody", description="", activation_text="x", preferred_weight=None, negative_text="", notes=""
        )


def test_info_summarises_the_training_record(services, folder):  # noqa: F811
    pipe = services.models.get().pipe
    frequency = {"10_zq": {"zqword": 10, "red circle": 4}, "reg": {"red circle": 2, "bad": "x"}}
    metadata = {"ss_network_dim": "4", "ss_steps": "120", "ss_tag_frequency": json.dumps(frequency), "x": "y"}
    save_file(kohya_file(pipe, make_layers(pipe, seed=6)), str(folder / "zqinfo.safetensors"), metadata=metadata)
    info = services.loras.info("zqinfo")
    assert info["usable"] and info["layers"] > 0 and info["kind"] == "LoRA"
    assert info["training"] == {"ss_network_dim": "4", "ss_steps": "120"}  # the keys the view shows
    assert info["tags"] == [("zqword", 10), ("red circle", 6)]  # summed over folders, odd counts skipped
    html_text = summary_html(info)
    assert "Rank (network dim)</th><td>4" in html_text and "zqword (10)" in html_text
    with pytest.raises(NotFoundError):
        services.loras.info("nobody")


@pytest.mark.parametrize("value", ["", "not json", "[1]", '{"a": [1]}', '{"a": {"t": 1e999}}'])
def test_odd_tag_frequencies_give_no_tags(value):
    assert top_tags(value) == []


def test_previews_are_found_as_a1111_looks_for_them_and_saved_as_name_png(services, folder, tmp_path):  # noqa: F811
    from PIL import Image

    from app.networks.user_metadata import find_preview
    from app.ui.lora_info_tab import load_preview

    lora = tmp_path / "style.v2.safetensors"
    lora.write_bytes(b"")
    assert find_preview(lora) is None
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "style.v2.preview.webp")
    assert find_preview(lora) == tmp_path / "style.v2.preview.webp"
    Image.new("RGB", (8, 8), (0, 255, 0)).save(tmp_path / "style.v2.preview.png")
    assert find_preview(lora) == tmp_path / "style.v2.preview.png"  # png before webp
    (tmp_path / "style.v2.png").write_bytes(b"not an image")
    assert find_preview(lora) == tmp_path / "style.v2.png"  # NAME.png before NAME.preview.png
    assert load_preview(find_preview(lora)) is None  # a damaged image is no image, not an error
    pipe = services.models.get().pipe
    save_file(kohya_file(pipe, make_layers(pipe, seed=5)), str(folder / "zqcard.safetensors"))
    path = services.loras.save_preview("zqcard", Image.new("RGBA", (64, 64), (255, 0, 0, 128)))
    assert path == folder / "zqcard.png" and services.loras.info("zqcard")["preview"] == path
    with Image.open(path) as saved:
        assert saved.mode == "RGB" and saved.getpixel((0, 0)) == (255, 0, 0)
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(NotFoundError):
        services.loras.save_preview("nobody", Image.new("RGB", (8, 8)))


def test_a_full_disk_changes_nothing_and_says_so(services, folder, monkeypatch):  # noqa: F811
    import errno
    import os

    from PIL import Image

    pipe = services.models.get().pipe
    save_file(kohya_file(pipe, make_layers(pipe, seed=5)), str(folder / "zqfull.safetensors"))
    (folder / "zqfull.json").write_text(json.dumps({"activation text": "old"}))
    before = {p.name: p.read_bytes() for p in folder.rglob("*") if p.is_file()}

    def no_space(src, dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", no_space)  # the rename that publishes every file
    fields = dict(description="", activation_text="new", preferred_weight=None, negative_text="", notes="")
    attempts = [
        lambda: services.loras.save_user_metadata("zqfull", **fields),
        lambda: services.loras.save_preview("zqfull", Image.new("RGB", (8, 8))),
        lambda: services.loras.resize("zqfull", "zqfull-r2", 2),
    ]
    for attempt in attempts:
        with pytest.raises(UserError, match=r"No space left on device\. Nothing was changed\."):
            attempt()
    after = {p.name: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    assert after == before  # no temp file, nothing half-written
