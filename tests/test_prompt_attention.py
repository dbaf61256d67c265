"""A1111's emphasis parser: exact output, merging and float arithmetic included."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.prompts import parse_prompt_attention


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("normal text", [["normal text", 1.0]]),
        ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
        ("(unbalanced", [["unbalanced", 1.1]]),
        ("\\(literal\\]", [["(literal]", 1.0]]),
        ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ["a ", 1.0],
                ["house", 1.5730000000000004],
                [" ", 1.1],
                ["on", 1.0],
                [" a ", 1.1],
                ["hill", 0.55],
                [", sun, ", 1.1],
                ["sky", 1.4641000000000006],
                [".", 1.1],
            ],
        ),
        ("((word))", [["word", 1.2100000000000002]]),
        ("[word]", [["word", 0.9090909090909091]]),
        ("(word:1.5)", [["word", 1.5]]),
        ("(word: 0.25 )", [["word", 0.25]]),
        ("", [["", 1.0]]),
        ("a BREAK b", [["a", 1.0], ["BREAK", -1.0], ["b", 1.0]]),
        ("(a BREAK b)", [["a", 1.1], ["BREAK", -1.1], ["b", 1.1]]),
        ("closing) only]", [["closing) only]", 1.0]]),
        ("time: 10:30", [["time: 10:30", 1.0]]),
        ("[unbalanced square", [["unbalanced square", 0.9090909090909091]]),
        ("\\\\ backslash", [["\\ backslash", 1.0]]),
    ],
)
def test_matches_a1111(text, expected):
    assert parse_prompt_attention(text) == expected


@given(st.text(alphabet="ab ,:()[]\\.0123456789BREAK", max_size=60))
def test_never_crashes_and_keeps_plain_letters(text):
    parsed = parse_prompt_attention(text)
    assert parsed
    joined = "".join(fragment for fragment, _ in parsed)
    # Every letter of the input survives (brackets and escapes are syntax, letters are content).
    assert sorted(c for c in joined if c in "ab") == sorted(c for c in text if c in "ab")
    # Neighbours never share a weight after merging.
    assert all(parsed[i][1] != parsed[i + 1][1] for i in range(len(parsed) - 1))


@given(st.text(alphabet=st.characters(blacklist_characters="()[]\\:"), max_size=80))
def test_text_without_syntax_is_one_fragment(text):
    parsed = parse_prompt_attention(text)
    if "BREAK" not in text:
        assert parsed == [[text, 1.0]]
