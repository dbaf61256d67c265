"""Preprocess images: sizes, crops, flips, splits, captions, and the source left untouched."""

import hashlib

import pytest
import requests
from PIL import Image, ImageDraw

from app.errors import UserError
from app.training.preprocess import PreprocessOptions, focal_crop, preprocess


def digest(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def make_source(folder):
    folder.mkdir()
    Image.new("RGB", (300, 200), "red").save(folder / "wide.jpg")
    Image.new("RGBA", (100, 400), (0, 0, 255, 128)).save(folder / "tall.png")
    (folder / "tall.txt").write_text("a tall blue thing")
    (folder / "broken.png").write_bytes(b"not an image")
    return folder


def test_preprocess_writes_resized_copies_and_leaves_source_alone(tmp_path):
    src = make_source(tmp_path / "src")
    before = digest(src)
    result = preprocess(PreprocessOptions(str(src), str(tmp_path / "dst"), 64, 64, flip=True))
    assert digest(src) == before
    names = sorted(p.name for p in result.written)
    assert names == ["00001-0-tall-flipped.png", "00001-0-tall.png", "00002-0-wide-flipped.png", "00002-0-wide.png"]
    for path in result.written:
        with Image.open(path) as im:
            assert im.size == (64, 64) and im.mode == "RGB"
    assert (tmp_path / "dst" / "00001-0-tall.txt").read_text() == "a tall blue thing"
    assert result.skipped and result.skipped[0].startswith("broken.png")
    with (
        Image.open(tmp_path / "dst" / "00002-0-wide.png") as a,
        Image.open(tmp_path / "dst" / "00002-0-wide-flipped.png") as b,
    ):
        assert a.transpose(Image.Transpose.FLIP_LEFT_RIGHT).tobytes() == b.tobytes()


def test_split_oversized_images_into_overlapping_tiles(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGB", (100, 400), "green").save(src / "tall.png")
    result = preprocess(
        PreprocessOptions(str(src), str(tmp_path / "dst"), 64, 64, split=True, split_threshold=0.5, overlap_ratio=0.2)
    )
    assert len(result.written) == 5  # 256 px tall after scaling, 64 px tiles, stride ~51
    assert all(p.name.startswith("00000-") for p in result.written)


def test_focal_crop_finds_the_detailed_part():
    image = Image.new("RGB", (300, 100), "white")
    ImageDraw.Draw(image).rectangle((220, 20, 280, 80), outline="black", width=3)
    crop = focal_crop(image, 100, 100)
    assert crop.convert("L").getextrema()[0] < 50  # the outlined box is inside the crop


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (dict(dst="SRC"), "outside the source"),
        (dict(dst="SRC/inner"), "outside the source"),
        (dict(src="/no/such/dir"), "does not exist"),
        (dict(width=100), "multiple of 8"),
        (dict(crop="diagonal"), "Crop must be"),
    ],
)
def test_refusals(tmp_path, change, message):
    src = make_source(tmp_path / "src")
    options = dict(src=str(src), dst=str(tmp_path / "dst"))
    options.update({k: (v.replace("SRC", str(src)) if isinstance(v, str) else v) for k, v in change.items()})
    with pytest.raises(UserError, match=message):
        preprocess(PreprocessOptions(**options))


def test_preprocess_through_the_api(server, tmp_path):
    src = make_source(tmp_path / "src")
    response = requests.post(
        f"{server.url}/sdapi/v1/preprocess",
        json={
            "process_src": str(src),
            "process_dst": str(tmp_path / "out"),
            "process_width": 64,
            "process_height": 64,
            "preprocess_txt_action": "copy",
            "process_flip": False,
        },
        timeout=60,
    )
    assert response.status_code == 200
    assert response.json()["info"] == "Preprocess complete: 2 images written."
    assert (tmp_path / "out" / "00001-0-tall.txt").is_file()
    bad = requests.post(
        f"{server.url}/sdapi/v1/preprocess", json={"process_src": str(src), "process_dst": str(src)}, timeout=60
    )
    assert bad.status_code == 400 and "outside the source" in bad.json()["detail"]
