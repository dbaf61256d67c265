"""A1111 emphasis syntax: `(word)`, `[word]`, `(word:1.5)`, escapes and `BREAK`.

The output must equal A1111's `parse_prompt_attention` exactly, float arithmetic included, because the weights
feed the conditioning and users compare images across tools. So the order of multiplications matters: each
closing bracket multiplies every fragment since its opening bracket, in the order the brackets close.
"""

from __future__ import annotations

import re

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1

# One token per match: escapes, brackets, an explicit `:weight)` closer, plain text, or a stray colon.
_TOKEN = re.compile(
    r"""
    \\\( | \\\) | \\\[ | \\\] | \\\\ | \\     # escapes (and a lone backslash)
    | \( | \[                                # openers
    | :\s*([+-]?[.\d]+)\s*\)                 # ':1.5)' closes a round bracket with a weight
    | \) | \]                                # closers
    | [^\\()\[\]:]+                          # plain text
    | :                                      # a colon that is not a weight
    """,
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.DOTALL)

#: The weight that marks a BREAK fragment; a BREAK inside brackets gets scaled and is then plain text (A1111).
BREAK_WEIGHT = -1.0


def parse_prompt_attention(text: str) -> list[list]:
    """Split a prompt into `[text, weight]` pairs, merging neighbours of equal weight.

    >>> parse_prompt_attention('an (important) word')
    [['an ', 1.0], ['important', 1.1], [' word', 1.0]]
    """
    fragments: list[list] = []
    open_round: list[int] = []
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        for fragment in fragments[start:]:
            fragment[1] *= factor

    for match in _TOKEN.finditer(text):
        token = match.group(0)
        explicit_weight = match.group(1)
        if token.startswith("\\"):
            fragments.append([token[1:], 1.0])
        elif token == "(":
            open_round.append(len(fragments))
        elif token == "[":
            open_square.append(len(fragments))
        elif explicit_weight is not None and open_round:
            scale_from(open_round.pop(), float(explicit_weight))
        elif token == ")" and open_round:
            scale_from(open_round.pop(), ROUND_MULTIPLIER)
        elif token == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_BREAK.split(token)):
                if i > 0:
                    fragments.append(["BREAK", BREAK_WEIGHT])
                fragments.append([part, 1.0])

    # Unclosed brackets still apply to everything after them.
    for start in open_round:
        scale_from(start, ROUND_MULTIPLIER)
    for start in open_square:
        scale_from(start, SQUARE_MULTIPLIER)

    if not fragments:
        return [["", 1.0]]

    merged = [fragments[0]]
    for fragment in fragments[1:]:
        if merged[-1][1] == fragment[1]:
            merged[-1][0] += fragment[0]
        else:
            merged.append(fragment)
    return merged
