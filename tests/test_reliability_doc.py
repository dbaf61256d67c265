"""docs/reliability.md stays true: the tests and figures it names are the ones the suite has (issue 15, item 8).
The fuzzed-operation count is checked where the schema is served (tests/test_api_fuzz.py)."""

from __future__ import annotations

import ast
import re
from collections import Counter

from tests import test_training_faults, test_training_kill
from tests.conftest import ROOT

DOC = ROOT / "docs" / "reliability.md"


def doc() -> str:
    return " ".join(DOC.read_text().split())  # one line: figures may wrap anywhere


def max_examples(module: str) -> set[int]:
    """The `max_examples` of every hypothesis test in tests/<module>.py."""
    return {int(n) for n in re.findall(r"max_examples=(\d+)", (ROOT / "tests" / f"{module}.py").read_text())}


def test_every_test_file_and_test_named_in_the_doc_exists():
    text = DOC.read_text()
    files = set(re.findall(r"`(tests/[\w/]+\.py)`", text))
    assert len(files) >= 10
    assert [f for f in files if not (ROOT / f).is_file()] == []
    defined = set()
    for path in (ROOT / "tests").rglob("test_*.py"):
        defined |= {node.name for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.FunctionDef)}
    named = set(re.findall(r"`(test_\w+)`", text))
    assert named and named <= defined, named - defined


def test_kill_point_counts_are_the_suites():
    counts = Counter(name for name, _ in test_training_kill.CASES)
    total = sum(counts.values())
    text = doc()
    assert (
        f"{total} chosen points ({counts['embedding']} embedding, {counts['hypernetwork']} hypernetwork, "
        f"{counts['lora']} LoRA, {counts['pivotal']} pivotal LoRA with max-norm)" in text
    )
    assert f"**{counts['embedding']} seeded kill points**" in text
    kinds = len(test_training_kill.KINDS["lora"].kill_kinds())
    assert f"one point of each of the {kinds} kinds, {counts['hypernetwork'] + counts['lora']} more" in text
    assert counts["pivotal"] == kinds + 1 and f"gets the {kinds} and a ninth" in text


def test_fault_and_property_figures_are_the_suites():
    text = doc()
    assert f"{len(test_training_faults.POINTS)} save points" in text
    (parsers,) = max_examples("test_parser_properties")
    assert f"{parsers} cases per parser property" in text
    mutated = max(max_examples("test_file_reader_properties"))
    assert f"{mutated} mutated model files" in text and f"{mutated} cases run in the suite" in text
    (text_files,) = max_examples("test_text_file_properties")
    assert f"{text_files} per hand-edited text file property" in text
