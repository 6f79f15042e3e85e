"""mla_ext.staging.staged_directory: the directory a checkpoint, a packed dataset or a
fine-tune's final model is written through appears whole or not at all."""
import os
import stat
from pathlib import Path

import pytest

from mla_ext.staging import staged_directory


def hidden(root):
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def test_appears_when_the_block_ends_and_creates_parents(tmp_path):
    out = tmp_path / "a" / "b" / "run"
    with staged_directory(out) as tmp:
        (tmp / "weights").write_text("new")
        assert not out.exists()  # nothing at the final place while writing
    assert (out / "weights").read_text() == "new"
    assert hidden(out.parent) == []


def test_replaces_an_existing_directory_whole(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "stale").write_text("old")
    with staged_directory(out) as tmp:
        (tmp / "weights").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["weights"]
    assert hidden(tmp_path) == []


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failure_leaves_the_old_directory_and_no_leftovers(tmp_path, error):
    out = tmp_path / "run"
    out.mkdir()
    (out / "weights").write_text("old")
    with pytest.raises(type(error)):
        with staged_directory(out) as tmp:
            (tmp / "weights").write_text("half")
            raise error
    assert (out / "weights").read_text() == "old"
    assert hidden(tmp_path) == []


def test_a_failed_swap_puts_the_old_directory_back(tmp_path, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "weights").write_text("old")
    rename = Path.rename

    def failing_rename(self, target):
        if Path(target) == out and self.name != ".run.old":
            raise OSError("rename failed")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", failing_rename)
    with pytest.raises(OSError, match="rename failed"):
        with staged_directory(out) as tmp:
            (tmp / "weights").write_text("new")
    assert (out / "weights").read_text() == "old"
    assert hidden(tmp_path) == []


def test_refuses_to_replace_a_file(tmp_path):
    out = tmp_path / "run"
    out.write_text("not a directory")
    with pytest.raises(FileExistsError, match="not a directory"):
        with staged_directory(out) as tmp:
            (tmp / "weights").write_text("new")
    assert out.read_text() == "not a directory"
    assert hidden(tmp_path) == []


def test_the_directory_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with staged_directory(tmp_path / "run") as tmp:
            (tmp / "weights").write_text("new")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "run").stat().st_mode) == 0o755
