"""Training datasets: every kind of image converted, captions, templates, and clear refusals."""

import pytest
from PIL import Image

from app.errors import UserError
from app.training.dataset import caption_for, load_dataset, prompt_for
from app.training.templates import fill, list_templates, read_template

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


def test_images_of_any_mode_and_size_become_rgb_at_the_training_size(tmp_path):
    Image.new("RGBA", (100, 60), (255, 0, 0, 0)).save(tmp_path / "rgba.png")
    p = Image.new("P", (30, 30))
    p.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    p.info["transparency"] = 0
    p.save(tmp_path / "palette.png", transparency=0)
    Image.new("I;16", (40, 40), 65535).save(tmp_path / "sixteen.png")
    rotated = Image.new("RGB", (80, 40), "blue")
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90° on display
    rotated.save(tmp_path / "exif.jpg", exif=exif)
    Image.new("L", (200, 200), 128).save(tmp_path / "gray.bmp")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    images, problems = load_dataset(tmp_path, 64, 48, ["[name]"], seed=0)
    by_name = {im.path.name: im for im in images}
    assert set(by_name) == {"rgba.png", "palette.png", "sixteen.png", "exif.jpg", "gray.bmp"}
    assert all(im.image.mode == "RGB" and im.image.size == (64, 48) for im in images)
    assert by_name["rgba.png"].image.getpixel((5, 5)) == (255, 255, 255)  # transparent -> white
    assert by_name["sixteen.png"].image.getpixel((0, 0)) == (255, 255, 255)  # full-scale 16-bit -> white
    assert problems and problems[0].startswith("broken.png")


def test_exif_rotation_is_applied(tmp_path):
    image = Image.new("RGB", (80, 40), "blue")
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "r.jpg", exif=exif)
    images, _ = load_dataset(tmp_path, 64, 64, ["x"], seed=0, varsize=True)
    assert images[0].image.size == (40, 80)


def test_captions_from_text_file_else_file_name(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "001-a red circle.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "two.png")
    (tmp_path / "two.txt").write_text("blue square, small\n", encoding="utf-8")
    assert caption_for(tmp_path / "001-a red circle.png") == "a red circle"
    assert caption_for(tmp_path / "two.png") == "blue square, small"


def test_prompt_fills_filewords_then_name(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "cat [name].png")
    images, _ = load_dataset(tmp_path, 64, 64, ["a [name] of [filewords]"], seed=0)
    import random

    assert prompt_for(images[0], "zq", [], random.Random(0), False, 0) == "a zq of cat zq"
    assert fill("[name], [filewords]", "n", "f") == "n, f"


def test_shuffle_and_drop_out_vary_per_sample(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    (tmp_path / "x.txt").write_text("a,b,c,d,e,f")
    images, _ = load_dataset(tmp_path, 64, 64, ["[filewords]"], seed=0)
    import random

    rng = random.Random(1)
    shuffled = {prompt_for(images[0], "n", ["[filewords]"], rng, True, 0) for _ in range(20)}
    assert len(shuffled) > 1 and all(sorted(s.split(",")) == list("abcdef") for s in shuffled)
    dropped = [prompt_for(images[0], "n", ["[filewords]"], rng, False, 0.5) for _ in range(20)]
    assert any(len(d.split(",")) < 6 for d in dropped)
    # kohya's caption dropout: about that share of samples gets an empty prompt; without it, no draw moves
    prompts = [prompt_for(images[0], "n", ["[filewords]"], random.Random(k), False, 0, 0, 0.3) for k in range(400)]
    assert 0.22 < prompts.count("") / 400 < 0.38 and set(prompts) == {"", "a,b,c,d,e,f"}
    assert prompt_for(images[0], "n", ["[filewords]"], random.Random(1), True, 0, 0, 0.0) == prompt_for(
        images[0], "n", ["[filewords]"], random.Random(1), True, 0
    )
    # kohya's keep_tokens: the first tags stay first, never dropped
    kept = [prompt_for(images[0], "n", ["[filewords]"], rng, True, 0.5, keep_tokens=2) for _ in range(30)]
    assert all(k.startswith("a,b") and set(k.split(",")) <= set("abcdef") for k in kept)
    assert len({k for k in kept}) > 1 and any(len(k.split(",")) < 6 for k in kept)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "has no usable images"),
        (lambda p: (p.mkdir(), (p / "bad.png").write_bytes(b"nope")), "1 unreadable: bad.png"),
    ],
)
def test_dataset_refusals(tmp_path, setup, message):
    folder = tmp_path / "data"
    setup(folder)
    with pytest.raises(UserError, match=message):
        load_dataset(folder, 64, 64, ["x"], seed=0)


def test_shipped_templates():
    folder = ROOT / "textual_inversion_templates"
    assert {
        "none.txt",
        "style.txt",
        "style_filewords.txt",
        "subject.txt",
        "subject_filewords.txt",
        "hypernetwork.txt",
    } <= set(list_templates(folder))
    assert read_template(folder, "none.txt", require_name=False) == ["picture"]
    with pytest.raises(UserError, match="never uses \\[name\\]"):
        read_template(folder, "hypernetwork.txt", require_name=True)
    with pytest.raises(UserError, match="not found"):
        read_template(folder, "../pyproject.toml")


def test_kohya_folders_repeat_their_images_and_caption_them_by_name(tmp_path):
    """kohya's layout: `<repeats>_<name>` subfolders; other subfolders are not read, and say so when nothing is."""
    (tmp_path / "10_sks dog").mkdir()
    (tmp_path / "3_").mkdir()
    (tmp_path / "originals").mkdir()
    Image.new("RGB", (64, 64), "red").save(tmp_path / "10_sks dog" / "a.png")
    Image.new("RGB", (64, 64), "red").save(tmp_path / "10_sks dog" / "b.png")
    (tmp_path / "10_sks dog" / "b.caption").write_text("sks dog, running", encoding="utf-8")
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "3_" / "7-a blue thing.png")
    Image.new("RGB", (64, 64), "blue").save(tmp_path / "originals" / "skip.png")
    Image.new("RGB", (64, 64), "green").save(tmp_path / "top.png")
    images, problems = load_dataset(tmp_path, 64, 64, ["[filewords]"], seed=0)
    got = {(im.path.parent.name, im.path.name): (im.repeats, im.filewords) for im in images}
    assert got == {
        (tmp_path.name, "top.png"): (1, "top"),
        ("10_sks dog", "a.png"): (10, "sks dog"),  # no caption file: the folder's name
        ("10_sks dog", "b.png"): (10, "sks dog, running"),  # kohya's .caption
        ("3_", "7-a blue thing.png"): (3, "a blue thing"),  # an empty folder name: the file name, as A1111
    }
    assert not problems

    only_other = tmp_path / "plain"
    (only_other / "pictures").mkdir(parents=True)
    Image.new("RGB", (64, 64), "red").save(only_other / "pictures" / "a.png")
    with pytest.raises(UserError, match=r"named as kohya's are, <repeats>_<name> \(e\.g\. 10_pictures\)"):
        load_dataset(only_other, 64, 64, ["x"], seed=0)
