"""Type checks of the public functions' arguments, each raising a TypeError that names the
argument, so that a wrong type fails at the call and not deep inside with another message."""
from __future__ import annotations

import os

import torch


def require_model(value, name: str = "model") -> None:
    if not isinstance(value, torch.nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module (a transformers causal LM), got "
                        f"{type(value).__name__}")


def require_path(value, name: str = "path") -> None:
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a str or os.PathLike, got {type(value).__name__}")
    if not os.fspath(value).strip():
        raise ValueError(f"{name} is empty (give a directory)")


def require_float_dtype(value, name: str = "dtype") -> None:
    if not (isinstance(value, torch.dtype) and value.is_floating_point):
        raise TypeError(f"{name} must be a floating torch.dtype such as torch.bfloat16, got "
                        f"{value!r}")
