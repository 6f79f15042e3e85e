"""The demo: the default model before and after a training-free MHA2MLA conversion, with the
paper's recipe and with ours, step by step."""
from __future__ import annotations

import copy
import textwrap
import time

import torch

from .config import MLAConfig
from .convert import calibrate
from .data import default_calibration_text, default_evaluation_text
from .eval import chat, perplexity
from .modeling import LatentCache, convert_to_mla, kv_cache_bytes_per_token
from .models import DEFAULT_MODEL_NAME, load_default_model

# The paper's defaults for a d_h = 64 model: 2-norm, r = d_h/16 = 4, joint SVD, d_kv = d_h/4.
PAPER = MLAConfig(rope_strategy="2-norm", rope_pairs=4, d_kv=16, svd="joint")
# Ours at the same cache size: rotation-aware RoPE selection + activation-aware joint SVD.
OURS = MLAConfig(rope_strategy="rotation", rope_pairs=4, d_kv=16, svd="activation")
PROMPT = "What is the capital of France? Answer in one sentence."
CHAT_CACHE = "int4"


def _label(cfg: MLAConfig) -> str:
    d_kv = "full rank" if cfg.d_kv is None else f"d_kv={cfg.d_kv}"
    return f"{cfg.rope_strategy} r={cfg.rope_pairs}, {cfg.svd} SVD {d_kv}"


def run_demo(device: str = "cpu", eval_tokens: int | None = 8192, calib_sequences: int = 16,
             context: int = 512) -> list[dict]:
    """Run the demo, print its table and return its rows."""
    t0 = time.time()
    print(f"loading {DEFAULT_MODEL_NAME} on {device} ...")
    original, tokenizer = load_default_model(dtype=torch.float32, device=device)
    layers = original.config.num_hidden_layers
    text = default_evaluation_text()

    def ppl(model, cache_dtype=None):
        return perplexity(model, tokenizer, text, context=context, stride=context,
                          max_tokens=eval_tokens, cache_dtype=cache_dtype)

    def row(name, model, cache_dtype="bf16", through_cache=False, answer=False):
        r = {"name": name, "bytes": kv_cache_bytes_per_token(model, cache_dtype) / layers,
             "ppl": ppl(model, cache_dtype if through_cache else None)}
        if answer:
            cache = LatentCache(model, cache_dtype=CHAT_CACHE) if model is not original else None
            r["answer"] = chat(model, tokenizer, PROMPT, cache=cache)
        return r

    rows = [row("original", original, answer=True)]
    print(f"calibrating on {calib_sequences} x 512 tokens ...")
    calib = calibrate(original, tokenizer, default_calibration_text(), max_length=512,
                      max_sequences=calib_sequences, collect_xtx=True, collect_distances=True)

    def convert(cfg):
        return convert_to_mla(copy.deepcopy(original), cfg, calibration=calib, progress=False)

    rows.append(row(f"paper: {_label(PAPER)}", convert(PAPER), answer=True))
    rope_only = MLAConfig(rope_strategy=OURS.rope_strategy, rope_pairs=OURS.rope_pairs,
                          d_kv=None, svd="joint")
    rows.append(row(f"ours, step 1: partial RoPE only ({OURS.rope_strategy} r=4)",
                    convert(rope_only)))
    ours = convert(OURS)
    rows.append(row(f"ours, step 2: + {OURS.svd} SVD d_kv={OURS.d_kv}", ours))
    rows.append(row(f"ours, step 3: + {CHAT_CACHE} latent cache", ours, cache_dtype=CHAT_CACHE,
                    through_cache=True, answer=True))
    _print_table(rows, eval_tokens, context)
    print(f"(demo took {time.time() - t0:.0f} s)")
    return rows


def _print_table(rows: list[dict], eval_tokens, context) -> None:
    base_bytes, base_ppl = rows[0]["bytes"], rows[0]["ppl"]
    scope = "all held-out" if eval_tokens is None else f"first {eval_tokens} held-out"
    header = ("", "cache B/token/layer", f"perplexity ({scope} tokens, ctx {context})")
    table = [header] + [
        (r["name"], f"{r['bytes']:.0f} ({100 * (r['bytes'] / base_bytes - 1):+.2f} %)"
         if r is not rows[0] else f"{r['bytes']:.0f} (bf16 K/V)",
         f"{r['ppl']:.2f}" + ("" if r is rows[0] else f"  ({r['ppl'] / base_ppl:.1f}x)"))
        for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(3)]
    rule = "  ".join("-" * w for w in widths)
    print()
    for i, line in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)))
        if i == 0:
            print(rule)
    print(rule)
    print(f"chat, greedy: {PROMPT!r}")
    for r in rows:
        if "answer" in r:
            print(textwrap.fill(r["answer"] or "(empty)", width=100,
                                initial_indent=f"  {r['name']}: ", subsequent_indent="      "))
    print("All conversions are training-free; MHA2MLA recovers quality with a short fine-tune "
          "(mla-ext finetune).")
