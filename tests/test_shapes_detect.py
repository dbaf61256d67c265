"""The fixed detector that scores prompt adherence reads real renders right, and tells different scenes apart."""

from __future__ import annotations

import random
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from app.shapes.detect import accuracy, detect, score
from app.shapes.scenes import COLORS, SHAPES, render, sample_scene


def test_detector_reads_real_renders():
    rng = random.Random(7)
    scenes = [sample_scene(rng) for _ in range(400)]
    result = accuracy(scenes, [render(s) for s in scenes])
    assert result["all"] >= 0.99, result


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31), attribute=st.sampled_from(["background", "color", "shape", "position", "count"]))
def test_a_different_scene_is_scored_wrong_on_what_differs(seed, attribute):
    rng = random.Random(seed)
    scene = sample_scene(rng)
    if attribute == "background":
        other = replace(scene, background=next(c for c in COLORS if c not in (scene.background, scene.color)))
    elif attribute == "color":
        other = replace(scene, color=next(c for c in COLORS if c not in (scene.background, scene.color)))
    elif attribute == "shape":
        other = replace(scene, shape=next(s for s in SHAPES if s != scene.shape))
    elif attribute == "count":
        other = replace(scene, count=3 - scene.count, position="side by side" if scene.count == 1 else "on the left",
                        size="small")  # fmt: skip
    else:
        place = {"side by side": "stacked", "stacked": "side by side"}.get(scene.position)
        place = place or ("on the left" if scene.position in ("on the right", "in the center") else "on the right")
        other = replace(scene, position=place)
    assert score(other, detect(render(scene)))[attribute] is False
    assert all(score(scene, detect(render(scene))).values())


def test_an_empty_picture_has_no_objects():
    from PIL import Image

    found = detect(Image.new("RGB", (64, 64), COLORS["green"]))
    assert found.background == "green" and found.count == 0 and found.color is None
    assert not any(score(replace(sample_scene(random.Random(1)), background="green"), found)[a]
                   for a in ("color", "count", "shape", "position"))  # fmt: skip
