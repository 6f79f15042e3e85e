"""Training data: text sources, tokenization and packing into memory-mapped shards.

A packed dataset is a directory holding ``index.json`` and shards ``shard_00000.bin``, ...: each
shard is a flat little-endian array of token ids (uint16 when the vocabulary fits, else uint32),
``sequences * seq_len`` long, read back through ``np.memmap`` so a corpus never has to fit in
RAM. Documents are concatenated with the tokenizer's EOS between them and cut into sequences of
``seq_len`` tokens; the tail shorter than one sequence is dropped (and counted in the index).

Sources (``resolve_source``):
- ``"default"``: the Python standard library's top-level ``*.py`` files (the directory of the
  ``os`` module) plus the calibration part of ``pydoc_data.topics``; the held-out part never
  enters (``pydoc_data`` is a subdirectory, so the glob does not reach its ``topics.py``);
- a text file, a directory of text files (searched recursively), a JSONL file (field "text");
- ``"hf:NAME"``: a Hugging Face dataset, streamed when online (needs the ``datasets`` package).

``mix_sources(base, extra, fraction)`` packs ``base`` with ``extra`` mixed in, so that
``fraction`` of the packed tokens come from ``extra``: whole documents are interleaved (never
split), ``extra``'s documents repeat as often as the fraction needs, and packing ends with
``base`` (or at ``max_sequences``; with fraction 1 only ``max_sequences`` ends it). The
recovery fine-tune mixes chat text into the documentation corpus this way (``train/chat.py``).
"""
from __future__ import annotations

import codecs
import hashlib
import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from ..data import TEXT_SUFFIXES, default_calibration_text
from ..staging import staged_directory

INDEX = "index.json"
FORMAT = "mla_ext.packed"
FORMAT_VERSION = 1
HF_PREFIX = "hf:"
DATA_SUFFIXES = TEXT_SUFFIXES + (".jsonl",)
# Big text files are tokenized in pieces of about this many characters (cut at line ends) so
# that a single multi-gigabyte file never sits in memory as one string.
BLOCK_CHARS = 1 << 20
TOKENIZE_BATCH = 64
# A few hundred MB per shard keeps the file count low without making any one file unwieldy.
DEFAULT_SHARD_TOKENS = 1 << 27


class DataError(ValueError):
    """Training data that cannot be used (missing, empty, not UTF-8, malformed, corrupt)."""


@dataclass
class TextSource:
    """Where the documents come from; build it with ``resolve_source`` (which validates)."""
    description: str
    files: list[Path] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    hf_name: str | None = None
    hf_config: str | None = None
    hf_split: str = "train"
    text_field: str = "text"
    # documents of another source mixed in as this fraction of the tokens (mix_sources)
    mix_in: "TextSource | None" = None
    mix_fraction: float = 0.0

    @property
    def needs_limit(self) -> bool:
        """Whether packing needs max_sequences to end: a streamed dataset may never end, and
        mixed-in documents alone (fraction 1) repeat without end."""
        return bool(self.hf_name) or (self.mix_in is not None and self.mix_fraction == 1)

    def fingerprint(self) -> str:
        """Changes whenever the documents may have changed (paths, sizes, mtimes, texts)."""
        h = hashlib.sha256()
        for f in self.files:
            st = f.stat()
            h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        for t in self.texts:
            h.update(hashlib.sha256(t.encode()).digest())
        h.update(f"{self.hf_name}\0{self.hf_config}\0{self.hf_split}\0{self.text_field}".encode())
        if self.mix_in is not None:
            h.update(f"\0mix {self.mix_fraction!r}\0{self.mix_in.fingerprint()}".encode())
        return h.hexdigest()


def default_corpus_files() -> list[Path]:
    """The top-level ``*.py`` files of the standard library."""
    return sorted(Path(os.__file__).parent.glob("*.py"))


def resolve_source(data, *, hf_config: str | None = None, hf_split: str = "train",
                   text_field: str = "text") -> TextSource:
    """Validate ``data`` ("default", a path, or "hf:NAME") without tokenizing anything.

    Every local file is read once here, so that a missing, empty, non-UTF-8 or malformed
    input fails before any packing or training starts."""
    if isinstance(data, TextSource):
        return data
    if data is None or str(data) == "default":
        return TextSource("default corpus (stdlib *.py + pydoc_data.topics calibration part)",
                          files=_checked_files(default_corpus_files(), "default corpus"),
                          texts=[default_calibration_text()])
    text = str(data)
    if text.startswith(HF_PREFIX):
        name = text[len(HF_PREFIX):]
        if not name:
            raise DataError("data 'hf:' names no dataset (give hf:NAME, e.g. hf:org/corpus)")
        _import_datasets(name)
        return TextSource(f"Hugging Face dataset {name}", hf_name=name, hf_config=hf_config,
                          hf_split=hf_split, text_field=text_field)
    path = Path(text)
    if not path.exists():
        raise DataError(f"data {path} does not exist (give a text file, a directory, a .jsonl "
                        f"file, 'default' or hf:NAME)")
    if path.is_dir():
        if (path / INDEX).is_file():
            raise DataError(f"data {path} is a packed dataset: open it with PackedDataset")
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)
        if not files:
            raise DataError(f"data directory {path} has no files ending in "
                            f"{', '.join(DATA_SUFFIXES)}")
    else:
        files = [path]
    return TextSource(str(path), files=_checked_files(files, str(path), text_field),
                      text_field=text_field)


def mix_sources(base, extra, fraction: float) -> TextSource:
    """``base`` with ``extra``'s documents mixed in as ``fraction`` (in (0, 1]) of the packed
    tokens; both anything ``resolve_source`` takes. ``extra`` repeats as often as needed, so it
    must be local text (not hf:NAME)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
            or not 0 < fraction <= 1:
        raise DataError(f"mix fraction must be a number in (0, 1], got {fraction!r}")
    base, extra = resolve_source(base), resolve_source(extra)
    if base.mix_in is not None or extra.mix_in is not None:
        raise DataError("mix_sources mixes two plain sources; one of them is a mixture already")
    if extra.hf_name:
        raise DataError(f"the mixed-in data hf:{extra.hf_name} would have to repeat: give local "
                        "text (a file, directory or JSONL file)")
    return replace(base, mix_in=extra, mix_fraction=float(fraction),
                   description=f"{base.description} with {fraction:.0%} of the tokens from "
                               f"{extra.description}")


def _import_datasets(name: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"data hf:{name} needs the Hugging Face `datasets` package, which is not "
                        "installed: run `pip install datasets`, or give a local text file, "
                        "directory or JSONL file") from None
    return datasets


def _checked_files(files: list[Path], what: str, text_field: str = "text") -> list[Path]:
    """The files of ``what`` that hold text; DataError naming the first bad file."""
    nonempty = [f for f in files if _check_file(f, text_field)]
    if not nonempty:
        raise DataError(f"data {what} holds no text (all {len(files)} file(s) are empty)")
    return nonempty


def _check_file(path: Path, text_field: str) -> bool:
    """Whether ``path`` holds text; DataError if it is not UTF-8 (or, for JSONL, malformed)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, any_text, tail, line_no = 0, False, "", 0
    with open(path, "rb") as fh:
        while True:
            block = fh.read(BLOCK_CHARS)
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                raise DataError(f"data file {path} is not UTF-8 text (byte "
                                f"{offset + exc.start}: {exc.reason})") from None
            offset += len(block)
            if path.suffix != ".jsonl":
                any_text |= bool(text.strip())
            else:
                lines = (tail + text).split("\n")
                # a block may end inside a line: keep the rest for the next block
                tail = lines.pop() if block else ""
                for line in lines:
                    line_no += 1
                    any_text |= bool(_jsonl_text(line, path, line_no, text_field).strip())
            if not block:
                return any_text


def _jsonl_text(line: str, path: Path, line_no: int, text_field: str = "text") -> str:
    if not line.strip():
        return ""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"data file {path}:{line_no} is not valid JSON: {exc}") from None
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise DataError(f"data file {path}:{line_no} has no string field {text_field!r}")
    return record[text_field]


def iter_documents(source: TextSource):
    """Yield (text, ends_document) pieces; a document may arrive in several pieces."""
    for path in source.files:
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    text = _jsonl_text(line, path, n, source.text_field)
                    if text.strip():
                        yield text, True
            continue
        with open(path, encoding="utf-8") as fh:
            block, size = [], 0
            for line in fh:
                block.append(line)
                size += len(line)
                if size >= BLOCK_CHARS:
                    yield "".join(block), False
                    block, size = [], 0
            yield "".join(block), True
    for text in source.texts:
        yield text, True
    if source.hf_name:
        yield from _iter_hf(source)


def _iter_hf(source: TextSource):
    datasets = _import_datasets(source.hf_name)
    offline = any(os.environ.get(v, "0") not in ("", "0") for v in
                  ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    # Offline only a cached (downloaded) copy can be read; online, stream so that a corpus of
    # terabytes costs nothing beyond the tokens actually packed.
    ds = datasets.load_dataset(source.hf_name, source.hf_config, split=source.hf_split,
                               streaming=not offline)
    for n, record in enumerate(ds):
        text = record.get(source.text_field)
        if not isinstance(text, str):
            raise DataError(f"record {n} of hf:{source.hf_name} has no string field "
                            f"{source.text_field!r} (fields: {sorted(record)})")
        if text.strip():
            yield text, True


def tokenizer_hash(tokenizer) -> str:
    """Identifies the token ids a tokenizer produces (vocabulary, class, special tokens)."""
    h = hashlib.sha256(type(tokenizer).__name__.encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(f"{tokenizer.eos_token_id}".encode())
    return h.hexdigest()


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32


def pack(data, tokenizer, out_dir, seq_len: int, *, max_sequences: int | None = None,
         shard_tokens: int = DEFAULT_SHARD_TOKENS, overwrite: bool = False,
         progress: bool = True) -> "PackedDataset":
    """Tokenize ``data`` (anything ``resolve_source`` takes) and pack it into ``out_dir``.

    seq_len: tokens per sequence; max_sequences: stop after this many (needed for streamed
    datasets); shard_tokens: tokens per shard file (rounded down to whole sequences).
    The directory appears only when complete (written beside it, then renamed)."""
    if seq_len < 2:
        raise DataError(f"seq_len must be at least 2 (one input and one target), got {seq_len}")
    if max_sequences is not None and max_sequences < 1:
        raise DataError(f"max_sequences must be positive, got {max_sequences}")
    source = resolve_source(data)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True (--overwrite) to replace it")
    if source.needs_limit and max_sequences is None:
        what = (f"hf:{source.hf_name}: a streamed dataset may never end" if source.hf_name else
                "text mixed in at fraction 1: its documents repeat without end")
        raise DataError(f"packing {what}; give a limit (max_sequences / --max-tokens)")
    eos = tokenizer.eos_token_id
    vocab = len(tokenizer)
    dtype = token_dtype(vocab)
    per_shard = max(1, shard_tokens // seq_len)
    with staged_directory(out_dir) as tmp:
        writer = _ShardWriter(tmp, seq_len, dtype, per_shard, max_sequences)
        bar = _bar(progress, max_sequences, f"packing {source.description}")
        for ids in _token_stream(source, tokenizer, eos):
            if ids.size and int(ids.max()) >= vocab:
                raise DataError(f"the tokenizer produced id {int(ids.max())} >= its vocabulary "
                                f"size {vocab}")
            before = writer.sequences
            done = writer.add(ids)
            if bar is not None:
                bar.update(writer.sequences - before)
            if done:
                break
        writer.close()
        if bar is not None:
            bar.close()
        if writer.sequences == 0:
            raise DataError(f"data {source.description} has {writer.tokens_seen} tokens, fewer "
                            f"than one sequence of seq_len {seq_len}")
        index = {
            "format": FORMAT, "version": FORMAT_VERSION, "seq_len": seq_len,
            "dtype": np.dtype(dtype).name, "vocab_size": vocab, "eos_token_id": eos,
            "tokenizer": getattr(tokenizer, "name_or_path", ""),
            "tokenizer_hash": tokenizer_hash(tokenizer), "source": source.description,
            "source_fingerprint": source.fingerprint(), "max_sequences": max_sequences,
            "sequences": writer.sequences, "tokens": writer.sequences * seq_len,
            "dropped_tokens": writer.tokens_seen - writer.sequences * seq_len,
            "shards": writer.shards,
        }
        (tmp / INDEX).write_text(json.dumps(index, indent=2))
    return PackedDataset(out_dir)


def _bar(progress: bool, total, desc):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="seq", dynamic_ncols=True)


def _token_stream(source: TextSource, tokenizer, eos):
    """Token id arrays in document order, EOS after each document (mixed as the source says)."""
    pieces = (_mixed_pieces(source, tokenizer, eos) if source.mix_in is not None
              else _token_pieces(source, tokenizer, eos))
    for ids, _ in pieces:
        yield ids


def _mixed_pieces(source: TextSource, tokenizer, eos):
    """(ids, ends_document) of ``source`` with ``source.mix_in``'s documents interleaved between
    whole documents, so that the mixed-in share of the tokens so far stays at ``mix_fraction``;
    the mixed-in documents start over whenever they run out."""
    fraction = source.mix_fraction
    base = _token_pieces(replace(source, mix_in=None, mix_fraction=0.0), tokenizer, eos)
    extra, extra_yielded = None, False
    base_tokens = extra_tokens = 0
    in_base_document = False
    while True:
        if not in_base_document and extra_tokens <= fraction * (base_tokens + extra_tokens):
            if extra is None:
                extra, extra_yielded = _token_pieces(source.mix_in, tokenizer, eos), False
            piece = next(extra, None)
            if piece is None:
                if not extra_yielded:
                    raise DataError(f"the mixed-in data {source.mix_in.description} has no "
                                    "tokens")
                extra = None
                continue
            extra_yielded = True
            extra_tokens += piece[0].size
        else:
            piece = next(base, None)
            if piece is None:
                return
            base_tokens += piece[0].size
            in_base_document = not piece[1]
        yield piece


def _token_pieces(source: TextSource, tokenizer, eos):
    """(token ids, ends_document) of every piece of ``source``'s documents, in order, EOS after
    each document."""
    batch, ends = [], []

    def flush():
        encoded = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        for ids, end in zip(encoded, ends):
            if end and eos is not None:
                ids = ids + [eos]
            yield np.asarray(ids, dtype=np.int64), end

    for text, end in iter_documents(source):
        batch.append(text)
        ends.append(end)
        if len(batch) == TOKENIZE_BATCH:
            yield from flush()
            batch, ends = [], []
    if batch:
        yield from flush()


class _ShardWriter:
    def __init__(self, root: Path, seq_len, dtype, per_shard, max_sequences):
        self.root, self.seq_len, self.dtype = root, seq_len, dtype
        self.per_shard, self.max_sequences = per_shard, max_sequences
        self.pending: list[np.ndarray] = []
        self.pending_len = 0
        self.sequences = 0
        self.tokens_seen = 0
        self.shards: list[dict] = []
        self.fh = None

    def add(self, ids: np.ndarray) -> bool:
        """Buffer ``ids``; write whole sequences; True once max_sequences are written."""
        self.tokens_seen += ids.size
        self.pending.append(ids)
        self.pending_len += ids.size
        if self.pending_len < self.seq_len:
            return False
        flat = np.concatenate(self.pending)
        n = flat.size // self.seq_len
        if self.max_sequences is not None:
            n = min(n, self.max_sequences - self.sequences)
        self._write(flat[:n * self.seq_len].reshape(n, self.seq_len))
        rest = flat[n * self.seq_len:]
        self.pending, self.pending_len = [rest], rest.size
        return self.max_sequences is not None and self.sequences >= self.max_sequences

    def _write(self, rows: np.ndarray):
        while len(rows):
            if self.fh is None or self.shards[-1]["sequences"] == self.per_shard:
                self._open()
            room = self.per_shard - self.shards[-1]["sequences"]
            chunk, rows = rows[:room], rows[room:]
            self.fh.write(chunk.astype(self.dtype).tobytes())
            self.shards[-1]["sequences"] += len(chunk)
            self.sequences += len(chunk)

    def _open(self):
        if self.fh is not None:
            self.fh.close()
        name = f"shard_{len(self.shards):05d}.bin"
        self.fh = open(self.root / name, "wb")
        self.shards.append({"file": name, "sequences": 0})

    def close(self):
        if self.fh is not None:
            self.fh.close()
            self.fh = None


def is_packed(path) -> bool:
    path = Path(path)
    if not (path / INDEX).is_file():
        return False
    try:
        return json.loads((path / INDEX).read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


class PackedDataset:
    """Read-only view of a packed directory: ``ds[i]`` is sequence i as a numpy array (a slice
    of a memory map: only the pages touched are read)."""

    def __init__(self, path):
        self.path = Path(path)
        file = self.path / INDEX
        if not file.is_file():
            raise DataError(f"{self.path} is not a packed dataset (no {INDEX})")
        try:
            index = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{file} is not valid JSON: {exc}") from None
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise DataError(f"{file} is not an {FORMAT} index")
        if index.get("version", 0) > FORMAT_VERSION:
            raise DataError(f"{file} was written by a newer mla_ext (version {index['version']})")
        self.index = index
        self.seq_len = int(index["seq_len"])
        self.dtype = np.dtype(index["dtype"])
        self._maps: dict[int, np.memmap] = {}
        self._starts = []
        total = 0
        for shard in index["shards"]:
            f = self.path / shard["file"]
            expected = shard["sequences"] * self.seq_len * self.dtype.itemsize
            if not f.is_file() or f.stat().st_size != expected:
                size = f.stat().st_size if f.is_file() else "missing"
                raise DataError(f"packed shard {f} is corrupt or incomplete (size {size}, "
                                f"index says {expected} bytes)")
            self._starts.append(total)
            total += shard["sequences"]
        if total != index["sequences"] or total == 0:
            raise DataError(f"{file} lists {total} sequences in its shards but says "
                            f"{index['sequences']}")
        self._len = total

    def __len__(self) -> int:
        return self._len

    def _map(self, shard: int) -> np.memmap:
        if shard not in self._maps:
            info = self.index["shards"][shard]
            self._maps[shard] = np.memmap(self.path / info["file"], dtype=self.dtype, mode="r",
                                          shape=(info["sequences"], self.seq_len))
        return self._maps[shard]

    def __getitem__(self, i: int) -> np.ndarray:
        if not -self._len <= i < self._len:
            raise IndexError(f"sequence {i} out of range for {self._len} sequences")
        i %= self._len
        shard = int(np.searchsorted(self._starts, i, side="right")) - 1
        return self._map(shard)[i - self._starts[shard]]

    def batch(self, indices) -> torch.Tensor:
        """(len(indices), seq_len) int64 tensor of the given sequences."""
        return torch.from_numpy(np.stack([self[int(i)] for i in indices]).astype(np.int64))


class GlobalOrder:
    """The order in which a run visits the sequences: a fresh seeded permutation per epoch,
    indexed by global position, so any position (a resume point) is reached without replay."""

    def __init__(self, num_sequences: int, seed: int):
        self.n, self.seed = num_sequences, seed
        self._epoch, self._perm = -1, None

    def __getitem__(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch != self._epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n)
            self._epoch = epoch
        return int(self._perm[offset])

    def micro_batch(self, step: int, micro: int, batch_size: int, micro_batches: int) -> list[int]:
        """Sequence ids of micro-batch ``micro`` (0 .. micro_batches-1) of optimizer step
        ``step``; the step's global batch is the ``batch_size * micro_batches`` consecutive
        positions starting at ``step * batch_size * micro_batches``."""
        start = (step * micro_batches + micro) * batch_size
        return [self[p] for p in range(start, start + batch_size)]
