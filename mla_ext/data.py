"""Text for calibration and evaluation.

The default corpus is one every Python install has: the documentation topics of
``pydoc_data.topics`` (English prose, about 110k tokens), split once into a calibration part
(the first 60 %) and a held-out evaluation part (the last 40 %) at a topic boundary, so the two
never share text. Any text file, directory of text files, or JSONL file can replace it.
"""
from __future__ import annotations

import json
from pathlib import Path

CALIBRATION_FRACTION = 0.6
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")


def _pydoc_topics() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[key].strip() for key in sorted(topics)]


def _split_topics() -> tuple[list[str], list[str]]:
    docs = _pydoc_topics()
    total = sum(len(d) for d in docs)
    seen, cut = 0, len(docs)
    for i, doc in enumerate(docs):
        if seen >= CALIBRATION_FRACTION * total:
            cut = i
            break
        seen += len(doc)
    return docs[:cut], docs[cut:]


def _split_default() -> tuple[str, str]:
    calibration, held_out = _split_topics()
    return "\n\n".join(calibration), "\n\n".join(held_out)


def default_calibration_topics() -> list[str]:
    """The topics of the calibration part of pydoc_data.topics, one string each."""
    return _split_topics()[0]


def default_calibration_text() -> str:
    """The calibration part of pydoc_data.topics (disjoint from the evaluation part)."""
    return _split_default()[0]


def default_evaluation_text() -> str:
    """The held-out part of pydoc_data.topics."""
    return _split_default()[1]


def load_texts(source: str | Path) -> list[str]:
    """Documents from a text file, a directory of text files, or a JSONL file (its "text"
    field); ValueError for anything empty or unreadable."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"no text at {path}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        docs = [_read(p) for p in files]
    elif path.suffix == ".jsonl":
        docs = []
        for n, line in enumerate(_read(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n} is not valid JSON: {exc}") from exc
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"{path}:{n} has no string field 'text'")
            docs.append(record["text"])
    else:
        docs = [_read(path)]
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise ValueError(f"{path} holds no text")
    return docs


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path} is not UTF-8 text: {exc}") from exc
