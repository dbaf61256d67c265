"""Atomic writes: a failed or interrupted write leaves the previous file intact and no temp file behind."""

import pytest

from app.fileio import atomic_write, atomic_write_text


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "emb.pt"
    atomic_write_text(target, "old")

    def broken(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write(target, broken)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["emb.pt"]


def test_write_creates_parent_folders(tmp_path):
    target = tmp_path / "a" / "b" / "c.txt"
    atomic_write_text(target, "x")
    assert target.read_text() == "x"
