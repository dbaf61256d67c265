"""Prompt editing `[from:to:when]` and alternation `[a|b]`, A1111's current step rules."""

import pytest

from app.prompts import prompt_schedule, text_at_step


def pairs(prompt, steps=10):
    return [(e.end_at_step, e.text) for e in prompt_schedule(prompt, steps)]


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("test", [(10, "test")]),
        ("a [b:c:0.5] d", [(5, "a b d"), (10, "a c d")]),
        ("a [b:c:3] d", [(3, "a b d"), (10, "a c d")]),
        ("[a:5]", [(5, ""), (10, "a")]),
        ("[a::5]", [(5, "a"), (10, "")]),
        ("[[a:b:3]:c:6]", [(3, "a"), (6, "b"), (10, "c")]),
        ("a [b:c:2.0]", [(10, "a b")]),  # 2.0 = 200% of the steps: never switches
        ("a [b:c:0]", [(10, "a c")]),
        ("(keep:1.2) [x:y:0.5]", [(5, "(keep:1.2) x"), (10, "(keep:1.2) y")]),
        ("[unbalanced", [(10, "[unbalanced")]),
    ],
)
def test_prompt_editing(prompt, expected):
    assert pairs(prompt) == expected


def test_alternation_cycles_every_step():
    schedule = prompt_schedule("[cat|dog] photo", 4)
    assert [(e.end_at_step, e.text) for e in schedule] == [
        (1, "cat photo"),
        (2, "dog photo"),
        (3, "cat photo"),
        (4, "dog photo"),
    ]


def test_text_at_step_uses_first_entry_not_yet_ended():
    schedule = prompt_schedule("a [b:c:5]", 10)
    texts = [text_at_step(schedule, i) for i in range(10)]
    # A1111: steps 0..5 use the first text (step <= end_at_step), 6..9 the second.
    assert texts == ["a b"] * 6 + ["a c"] * 4
