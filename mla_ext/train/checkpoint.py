"""Training checkpoints: everything an exact resume needs.

``<out>/checkpoints/step_00000042/`` holds
- ``model.pt``: the full model state dict (gathered from all ranks under FSDP);
- ``optimizer.pt``: the full optimizer state, keyed by parameter name (so it survives a
  change of wrapper: none, DDP, FSDP);
- ``rng_rank<r>.pt``: each process's Python, NumPy, torch and CUDA generator states;
- ``state.json``: step, tokens, scheduler state, the model's signature, the training settings
  that must not change across a resume, the data's signature;
- ``manifest.json``, written last: size and SHA-256 of every other file.

A checkpoint is written under a hidden temporary name and renamed when complete, so a crash
mid-write leaves the previous checkpoint as the latest; the manifest catches later damage.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from ..modeling.checkpoint import CheckpointError

CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
STATE = "state.json"
MODEL = "model.pt"
OPTIMIZER = "optimizer.pt"
STEP_DIR = re.compile(r"^step_(\d+)$")
# Settings that change what an optimizer step computes: a resume must use the same values.
RESUME_INVARIANTS = ("steps", "seq_len", "global_batch", "lr", "warmup", "decay", "weight_decay",
                     "betas", "eps", "clip", "train_only", "seed", "distill")
# Settings that checkpoints of older versions lack, with the value those runs used.
RESUME_DEFAULTS = {"distill": 0.0}
# Config entries that fix the shapes and the math of the network (not its dtype or its name).
MODEL_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
              "max_position_embeddings", "rms_norm_eps", "rope_parameters", "rope_scaling",
              "rope_theta", "tie_word_embeddings", "attention_bias", "mlp_bias", "mla_ext")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def model_signature(model) -> dict:
    """What a checkpoint must share with the model it is loaded into: the structural config
    entries and every parameter's shape. Takes the unwrapped model (names without ``module.``)."""
    config = model.config.to_dict()
    sig = {k: config[k] for k in MODEL_KEYS if k in config}
    sig["parameters"] = {name: list(p.shape) for name, p in model.named_parameters()}
    return json.loads(json.dumps(sig, default=str))


def signature_differences(saved: dict, current: dict, limit: int = 5) -> list[str]:
    diffs = []
    for key in sorted(set(saved) | set(current)):
        if key == "parameters":
            continue
        if saved.get(key) != current.get(key):
            diffs.append(f"{key}: checkpoint {saved.get(key)!r}, model {current.get(key)!r}")
    sp, cp = saved.get("parameters", {}), current.get("parameters", {})
    for name in sorted(set(sp) | set(cp)):
        if sp.get(name) != cp.get(name):
            diffs.append(f"parameter {name}: checkpoint {sp.get(name)}, model {cp.get(name)}")
    return diffs[:limit]


def list_checkpoints(out_dir) -> list[Path]:
    """Complete checkpoints under ``out_dir``, oldest first."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_DIR.match(p.name)) and (p / MANIFEST).is_file()]
    return [p for _, p in sorted(found)]


def find_checkpoint(out_dir, resume: str) -> Path:
    """The checkpoint ``resume`` names: "latest" (in ``out_dir``) or a checkpoint directory."""
    if resume == "latest":
        found = list_checkpoints(out_dir)
        if not found:
            raise CheckpointError(f"resume: no complete checkpoint under "
                                  f"{Path(out_dir) / CHECKPOINTS}")
        return found[-1]
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"resume checkpoint {path} is not a directory")
    return path


def verify(path: Path) -> dict:
    """Check every file against the manifest; return state.json. CheckpointError names the
    damaged file."""
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise CheckpointError(f"resume checkpoint {path} is incomplete or not a training "
                              f"checkpoint (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_file.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"resume checkpoint {manifest_file} is corrupt: {exc}") from None
    for name, info in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"resume checkpoint {path} is missing {name}")
        if f.stat().st_size != info["size"] or _sha256(f) != info["sha256"]:
            raise CheckpointError(f"resume checkpoint file {f} is corrupt (its size or checksum "
                                  "differs from the manifest)")
    try:
        return json.loads((path / STATE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"resume checkpoint {path / STATE} is unreadable: {exc}") from None


def check_compatible(state: dict, path: Path, model_sig: dict, settings: dict,
                     data_signature: str) -> None:
    """CheckpointError unless the checkpoint was written for this model, these settings and
    this data."""
    diffs = signature_differences(state["model"], model_sig)
    if diffs:
        raise CheckpointError(f"resume checkpoint {path} belongs to another model: "
                              + "; ".join(diffs))
    changed = [f"{k}: checkpoint {state['settings'].get(k)!r}, now {settings.get(k)!r}"
               for k in RESUME_INVARIANTS
               if state["settings"].get(k, RESUME_DEFAULTS.get(k)) != settings.get(k)]
    if changed:
        raise CheckpointError(f"resume checkpoint {path} was trained with other settings "
                              f"(an exact resume needs the same): " + "; ".join(changed))
    if state["data_signature"] != data_signature:
        raise CheckpointError(f"resume checkpoint {path} was trained on other data (or another "
                              "tokenizer or packing); resume with the same --data")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def rng_state() -> dict:
    """This process's generator states in a form ``torch.load(weights_only=True)`` accepts."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                       "has_gauss": has_gauss, "gauss": gauss},
             "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_manifest_and_publish(tmp: Path, final: Path) -> Path:
    """Seal a fully written temporary checkpoint directory and move it into place."""
    files = {f.name: {"size": f.stat().st_size, "sha256": _sha256(f)}
             for f in sorted(tmp.iterdir()) if f.is_file()}
    (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=2))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def prune(out_dir, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (keep 0 keeps all), and what
    crashed writes left behind. Call it only while no checkpoint is being written."""
    if keep > 0:
        for old in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    for leftover in (Path(out_dir) / CHECKPOINTS).glob(".step_*.tmp"):
        shutil.rmtree(leftover, ignore_errors=True)


def temp_dir(out_dir, step: int) -> Path:
    """The hidden directory a checkpoint is written into; any leftover of a crash is removed."""
    root = Path(out_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{step_dir_name(step)}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def load_tensors(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # torch raises many types for damaged files; all mean "corrupt"
        raise CheckpointError(f"resume checkpoint file {path} cannot be read: {exc}") from None
