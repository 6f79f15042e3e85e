"""Build the larger offline training corpus of the GPU recovery runs (issue 4): the reST sources
of Debian's linux-doc-6.1 package (about 3,200 files, 24 MB of English technical prose) plus the
default corpus (the standard library's top-level *.py files and the calibration part of
pydoc_data.topics), as one directory that ``mla-ext pack`` and ``bench/finetune_study.py --data``
take.

The default corpus alone is about 1.3 M tokens, so runs of tens of millions of tokens repeat it
many times and overfit it (docs/results.md, "Recovery fine-tuning, 12 M tokens"). The Python
documentation package (python3.11-doc) is left out on purpose: pydoc_data.topics, the held-out
evaluation text, is generated from it.

    python bench/build_doc_corpus.py --out corpus              # fetches the .deb (apt-get download)
    python bench/build_doc_corpus.py --deb linux-doc-6.1_6.1.176-1_all.deb --out corpus
    mla-ext pack --data corpus --out corpus_packed --seq-len 2048

The output appears whole or not at all: it is written next to --out and renamed at the end.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mla_ext.data import default_calibration_text  # noqa: E402
from mla_ext.train.data import default_corpus_files  # noqa: E402

PACKAGE = "linux-doc-6.1"
# Sphinx keeps each page's reST source as <page>.rst.txt under html/_sources.
SOURCES = Path("usr/share/doc") / PACKAGE / "html" / "_sources"


def fetch_deb(workdir: Path) -> Path:
    """Download the package's .deb into workdir with apt-get (the configured Debian archive)."""
    if shutil.which("apt-get") is None:
        raise SystemExit("apt-get not found: pass the downloaded package with --deb")
    done = subprocess.run(["apt-get", "download", PACKAGE], cwd=workdir, capture_output=True,
                          text=True)
    debs = sorted(workdir.glob(f"{PACKAGE}_*.deb"))
    if done.returncode != 0 or not debs:
        raise SystemExit(f"apt-get download {PACKAGE} failed:\n{done.stderr.strip()}")
    return debs[-1]


def extract_sources(deb: Path, dest: Path, workdir: Path) -> int:
    """Copy the package's reST sources into dest; returns the number of files."""
    if shutil.which("dpkg-deb") is None:
        raise SystemExit("dpkg-deb not found (Debian's dpkg package): it unpacks the .deb")
    unpacked = workdir / "unpacked"
    done = subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"--deb {deb}: dpkg-deb could not unpack it:\n{done.stderr.strip()}")
    root = unpacked / SOURCES
    files = sorted(p for p in root.rglob("*.txt") if p.is_file()) if root.is_dir() else []
    if not files:
        raise SystemExit(f"--deb {deb}: no reST sources under {SOURCES} (is it {PACKAGE}?)")
    for f in files:
        target = dest / f.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)
    return len(files)


def write_default_corpus(dest: Path) -> int:
    """The default corpus as files: the stdlib *.py files and the pydoc calibration text."""
    dest.mkdir(parents=True)
    files = default_corpus_files()
    for f in files:
        shutil.copyfile(f, dest / f.name)
    (dest / "pydoc_topics_calibration.txt").write_text(default_calibration_text())
    return len(files) + 1


def build(out: Path, deb: Path | None) -> dict:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SystemExit(f"--out {out} exists and is not an empty directory")
    if deb is not None and not deb.is_file():
        raise SystemExit(f"--deb {deb}: no such file")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        tmp = Path(tmp)
        staged = tmp / "corpus"
        work = tmp / "work"
        work.mkdir()
        deb = deb if deb is not None else fetch_deb(work)
        counts = {PACKAGE: extract_sources(deb, staged / PACKAGE, work),
                  "default": write_default_corpus(staged / "default")}
        if out.exists():
            out.rmdir()
        staged.rename(out)
    counts["bytes"] = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    return counts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True,
                   help="output directory (must not exist, or be empty)")
    p.add_argument("--deb", type=Path, default=None,
                   help=f"a downloaded {PACKAGE}_*.deb (default: apt-get download it)")
    args = p.parse_args(argv)
    counts = build(args.out, args.deb)
    print(f"{args.out}: {counts[PACKAGE]} {PACKAGE} files + {counts['default']} default-corpus "
          f"files, {counts['bytes'] / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
