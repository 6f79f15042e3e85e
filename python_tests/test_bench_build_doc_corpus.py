"""bench/build_doc_corpus.py on a small hand-made .deb (dpkg-deb builds it; skipped without)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import build_doc_corpus  # noqa: E402
from mla_ext.train.data import default_corpus_files, resolve_source  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")


def make_deb(tmp_path: Path, pages: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: linux-doc-6.1\nVersion: 1\nArchitecture: all\nMaintainer: t <t@t>\n"
        "Description: test\n")
    for rel, text in pages.items():
        path = root / build_doc_corpus.SOURCES / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    deb = tmp_path / "linux-doc-6.1_1_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), str(deb)],
                   check=True, capture_output=True)
    return deb


def test_builds_sources_and_default_corpus(tmp_path):
    deb = make_deb(tmp_path, {"index.rst.txt": "Linux kernel docs\n",
                              "networking/tcp.rst.txt": "TCP tuning notes\n"})
    out = tmp_path / "corpus"
    counts = build_doc_corpus.build(out, deb)
    assert counts["linux-doc-6.1"] == 2
    assert (out / "linux-doc-6.1" / "networking" / "tcp.rst.txt").read_text() == \
        "TCP tuning notes\n"
    names = {p.name for p in (out / "default").iterdir()}
    assert {f.name for f in default_corpus_files()} <= names
    assert "pydoc_topics_calibration.txt" in names
    assert counts["default"] == len(names)
    # the training data reader takes it as a directory corpus
    source = resolve_source(out)
    assert len(source.files) == counts["linux-doc-6.1"] + counts["default"]
    assert list(tmp_path.glob(".corpus.*")) == []  # no staging left behind


def test_bad_package_leaves_nothing(tmp_path):
    deb = make_deb(tmp_path, {})
    out = tmp_path / "corpus"
    with pytest.raises(SystemExit, match="no reST sources"):
        build_doc_corpus.build(out, deb)
    assert not out.exists() and list(tmp_path.glob(".corpus.*")) == []


def test_refuses_non_empty_out_and_missing_deb(tmp_path):
    out = tmp_path / "corpus"
    out.mkdir()
    (out / "x.txt").write_text("x")
    with pytest.raises(SystemExit, match="--out"):
        build_doc_corpus.build(out, tmp_path / "none.deb")
    with pytest.raises(SystemExit, match="--deb"):
        build_doc_corpus.build(tmp_path / "new", tmp_path / "none.deb")
