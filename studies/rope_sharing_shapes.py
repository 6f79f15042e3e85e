"""What the shared RoPE key (``rope_sharing``, section 2.5 of ARCHITECTURE) buys on 7B-shaped
models with random weights, next to the trained default model (SmolLM2-135M-Instruct).

Models: a Llama-2-7B-shaped model (hidden 4096, 32 heads, 32 KV heads, head_dim 128,
intermediate 11008) and a Llama-3-8B-shaped one (8 KV heads, intermediate 14336, rope_theta
500000), each with ``--layers`` decoder layers, HF's default initialisation under a fixed seed
and the default tokenizer's vocabulary; and the default model itself, all its layers.

For each model the default conversion's split search (``MLAConfig()``'s strategy, SVD, RoPE
correction, cache formats and both sharings; ``--rope-pair-step`` its RoPE grid) scores every
candidate of every layer on the default calibration text (``mla_ext.calibrate``, its first two
sequences scored, as the conversion does). At each budget (-81.25 % and -87.5 % of the bf16 K/V
cache: 144 and 96 bytes per token and layer for SmolLM2) the candidates are then limited to
per-head RoPE keys, to the shared key, or left free (auto, what the conversion searches), and
each set gives
  - per layer, the least error of a candidate within the layer's share of the budget;
  - the conversion's choice over the layers (``choose_splits``): each layer's pick and error.
The error is the search's: the squared change of the layer's attention output over the squared
residual stream. Ratios are auto or shared over per-head (below 1: the shared key helps).

The defaults (one layer, ``rope_pair_step=8``, 4 x 128 calibration tokens) bound the search's
cost: at the default step 1 it factors 48 RoPE keys per layer, each a float64 SVD of up to
8192 x 4096 for the Llama-2 shape (30-50 s on a 2-core CPU); the default run takes about 35
minutes there, most of it the Llama-2 shape.

    OMP_NUM_THREADS=2 python studies/rope_sharing_shapes.py \\
        --out studies/results/rope_sharing_shapes_cpu.json
    python studies/rope_sharing_shapes.py --tiny --models llama2-7b   # small shapes, seconds
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import metadata  # noqa: E402

from studies import RESULTS  # noqa: E402
from mla_ext.train.cli import positive_int  # noqa: E402

DEFAULT_JSON = RESULTS / "rope_sharing_shapes.json"
RATIOS = (0.1875, 0.125)   # -81.25 %, -87.5 % of the bf16 K/V cache
MODES = ("per-head", "shared", "auto")
SEED = 0
SHAPES = {
    "llama2-7b": dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32,
                      head_dim=128, intermediate_size=11008, rope_theta=10000.0,
                      max_position_embeddings=4096, rms_norm_eps=1e-5),
    "llama3-8b": dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, intermediate_size=14336, rope_theta=500000.0,
                      max_position_embeddings=8192, rms_norm_eps=1e-5),
}
# --tiny: the same head layouts (all KV heads / 4 query heads per KV head) at test sizes
TINY = {"llama2-7b": dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=4,
                          head_dim=32, intermediate_size=256),
        "llama3-8b": dict(hidden_size=128, num_attention_heads=8, num_key_value_heads=2,
                          head_dim=32, intermediate_size=256)}
MODELS = (*SHAPES, "default")


def random_model(name: str, layers: int, vocab_size: int, tiny: bool):
    """The ``name``-shaped LlamaForCausalLM with HF's default initialisation (seed ``SEED``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = {**SHAPES[name], **(TINY[name] if tiny else {})}
    torch.manual_seed(SEED)
    config = LlamaConfig(vocab_size=vocab_size, num_hidden_layers=layers, **shape)
    return LlamaForCausalLM(config).eval()


def _sharing(cand) -> str:
    return "shared" if cand.rope_heads == 1 else "per-head"


def _pick(cand) -> dict:
    return {"error": cand.error, "cost": cand.cost, "sharing": _sharing(cand),
            "rope_pairs": cand.rope_pairs, "latent_dim": cand.latent_dim,
            "format": cand.cache_format.spec if cand.cache_format else None}


def _mean(values) -> float:
    return sum(values) / len(values)


def compare(model, candidates, ratio: float, pair_step: int) -> dict:
    """Per-head, shared and auto at the budget ``ratio`` from the search's ``candidates``
    (measured at the widest budget: a narrower one searches those within its max_cost, errors
    unchanged)."""
    from mla_ext import MLAConfig
    from mla_ext.convert.budget import choose_splits
    from mla_ext.modeling.patch import cache_budget

    budget, max_cost = cache_budget(model, MLAConfig(cache_ratio=ratio, rope_pair_step=pair_step))
    per_layer = budget / len(candidates)
    out = {"budget": budget, "bytes_per_layer": per_layer, "max_cost": max_cost}
    for mode in MODES:
        sets = [[c for c in layer if c.cost <= max_cost and mode in ("auto", _sharing(c))]
                for layer in candidates]
        within = [[c for c in layer if c.cost <= per_layer] for layer in sets]
        if not all(within):
            raise ValueError(f"no {mode} candidate fits a layer's {per_layer:.0f} bytes: lower "
                             "--rope-pair-step")
        best = [min(layer, key=lambda c: c.error) for layer in within]
        chosen = choose_splits(sets, budget)
        out[mode] = {"layer_budget": [_pick(c) for c in best],
                     "chosen": [_pick(c) for c in chosen],
                     "chosen_error": sum(c.error for c in chosen)}
    for mode in ("shared", "auto"):
        out[f"{mode}_over_per_head"] = {
            "layer_budget_mean": _mean([a["error"] / b["error"] for a, b in zip(
                out[mode]["layer_budget"], out["per-head"]["layer_budget"])]),
            "chosen_total": out[mode]["chosen_error"] / out["per-head"]["chosen_error"]}
    return out


def study_model(name: str, model, tokenizer, args) -> dict:
    import mla_ext
    from mla_ext import MLAConfig
    from mla_ext.modeling.patch import split_search

    start = time.time()
    config = MLAConfig(cache_ratio=max(RATIOS), rope_pair_step=args.rope_pair_step)
    calib = mla_ext.calibrate(model, tokenizer, mla_ext.default_calibration_text(),
                              max_length=args.calib_length, max_sequences=args.calib_sequences,
                              progress=False, **config.calibration_options())
    print(f"{name}: calibrated in {time.time() - start:.0f} s; searching ...", flush=True)
    candidates = split_search(model, config, calib)
    cfg = model.config
    row = {"model": name, "layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
           "heads": cfg.num_attention_heads, "kv_heads": cfg.num_key_value_heads,
           "head_dim": getattr(cfg, "head_dim", cfg.hidden_size // cfg.num_attention_heads),
           "candidates_per_layer": _mean([len(layer) for layer in candidates]),
           "budgets": {str(ratio): compare(model, candidates, ratio, args.rope_pair_step)
                       for ratio in RATIOS},
           "seconds": round(time.time() - start, 1)}
    for ratio, b in row["budgets"].items():
        print(f"{name} {b['bytes_per_layer']:.0f} B/layer: error per-head "
              f"{b['per-head']['chosen_error']:.4g}, shared {b['shared']['chosen_error']:.4g}, "
              f"auto {b['auto']['chosen_error']:.4g}; mean per-layer ratio shared/per-head "
              f"{b['shared_over_per_head']['layer_budget_mean']:.3f}, auto/per-head "
              f"{b['auto_over_per_head']['layer_budget_mean']:.3f} ({row['seconds']:.0f} s)",
              flush=True)
    return row


def run(args, argv) -> dict:
    import mla_ext
    from mla_ext.models import load_default_tokenizer

    t0 = time.time()
    rows = []
    tokenizer = load_default_tokenizer()
    for name in args.models:
        if name == "default":
            model, _ = mla_ext.load_default_model(dtype=torch.float32)
        else:
            model = random_model(name, args.layers, len(tokenizer), args.tiny)
        rows.append(study_model(name, model, tokenizer, args))
        del model
    protocol = {"calibration": f"{args.calib_sequences} x {args.calib_length} tokens of the "
                               "calibration part of pydoc_data.topics",
                "rope_pair_step": args.rope_pair_step, "seed": SEED, "tiny": args.tiny,
                "command": " ".join(["python studies/rope_sharing_shapes.py", *argv])}
    return {"metadata": {**metadata(), "seconds": round(time.time() - t0, 1),
                         "threads": torch.get_num_threads()},
            "protocol": protocol, "rows": rows}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_JSON), help="JSON output (default %(default)s)")
    p.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    p.add_argument("--layers", type=positive_int, default=1,
                   help="decoder layers of the random models (default %(default)s)")
    p.add_argument("--tiny", action="store_true",
                   help="random models of test size with the same head layouts")
    p.add_argument("--calib-sequences", type=positive_int, default=4,
                   help="calibration sequences (default %(default)s; the first 2 are scored)")
    p.add_argument("--calib-length", type=positive_int, default=128,
                   help="tokens per calibration sequence (default %(default)s)")
    p.add_argument("--rope-pair-step", type=positive_int, default=8,
                   help="RoPE pairs searched in multiples of this (MLAConfig.rope_pair_step; "
                        "the default conversion's is 1; default %(default)s)")
    args = p.parse_args(argv)
    result = run(args, argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
