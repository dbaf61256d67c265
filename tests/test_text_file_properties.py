"""Properties of the text files users edit by hand: `styles.csv` and prompt templates, as any bytes. Reading them
gives styles/lines or our clear user error, never another exception; what a template holds comes back line by line."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from app.errors import UserError
from app.generation.styles import StyleDatabase
from app.training.templates import fill, read_template

CSV_BYTES = st.binary(max_size=300) | st.text(alphabet='name,prompt,negative_prompt"\n\r{}\x00é ab', max_size=200).map(
    lambda t: t.encode("utf-8")
)
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)


@settings(max_examples=200, deadline=None)
@given(CSV_BYTES, st.lists(TEXT, max_size=3), TEXT, TEXT)
def test_any_styles_file_reads_and_applies(data, names, prompt, negative):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "styles.csv"
        path.write_bytes(b"name,prompt,negative_prompt\n" + data)
        db = StyleDatabase(path)
        styles = db.styles()
        assert all(isinstance(k, str) and k for k in styles)
        out_prompt, out_negative, missing = db.apply(prompt, negative, [*names, *list(styles)[:2]])
        assert isinstance(out_prompt, str) and isinstance(out_negative, str)
        assert set(missing) <= set(names)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), TEXT | st.sampled_from(["../x.txt", "a\x00b.txt", "", ".", "sub/../t.txt"]))
def test_any_template_file_or_name_gives_lines_or_a_user_error(data, filename):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "templates"
        folder.mkdir()
        (folder / "t.txt").write_bytes(data)
        for name in ("t.txt", filename):
            try:
                lines = read_template(folder, name, require_name=False)
            except UserError as e:
                assert str(e).startswith("Prompt template")
                continue
            assert lines and all(line == line.strip() and line for line in lines)


@settings(max_examples=200, deadline=None)
@given(st.lists(TEXT.filter(lambda t: t.strip() and "\n" not in t and "\r" not in t), min_size=1, max_size=5))
def test_template_lines_come_back_and_fill_replaces_every_placeholder(lines):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "t.txt").write_text("\n".join(lines), encoding="utf-8")
        try:
            read = read_template(folder, "t.txt", require_name=False)
        except UserError:
            return  # lines that are all whitespace to str.splitlines (e.g. \x1c) leave an empty template
        assert read == [line.strip() for line in "\n".join(lines).splitlines() if line.strip()]
        for line in read:
            filled = fill(line, "zqname", "a red circle")
            assert "[name]" not in filled and "[filewords]" not in filled
