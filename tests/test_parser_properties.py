"""Properties of the text parsers, checked by hypothesis on generated input: they never fail with anything but a
user error, and what we write we read back unchanged."""

from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from app.generation.infotext import build_infotext, parse_infotext
from app.prompts.extra_networks import extract_extra_networks
from app.prompts.schedules import prompt_schedule, text_at_step

TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=80)
TAG = re.compile(r"<(\w+):([^>]+)>")


@settings(max_examples=300, deadline=None)
@given(TEXT | st.text(alphabet="ab [](){}:|,0123456789.", max_size=60), st.integers(1, 150))
def test_prompt_schedules_accept_any_text_and_cover_every_step(prompt, steps):
    schedule = prompt_schedule(prompt, steps)
    ends = [entry.end_at_step for entry in schedule]
    assert ends == sorted(ends) and ends[-1] == steps
    for step in range(steps):
        assert isinstance(text_at_step(schedule, step), str)


@settings(max_examples=300, deadline=None)
@given(TEXT | st.text(alphabet="ab<>:hypernet0.5 ", max_size=60))
def test_extra_network_tags_are_all_taken_out_in_one_pass(prompt):
    rest, tags = extract_extra_networks(prompt)
    assert [t.text for t in tags] == [m.group(0) for m in TAG.finditer(prompt)]
    assert len(rest) == len(prompt) - sum(len(t.text) for t in tags)
    for tag in tags:
        assert re.fullmatch(r"\w+", tag.kind) and tag.args


FIELD_VALUE = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")) | st.sampled_from(',:\n"'), max_size=30)
LINE = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=60).map(str.strip)


@settings(max_examples=300, deadline=None)
@given(
    LINE.filter(lambda s: s and not s.startswith("Negative prompt:")),
    LINE,
    st.dictionaries(
        st.sampled_from(["Steps", "Sampler", "CFG scale", "Seed", "Model", "Hires prompt"]),
        FIELD_VALUE.filter(bool),
        min_size=3,
    ),
)
def test_infotext_round_trips(prompt, negative, fields):
    parsed = parse_infotext(build_infotext(prompt, negative, fields))
    assert parsed["Prompt"] == prompt
    assert parsed["Negative prompt"] == negative
    for key, value in fields.items():
        assert parsed[key] == value, (key, value)
