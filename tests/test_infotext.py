"""Infotext written into PNGs and read back, A1111's format."""

from PIL import Image

from app.generation.infotext import build_infotext, parse_infotext, png_text_chunks, pnginfo_for

PARAMS = {
    "Steps": 20,
    "Sampler": "Euler a",
    "Schedule type": "Karras",
    "CFG scale": 7.0,
    "Seed": 1234,
    "Size": "512x768",
    "Model hash": "6ce0161689",
    "Model": "v1-5-pruned-emaonly",
    "Clip skip": 2,
    "RNG": "CPU",
    "TI hashes": "myemb: 1a2b3c4d5e6f, other: 0123456789ab",
    "Version": "sdp-0.1.0",
}


def test_layout_matches_a1111():
    text = build_infotext("a photo of a cat", "blurry", PARAMS)
    lines = text.split("\n")
    assert lines[0] == "a photo of a cat"
    assert lines[1] == "Negative prompt: blurry"
    assert lines[2].startswith("Steps: 20, Sampler: Euler a, Schedule type: Karras, CFG scale: 7.0, Seed: 1234, ")
    assert 'TI hashes: "myemb: 1a2b3c4d5e6f, other: 0123456789ab"' in lines[2]


def test_empty_negative_prompt_line_is_omitted():
    assert "Negative prompt" not in build_infotext("cat", "", {"Steps": 1, "Seed": 2, "Size": "64x64"})


def test_round_trip_with_multiline_prompt_and_quoted_values():
    prompt = "line one, (cat:1.2)\nline two: [dog|fox]"
    negative = "bad\nworse"
    parsed = parse_infotext(build_infotext(prompt, negative, PARAMS))
    assert parsed["Prompt"] == prompt
    assert parsed["Negative prompt"] == negative
    assert parsed["Steps"] == "20"
    assert parsed["Size-1"] == "512" and parsed["Size-2"] == "768"
    assert parsed["TI hashes"] == PARAMS["TI hashes"]
    assert parsed["Clip skip"] == "2"


def test_missing_clip_skip_reads_as_1_and_prompt_only_text():
    parsed = parse_infotext("just a prompt")
    assert parsed["Prompt"] == "just a prompt"
    assert parsed["Clip skip"] == "1"


def test_non_latin_text_survives_png(tmp_path):
    text = build_infotext("猫の写真, café", "", {"Steps": 3, "Seed": 1, "Size": "64x64"})
    path = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(path, pnginfo=pnginfo_for(text))
    with Image.open(path) as image:
        assert png_text_chunks(image)["parameters"] == text
