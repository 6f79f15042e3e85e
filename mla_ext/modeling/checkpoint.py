"""Self-contained checkpoints of converted models: config.json (with the MLA settings),
model.safetensors (rope_pairs included) and the tokenizer. Loading rebuilds the causal-LM class
of the config's family (its ``model_type``, mla_ext/families.py).

Writing goes to a temporary sibling directory that is renamed into place only when complete,
so a failure never leaves a half-written checkpoint at ``path``.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError
from safetensors.torch import load_file, save_model
from transformers import AutoTokenizer
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .. import families
from ..checks import require_float_dtype, require_model, require_path
from ..staging import staged_directory
from .cache import mla_layers
from .patch import CONFIG_KEY, build_mla_structure

# 2: a layer may store its cache format and a shared RoPE key (rope_heads, nope_dim); version 1
# checkpoints (neither) read as before
FORMAT_VERSION = 2
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def _tied_names(model) -> dict[str, str]:
    """{input embedding weight name: output embedding weight name} and the reverse (the file
    of a model with tied embeddings holds one of the two)."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    if inp is None or out is None:
        return {}
    params = list(model.named_parameters(remove_duplicate=False))
    a = next(n for n, p in params if p is inp.weight)
    b = next(n for n, p in params if p is out.weight)
    return {a: b, b: a} if a != b else {}


class CheckpointError(ValueError):
    """A directory that is not a readable mla_ext checkpoint."""


def save_pretrained(model, path, tokenizer=None, overwrite: bool = False) -> Path:
    """Write a converted model (and optionally its tokenizer) to the directory ``path``.

    Refuses to replace an existing directory unless ``overwrite``, and even then replaces only
    an mla_ext checkpoint or an empty directory; the replacement is atomic.
    """
    require_model(model)
    require_path(path)
    mla_layers(model)  # ValueError for an unconverted model
    settings = getattr(model.config, CONFIG_KEY, None)
    if not settings:
        raise ValueError(f"model.config has no {CONFIG_KEY!r} settings: convert it with "
                         "mla_ext.convert_to_mla or load it with mla_ext.load_pretrained")
    path = check_destination(path, overwrite)
    with staged_directory(path) as tmp:
        config = model.config.to_dict()
        config[CONFIG_KEY] = {**settings, "format_version": FORMAT_VERSION}
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, default=str))
        save_model(model, str(tmp / WEIGHTS), metadata={"format": "pt", "mla_ext": "1"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return path


def check_destination(path, overwrite: bool = False, name: str | None = None,
                      overwrite_flag: str = "overwrite=True") -> Path:
    """Check, before any work, that a checkpoint can be written to ``path``: nothing there, or
    (with ``overwrite``) an mla_ext checkpoint or an empty directory, in a directory this
    process can write in. The errors name ``path`` as ``name`` (a command's option, say) and
    the flag that allows replacing it as ``overwrite_flag``."""
    path = Path(path)
    label = f"{name} {path}" if name else str(path)
    if path.is_symlink() or path.exists():
        if path.is_symlink() or not path.is_dir():
            raise FileExistsError(f"{label} exists and is not a directory; not replacing it")
        if any(path.iterdir()):
            try:
                read_config(path)
            except CheckpointError:
                raise FileExistsError(f"{label} is a directory but not an mla_ext checkpoint; "
                                      f"not replacing it ({overwrite_flag} replaces only a "
                                      "checkpoint or an empty directory)") from None
        if not overwrite:
            raise FileExistsError(f"{label} exists; pass {overwrite_flag} to replace it")
    parent = path.parent
    while not parent.exists():  # the missing ones are created in the nearest existing one
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{label}: {parent} is not a directory")
    try:  # the one sure test of writing there (permissions, ACLs, read-only file systems)
        os.rmdir(tempfile.mkdtemp(prefix=".mla_ext-write-test.", dir=parent))
    except OSError as exc:
        raise PermissionError(f"{label}: cannot write in {parent} ({exc.strerror})") from None
    return path


def read_config(path) -> dict:
    """The config.json of an mla_ext checkpoint; CheckpointError for anything else."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory")
    file = path / CONFIG
    if not file.is_file():
        raise CheckpointError(f"{path} has no {CONFIG}: not a model checkpoint")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file} is not valid JSON: {exc}") from exc
    settings = config.get(CONFIG_KEY) if isinstance(config, dict) else None
    if not isinstance(settings, dict) or "layers" not in settings:
        raise CheckpointError(f"{path} is not an mla_ext checkpoint (its {CONFIG} has no "
                              f"{CONFIG_KEY!r} section); convert the model first")
    if settings.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} was written by a newer mla_ext (format "
                              f"{settings['format_version']} > {FORMAT_VERSION})")
    return config


def load_pretrained(path, dtype: torch.dtype | None = None, device=None,
                    return_tokenizer: bool = False):
    """Rebuild a converted model saved by ``save_pretrained``.

    dtype: parameter dtype (default: the saved one); device: where to put it (default CPU).
    With ``return_tokenizer`` returns (model, tokenizer), the tokenizer None if none was saved.
    """
    require_path(path)
    if dtype is not None:
        require_float_dtype(dtype)
    path = Path(path)
    config_dict = read_config(path)
    settings = config_dict.pop(CONFIG_KEY)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{path} has no {WEIGHTS}")
    # Checkpoints name their family by the config's model_type (those before it: Llama).
    model_type = config_dict.get("model_type") or "llama"
    family = families.family_for_config({"model_type": model_type})
    if family is None:
        raise CheckpointError(f"{path / CONFIG} has model_type {model_type!r}; mla_ext loads "
                              f"{', '.join(t for f in families.FAMILIES for t in f.model_types)}")
    try:
        config = CONFIG_MAPPING[model_type].from_dict(config_dict)
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path / CONFIG} is not a {model_type} config: {exc}") from exc
    # Parameters on the meta device, buffers real: the non-persistent ones (the rotary
    # inv_freq, Gemma's embedding scale) are not in the file and keep their constructed values.
    with init_empty_weights(include_buffers=False):
        model = family.causal_lm_class(config)
        build_mla_structure(model, settings["layers"])
    try:
        state = load_file(str(weights), device=str(device or "cpu"))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise CheckpointError(f"cannot read {weights}: {exc}") from exc
    tied = _tied_names(model) if config.tie_word_embeddings else {}
    for name, partner in tied.items():
        if name not in state and partner in state:
            state[name] = state[partner]
    try:
        missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{weights} does not match its config: {exc}") from exc
    if missing or unexpected:
        missing, unexpected = sorted(missing), sorted(unexpected)
        raise CheckpointError(f"{weights} does not match its config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.to(device or "cpu")
    if dtype is not None:
        model.to(dtype)
    setattr(model.config, CONFIG_KEY, settings)
    model.eval()
    if not return_tokenizer:
        return model
    tokenizer = None
    if (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
