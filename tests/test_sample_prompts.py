"""kohya's sample prompts: several previews per preview step, each line with its own settings (`--n`, `--w`, `--h`,
`--d`, `--l`, `--s`, `--ss`); bad lines refused before a run starts, with the line and what to write."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from app.errors import UserError
from app.generation.infotext import parse_infotext
from app.generation.txt2img import Txt2ImgParams
from app.training.sample_prompts import MAX_SAMPLE_PROMPTS, SamplePrompt, parse_sample_prompts
from tests.test_training import cfg, dataset, fresh, templates  # noqa: F401 - fixtures used by name


def test_kohyas_line_syntax():
    text = (
        "a photo of sks dog on a beach --n blurry, lowres --w 512 --h 768 --d 42 --l 7.5 --s 28 --ss euler_a\n"
        "# a comment, skipped as kohya skips it\n"
        "\n"
        "a red circle --ss DPM++ 2M Karras\n"
        "no options at all"
    )
    first, second, third = parse_sample_prompts(text)
    assert first == SamplePrompt("a photo of sks dog on a beach", "blurry, lowres", 512, 768, 42, 7.5, 28, "Euler a")
    assert second == SamplePrompt("a red circle", sampler_name="DPM++ 2M Karras")
    base = Txt2ImgParams(prompt="template", negative_prompt="x", width=64, height=64, steps=20, seed=3)
    params = third.params(base)
    assert (params.prompt, params.negative_prompt, params.width, params.steps, params.seed) == (
        "no options at all",
        "x",
        64,
        20,
        3,
    )
    assert first.params(base).height == 768 and first.params(base).cfg_scale == 7.5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a cat --q 3", "line 1: unknown option '--q'"),
        ("ok\na cat --w wide", "line 2: --w (width) must be a number, got 'wide'"),
        ("a cat --l nan", "must be a finite number"),
        ("a cat --ss nosuch", "unknown sampler 'nosuch'"),
        ("a cat --s", "--s needs a value"),
        ("--w 512", "no prompt before them"),
        ("\n".join(["a cat"] * (MAX_SAMPLE_PROMPTS + 1)), f"at most {MAX_SAMPLE_PROMPTS}"),
    ],
)
def test_bad_lines_are_refused_with_the_line_and_the_fix(text, message):
    with pytest.raises(UserError, match=re.escape(message)) as refused:
        parse_sample_prompts(text)
    assert refused.value.field == "sample_prompts"


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_any_text_parses_or_is_refused_with_a_message(text):
    try:
        prompts = parse_sample_prompts(text)
    except UserError as e:
        assert str(e) and e.field == "sample_prompts"
        return
    assert len(prompts) <= MAX_SAMPLE_PROMPTS
    assert all(p.prompt and not p.prompt.startswith("--") for p in prompts)


def test_a_run_previews_every_sample_prompt_with_its_settings(services, dataset, templates):  # noqa: F811
    fresh(services, "zqsamples")
    lines = "a photo of zqsamples --w 72 --h 64 --d 42 --s 3\na red circle --n blue --d 7 --s 2 --l 5 --ss euler"
    job = services.training.train_embedding(
        cfg("zqsamples", dataset, steps=4, create_image_every=2, sample_prompts=lines)
    )
    result = job.wait()
    assert result.error is None
    images = result.log_dir / "images"
    assert sorted(p.name for p in images.iterdir()) == [
        "zqsamples-2-2.png",
        "zqsamples-2.png",
        "zqsamples-4-2.png",
        "zqsamples-4.png",
    ]
    with Image.open(images / "zqsamples-4.png") as first, Image.open(images / "zqsamples-4-2.png") as second:
        assert first.size == (72, 64) and second.size == (64, 64)  # the second line's size: the training size
        one, two = parse_infotext(first.info["parameters"]), parse_infotext(second.info["parameters"])
    assert (one["Seed"], one["Steps"], one["Prompt"]) == ("42", "3", "a photo of zqsamples")
    assert (two["Seed"], two["Steps"], two["CFG scale"], two["Sampler"]) == ("7", "2", "5.0", "Euler")
    assert two["Negative prompt"] == "blue"
    assert job.progress.extra["last_preview_path"].endswith("zqsamples-4.png")
    shown = job.progress.previews()  # the training panel's gallery: every line's image of the last step
    assert [caption for _, caption in shown] == ["a photo of zqsamples", "a red circle"]
    assert [image.size for image, _ in shown] == [(72, 64), (64, 64)]


def test_a_bad_sample_prompt_stops_the_run_before_it_starts(services, dataset, templates):  # noqa: F811
    path = fresh(services, "zqbadsample")
    before = path.read_bytes()
    for lines, message in (("a cat --w 70", "multiple of 8"), ("a cat --x 1", "unknown option")):
        with pytest.raises(UserError, match=message) as refused:
            services.training.train_embedding(cfg("zqbadsample", dataset, steps=4, sample_prompts=lines))
        assert refused.value.field == "sample_prompts"
    assert path.read_bytes() == before
