"""studies/build_doc_corpus.py on small hand-made .debs (dpkg-deb builds them; skipped without)."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from studies import build_doc_corpus  # noqa: E402
from mla_ext.train.data import default_corpus_files, resolve_source  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")


def make_deb(debs: Path, name: str, pages: dict[str, str]) -> Path:
    """A .deb named like the real package, with pages under that package's documentation root."""
    root = debs / f"{name}.pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {name}\nVersion: 1\nArchitecture: all\nMaintainer: t <t@t>\n"
        "Description: test\n")
    for rel, text in pages.items():
        path = root / build_doc_corpus.BY_NAME[name].root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    deb = debs / f"{name}_1_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), str(deb)],
                   check=True, capture_output=True)
    shutil.rmtree(root)
    return deb


PAGE = """<html><head><title>T</title><style>p {}</style></head><body>
<nav><a href="x">Table of contents</a></nav>
<h1>Tuning</h1><p>Set   the <b>buffer</b>
size &amp; restart.</p><script>var x = 1;</script>
<pre>  indented
    code</pre></body></html>"""


def test_builds_packages_and_default_corpus(tmp_path):
    debs = tmp_path / "debs"
    debs.mkdir()
    make_deb(debs, "linux-doc-6.1", {"index.rst.txt": "Linux kernel docs\n",
                                     "networking/tcp.rst.txt": "TCP tuning notes\n",
                                     "networking/logo.png": "not text"})
    make_deb(debs, "rust-doc", {"book/ch01.html": PAGE, "book/print.html": PAGE,
                                "std/vec.html": PAGE})
    out = tmp_path / "corpus"
    counts = build_doc_corpus.build(out, debs, ["linux-doc-6.1", "rust-doc"], progress=False)
    assert counts["linux-doc-6.1"] == 2  # the .png is not text
    assert (out / "linux-doc-6.1" / "networking" / "tcp.rst.txt").read_text() == \
        "TCP tuning notes\n"
    # only the books, without their all-chapters print.html; HTML reduced to its text
    assert counts["rust-doc"] == 1
    assert [p.name for p in (out / "rust-doc").rglob("*") if p.is_file()] == ["ch01.html.txt"]
    text = (out / "rust-doc" / "book" / "ch01.html.txt").read_text()
    assert text == "Tuning\n\nSet the buffer size & restart.\n\n  indented\n    code\n"
    names = {p.name for p in (out / "default").iterdir()}
    assert {f.name for f in default_corpus_files()} <= names
    assert "pydoc_topics_calibration.txt" in names
    assert counts["default"] == len(names)
    # the training data reader takes it as a directory corpus
    source = resolve_source(out)
    assert len(source.files) == counts["linux-doc-6.1"] + counts["rust-doc"] + counts["default"]
    assert list(tmp_path.glob(".corpus.*")) == []  # no staging left behind


def test_html_text_drops_what_is_not_content():
    text = build_doc_corpus.html_to_text(PAGE)
    for gone in ("Table of contents", "var x", "p {}", "<", "&amp;"):
        assert gone not in text


def test_package_without_its_files_leaves_nothing(tmp_path):
    debs = tmp_path / "debs"
    debs.mkdir()
    make_deb(debs, "perl-doc", {"5.36.0/pod/notes.txt": "no pod here\n"})
    out = tmp_path / "corpus"
    with pytest.raises(SystemExit, match=r"no \.pod files"):
        build_doc_corpus.build(out, debs, ["perl-doc"], progress=False)
    assert not out.exists() and list(tmp_path.glob(".corpus.*")) == []


def test_refuses_bad_arguments(tmp_path):
    out = tmp_path / "corpus"
    out.mkdir()
    (out / "x.txt").write_text("x")
    with pytest.raises(SystemExit, match="--out"):
        build_doc_corpus.build(out, tmp_path, ["perl-doc"])
    with pytest.raises(SystemExit, match="--debs"):
        build_doc_corpus.build(tmp_path / "new", tmp_path / "none", ["perl-doc"])
    with pytest.raises(SystemExit, match="no git-doc_"):
        build_doc_corpus.build(tmp_path / "new", tmp_path, ["git-doc"])
    with pytest.raises(SystemExit, match="--packages: unknown"):
        build_doc_corpus.build(tmp_path / "new", tmp_path, ["gcc-doc"])
    assert not (tmp_path / "new").exists()
