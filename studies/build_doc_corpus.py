"""Build the larger offline training corpus of the GPU recovery runs: English technical
prose from Debian documentation packages (main, DFSG-free) plus the default corpus (the standard
library's top-level *.py files and the calibration part of pydoc_data.topics), as one directory of
text files that ``mla-ext pack`` and ``studies/finetune_study.py --data`` take.

Packages (PACKAGES below; 98.6 MB of text with the default corpus, 27.6 M SmolLM2 tokens):
linux-doc-6.1 (reST sources), perl-doc (POD), git-doc (AsciiDoc), and the HTML manuals of
postgresql-doc-15, maxima-doc, octave-doc, rust-doc (the books, not the API pages) and
openjdk-17-doc (the API documentation, without its index, tree and "uses of" pages). HTML is
reduced to its text (scripts, styles and navigation dropped). The default corpus alone is about
1.3 M tokens, so runs of tens of millions of tokens would repeat it many times and overfit it
(docs/results.md, "Recovery fine-tuning, 12 M tokens"). The Python documentation package
(python3.11-doc) is left out on purpose: pydoc_data.topics, the held-out evaluation text, is
generated from it.

    python studies/build_doc_corpus.py --out corpus                 # apt-get downloads the .debs
    python studies/build_doc_corpus.py --debs DIR --out corpus      # .debs downloaded before
    python studies/build_doc_corpus.py --packages linux-doc-6.1 --out corpus
    mla-ext pack --data corpus --out corpus_packed --seq-len 2048

The output appears whole or not at all: it is written next to --out and renamed at the end.
"""
from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import html.parser
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mla_ext.data import default_calibration_text  # noqa: E402
from mla_ext.train.data import default_corpus_files  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Package:
    """Which files of a documentation package become corpus text."""
    name: str
    root: str  # the documentation's directory inside the .deb
    suffixes: tuple[str, ...]  # files kept; .html ones are reduced to their text
    only: tuple[str, ...] = ()  # top-level directories under root kept (empty: all)
    exclude: tuple[str, ...] = ()  # fnmatch patterns of paths relative to root

    def selects(self, rel: Path) -> bool:
        if rel.suffix not in self.suffixes:
            return False
        if self.only and rel.parts[0] not in self.only:
            return False
        return not any(fnmatch.fnmatch(rel.as_posix(), pat) for pat in self.exclude)


PACKAGES = (
    # Sphinx keeps each page's reST source as <page>.rst.txt under html/_sources.
    Package("linux-doc-6.1", "usr/share/doc/linux-doc-6.1/html/_sources", (".txt",)),
    Package("perl-doc", "usr/share/perl", (".pod",)),
    Package("git-doc", "usr/share/doc/git-doc", (".txt",)),
    Package("postgresql-doc-15", "usr/share/doc/postgresql-doc-15/html", (".html",)),
    Package("maxima-doc", "usr/share/doc/maxima-doc/html", (".html",)),
    Package("octave-doc", "usr/share/doc/octave", (".html",)),
    # The API pages (std, core, alloc, src, ...) are mostly generated signatures; each book's
    # print.html repeats all of its chapters on one page.
    Package("rust-doc", "usr/share/doc/rust-doc/html", (".html",),
            only=("book", "rust-by-example", "reference", "nomicon", "embedded-book",
                  "edition-guide", "rustc", "rustdoc", "unstable-book"),
            exclude=("*/print.html",)),
    # Index, tree, "uses of" and other listing pages are names without prose.
    Package("openjdk-17-doc", "usr/share/doc/openjdk-17-jre-headless/api", (".html",),
            exclude=("index-files/*", "*/class-use/*", "*-tree.html", "*-index.html",
                     "deprecated-list.html", "serialized-form.html", "constant-values.html",
                     "help-doc.html", "search.html", "index.html", "*/package-use.html")),
)
BY_NAME = {p.name: p for p in PACKAGES}


class _HTMLText(html.parser.HTMLParser):
    """The text of an HTML page: blocks on their own lines, <pre> kept as it is, and the parts
    that are not content (head, scripts, styles, navigation, headers and footers) dropped."""

    SKIP = frozenset({"head", "script", "style", "nav", "header", "footer", "noscript", "svg",
                      "button"})
    VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta",
                      "param", "source", "track", "wbr"})
    BLOCK = frozenset({"p", "div", "li", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "dt",
                       "dd", "table", "section", "blockquote", "ul", "ol", "dl"})

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = self.pre = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.VOID:
            if tag == "br":
                self.parts.append("\n")
            return
        self.skip += tag in self.SKIP
        self.pre += tag == "pre"
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if tag in self.SKIP and self.skip:
            self.skip -= 1
        if tag == "pre" and self.pre:
            self.pre -= 1
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))


def html_to_text(page: str) -> str:
    parser = _HTMLText()
    parser.feed(page)
    parser.close()
    text = re.sub(r"[ \t]+\n", "\n", "".join(parser.parts))
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def fetch_debs(names: list[str], workdir: Path) -> Path:
    """Download the packages' .debs into workdir with apt-get (the configured Debian archive)."""
    if shutil.which("apt-get") is None:
        raise SystemExit("apt-get not found: download the packages and pass their directory "
                         "with --debs")
    done = subprocess.run(["apt-get", "download", *names], cwd=workdir, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"apt-get download {' '.join(names)} failed:\n{done.stderr.strip()}")
    return workdir


def find_deb(debs: Path, name: str) -> Path:
    found = sorted(debs.glob(f"{name}_*.deb"))
    if not found:
        raise SystemExit(f"--debs {debs}: no {name}_*.deb there")
    return found[-1]


def extract_package(package: Package, deb: Path, dest: Path, workdir: Path,
                    progress: bool = True) -> int:
    """Write the package's selected documentation as text files under dest; returns their
    number. Each file keeps its relative path, with .txt appended unless it ends in .txt."""
    if shutil.which("dpkg-deb") is None:
        raise SystemExit("dpkg-deb not found (Debian's dpkg package): it unpacks the .debs")
    unpacked = workdir / package.name
    done = subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"{deb}: dpkg-deb could not unpack it:\n{done.stderr.strip()}")
    root = unpacked / package.root
    files = (sorted(p for p in root.rglob("*") if p.is_file() and package.selects(p.relative_to(root)))
             if root.is_dir() else [])
    if not files:
        raise SystemExit(f"{deb}: no {'/'.join(package.suffixes)} files under {package.root} "
                         f"(is it {package.name}?)")
    for f in tqdm(files, desc=package.name, unit="file", disable=not progress):
        rel = f.relative_to(root)
        target = dest / (rel if rel.suffix == ".txt" else rel.with_name(rel.name + ".txt"))
        target.parent.mkdir(parents=True, exist_ok=True)
        if f.suffix == ".html":
            target.write_text(html_to_text(f.read_text(encoding="utf-8", errors="replace")))
        else:
            shutil.copyfile(f, target)
    shutil.rmtree(unpacked)
    return len(files)


def write_default_corpus(dest: Path) -> int:
    """The default corpus as files: the stdlib *.py files and the pydoc calibration text."""
    dest.mkdir(parents=True)
    files = default_corpus_files()
    for f in files:
        shutil.copyfile(f, dest / f.name)
    (dest / "pydoc_topics_calibration.txt").write_text(default_calibration_text())
    return len(files) + 1


def build(out: Path, debs: Path | None = None, packages: list[str] | None = None,
          progress: bool = True) -> dict:
    """Build the corpus at out; returns the number of files per package, "default" and the
    total "bytes"."""
    names = list(packages or BY_NAME)
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise SystemExit(f"--packages: unknown {unknown}; choose from {', '.join(BY_NAME)}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SystemExit(f"--out {out} exists and is not an empty directory")
    if debs is not None and not debs.is_dir():
        raise SystemExit(f"--debs {debs}: no such directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        tmp = Path(tmp)
        staged = tmp / "corpus"
        work = tmp / "work"
        work.mkdir()
        debs = debs if debs is not None else fetch_debs(names, work)
        counts = {name: extract_package(BY_NAME[name], find_deb(debs, name), staged / name,
                                        work, progress)
                  for name in names}
        counts["default"] = write_default_corpus(staged / "default")
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
    p.add_argument("--debs", type=Path, default=None,
                   help="a directory holding the packages' downloaded .debs "
                        "(default: apt-get download them)")
    p.add_argument("--packages", default=",".join(BY_NAME),
                   help="comma-separated packages to include (default: all, %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.packages.split(",") if n.strip()]
    counts = build(args.out, args.debs, names, progress=not args.quiet)
    files = ", ".join(f"{counts[n]} {n}" for n in names)
    print(f"{args.out}: {files} + {counts['default']} default-corpus files, "
          f"{counts['bytes'] / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
