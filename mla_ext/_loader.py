"""Loads the compiled extension once; its import registers torch.ops.mla_ext.*."""
from __future__ import annotations

import importlib

import torch  # noqa: F401  (loads libc10 and libtorch, which _C links against)

_state = {"module": None}


def load_extension():
    """Import mla_ext._C, or raise an ImportError that says how to build it."""
    if _state["module"] is None:
        try:
            _state["module"] = importlib.import_module("mla_ext._C")
        except ImportError as exc:
            raise ImportError(
                "mla_ext._C is not built or does not match this torch: run "
                "`pip install --no-build-isolation -e .` in the mla_ext checkout "
                f"(MLA_EXT_CPU_ONLY=1 for a CPU-only build). Cause: {exc}") from exc
    return _state["module"]


def built_with_cuda() -> bool:
    """Whether the CUDA kernels were compiled into this build."""
    return bool(load_extension().with_cuda)
