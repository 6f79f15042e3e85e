"""Chat text for recovery fine-tuning: an instruct model's own answers to questions about the
default corpus, generated once and cached.

Recovery on documentation alone teaches a converted instruct model to continue documents, and it
stops answering chat prompts. Mixed into the corpus (``data.mix_sources``), conversations in the
model's chat template, answered by the original model itself, keep the converted one an
assistant: their next-token targets are the original's own greedy answers.

- ``corpus_prompts(n)``: ``n`` questions built from the default training corpus (never from the
  held-out text): each calibration topic of ``pydoc_data.topics`` is asked to be explained or
  summarised, and each public function and class with a docstring in the standard library's
  top-level modules to be explained or used in an example; a seeded shuffle picks ``n``.
- ``chat_data(model, tokenizer, prompts)``: the model's greedy answers (``eval.chat_answers``,
  batched), each conversation rendered by the tokenizer's chat template, cached as a JSONL file
  (field ``text``, plus ``prompt`` and ``answer``) under a key of the model's weights and config,
  the tokenizer and its template, the prompts and the generation settings: a second call with
  the same inputs reads the file instead of generating.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import default_calibration_topics
from .data import DataError, TextSource, default_corpus_files, resolve_source, tokenizer_hash

FORMAT = "mla_ext.chat"
FORMAT_VERSION = 1
DEFAULT_PROMPTS = 1024
DEFAULT_MAX_NEW_TOKENS = 128
DEFAULT_BATCH_SIZE = 32
PROMPT_SEED = 0
# a summarised passage is cut at the last sentence end before this many characters
PASSAGE_CHARS = 600
CACHE_ENV = "MLA_EXT_CACHE_DIR"


def default_cache_dir() -> Path:
    """Where chat data is cached: $MLA_EXT_CACHE_DIR/chat, else $XDG_CACHE_HOME/mla_ext/chat
    (~/.cache/mla_ext/chat)."""
    root = os.environ.get(CACHE_ENV)
    if root:
        return Path(root) / "chat"
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg) / "mla_ext" / "chat"


@functools.lru_cache(maxsize=1)
def _topic_prompts() -> tuple[str, ...]:
    prompts = []
    for topic in default_calibration_topics():
        title, _, body = topic.partition("\n")
        title = title.strip()
        body = "\n".join(ln for ln in body.splitlines()
                         if not re.fullmatch(r"\s*[*=\-]+\s*", ln))
        paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", body) if p.strip()]
        passage = paragraphs[0] if paragraphs else ""
        if len(passage) > PASSAGE_CHARS:
            cut = passage.rfind(". ", 0, PASSAGE_CHARS)
            passage = passage[:cut + 1] if cut > 0 else passage[:PASSAGE_CHARS]
        prompts.append(f"Explain {title[:1].lower()}{title[1:]} in Python, in a few sentences.")
        if passage:
            prompts.append("Summarize this passage from the Python documentation in two "
                           f"sentences:\n\n{passage}")
    return tuple(prompts)


@functools.lru_cache(maxsize=1)
def _module_prompts() -> tuple[str, ...]:
    prompts = []
    for path in default_corpus_files():
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = path.stem
        if module.startswith("_"):
            continue
        if ast.get_docstring(tree):
            prompts.append(f"What is the Python module `{module}` used for?")
        for node in tree.body:
            if not isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) \
                    or node.name.startswith("_") or not ast.get_docstring(node):
                continue
            if isinstance(node, ast.ClassDef):
                prompts.append(f"What is the class `{module}.{node.name}` for?")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                prompts.append(f"Explain what `{module}.{node.name}` does.")
                prompts.append(f"Write a short Python example that uses `{module}.{node.name}`.")
    return tuple(prompts)


def corpus_prompts(n: int = DEFAULT_PROMPTS, seed: int = PROMPT_SEED) -> list[str]:
    """``n`` distinct questions about the default corpus (module docstring), seeded."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of chat prompts must be a positive int, got {n!r}")
    rng = random.Random(seed)
    topics, modules = list(_topic_prompts()), list(_module_prompts())
    rng.shuffle(topics)
    rng.shuffle(modules)
    # the fewer documentation topics alternate with the module questions, so that a small set
    # holds both kinds
    paired = [p for pair in zip(topics, modules) for p in pair]
    rest = topics[len(paired) // 2:] + modules[len(paired) // 2:]
    candidates = list(dict.fromkeys(paired + rest))
    if n > len(candidates):
        raise ValueError(f"{n} chat prompts asked for; the default corpus yields "
                         f"{len(candidates)}")
    return candidates[:n]


def format_chat(tokenizer, prompt: str, answer: str) -> str:
    """One user message and the assistant's answer, as the tokenizer's chat template renders
    them (the same text the model sees when it answers, followed by the answer)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template: chat data needs an instruct "
                         "model's tokenizer")
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}],
        tokenize=False)


def weights_digest(model) -> str:
    """SHA-256 of the model's parameters and buffers (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            t = t.detach().contiguous()
            h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\n".encode())
            h.update(t.view(-1).view(torch.uint8).cpu().numpy().tobytes())
    return h.hexdigest()


def cache_key(model, tokenizer, prompts: list[str], max_new_tokens: int) -> str:
    """Names the chat data of this model, tokenizer, prompt set and generation settings."""
    from ..eval import stop_token_ids

    settings = {"format": FORMAT, "version": FORMAT_VERSION, "weights": weights_digest(model),
                "config": model.config.to_json_string(use_diff=False),
                "tokenizer": tokenizer_hash(tokenizer),
                "chat_template": tokenizer.chat_template,
                "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
                "max_new_tokens": max_new_tokens, "decoding": "greedy",
                "stop": stop_token_ids(model, tokenizer)}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


@dataclass
class ChatData:
    """Cached chat data: the JSONL ``path`` (fields text, prompt, answer) and its records;
    ``from_cache`` tells whether it was read rather than generated by this call."""
    path: Path
    records: list[dict]
    from_cache: bool

    def source(self) -> TextSource:
        """The conversations as training text (``mix_sources`` takes it)."""
        source = resolve_source(self.path)
        source.description = f"{len(self.records)} chat answers ({self.path.name})"
        return source


def _read_cached(path: Path, prompts: list[str]) -> list[dict] | None:
    """The records of a complete cache file for ``prompts``; None if absent or damaged."""
    if not path.is_file():
        return None
    try:
        records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if [r.get("prompt") if isinstance(r, dict) else None for r in records] != prompts \
            or not all(isinstance(r.get("text"), str) and isinstance(r.get("answer"), str)
                       for r in records):
        return None
    return records


def chat_data(model, tokenizer, prompts, *, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
              batch_size: int = DEFAULT_BATCH_SIZE, cache_dir=None,
              progress: bool = True) -> ChatData:
    """The greedy answers of ``model`` to ``prompts`` as chat-formatted documents, from the
    cache in ``cache_dir`` (default ``default_cache_dir()``) when it holds them, else generated
    (batched, on the model's device) and cached. A damaged cache file is regenerated."""
    from ..eval import chat_answers

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty strings")
    for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    format_chat(tokenizer, prompts[0], "")  # no chat template: fail before generating
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if cache.exists() and not cache.is_dir():
        raise DataError(f"chat cache {cache} exists and is not a directory")
    key = cache_key(model, tokenizer, prompts, max_new_tokens)
    path = cache / f"chat-{key[:24]}.jsonl"
    records = _read_cached(path, prompts)
    if records is not None:
        return ChatData(path, records, from_cache=True)
    answers = chat_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                           batch_size=batch_size, progress=progress)
    records = [{"text": format_chat(tokenizer, p, a), "prompt": p, "answer": a}
               for p, a in zip(prompts, answers)]
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    # a file that is there and complete (another process's identical answers) is kept, so that
    # a data fingerprint taken from it stays valid; a damaged one is replaced
    if _read_cached(path, prompts) is None:
        tmp.replace(path)
    else:
        tmp.unlink()
    return ChatData(path, _read_cached(path, prompts), from_cache=False)
