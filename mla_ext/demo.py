"""The demo: the default model before and after a training-free MHA2MLA conversion."""
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
PAPER_DEFAULTS = MLAConfig(rope_strategy="2-norm", rope_pairs=4, d_kv=16, svd="joint")
PROMPT = "What is the capital of France? Answer in one sentence."
CHAT_CACHE = "int4"


def _per_layer(model, cache_dtype: str) -> float:
    return kv_cache_bytes_per_token(model, cache_dtype) / model.config.num_hidden_layers


def run_demo(device: str = "cpu", eval_tokens: int | None = 8192, calib_sequences: int = 16,
             context: int = 512, config: MLAConfig = PAPER_DEFAULTS) -> dict:
    """Run the demo, print its table and return the numbers."""
    t0 = time.time()
    print(f"loading {DEFAULT_MODEL_NAME} on {device} ...")
    original, tokenizer = load_default_model(dtype=torch.float32, device=device)
    eval_text = default_evaluation_text()

    ppl_original = perplexity(original, tokenizer, eval_text, context=context, stride=context,
                              max_tokens=eval_tokens)
    answer_original = chat(original, tokenizer, PROMPT)

    print(f"calibrating on {calib_sequences} x 512 tokens and converting ({config}) ...")
    model = copy.deepcopy(original)
    calib = calibrate(model, tokenizer, default_calibration_text(), max_length=512,
                      max_sequences=calib_sequences, **config.calibration_options())
    convert_to_mla(model, config, calibration=calib)
    ppl_mla = perplexity(model, tokenizer, eval_text, context=context, stride=context,
                         max_tokens=eval_tokens)
    answer_mla = chat(model, tokenizer, PROMPT, cache=LatentCache(model, cache_dtype=CHAT_CACHE))

    result = {
        "bytes_original_bf16": _per_layer(original, "bf16"),
        "bytes_mla_bf16": _per_layer(model, "bf16"),
        "bytes_mla_int4": _per_layer(model, "int4"),
        "ppl_original": ppl_original, "ppl_mla": ppl_mla,
        "answer_original": answer_original, "answer_mla": answer_mla,
    }
    _print_table(result, config, eval_tokens, context)
    print(f"(demo took {time.time() - t0:.0f} s)")
    return result


def _print_table(r: dict, config: MLAConfig, eval_tokens, context) -> None:
    orig = r["bytes_original_bf16"]

    def saving(b):
        return f"{b:.0f}  ({100 * (b / orig - 1):+.2f} %)"

    name = (f"MLA {config.rope_strategy} r={config.rope_pairs} {config.svd} d_kv={config.d_kv}")
    scope = "all held-out tokens" if eval_tokens is None else f"first {eval_tokens} held-out tokens"
    rows = [
        ("cache bytes/token/layer, bf16", f"{orig:.0f}", saving(r["bytes_mla_bf16"])),
        ("cache bytes/token/layer, int4 + scales", "-", saving(r["bytes_mla_int4"])),
        (f"perplexity ({scope}, ctx {context})", f"{r['ppl_original']:.2f}", f"{r['ppl_mla']:.2f}"),
    ]
    widths = [max(len(row[i]) for row in rows + [("", "original", name)]) for i in range(3)]
    line = "  ".join("-" * w for w in widths)
    print()
    print("  ".join(s.ljust(w) for s, w in zip(("", "original", name), widths)))
    print(line)
    for row in rows:
        print("  ".join(s.ljust(w) for s, w in zip(row, widths)))
    print(line)
    print(f"chat: {PROMPT!r}")
    for label, answer in (("original", r["answer_original"]),
                          (f"MLA, {CHAT_CACHE} latent cache", r["answer_mla"])):
        print(textwrap.fill(answer or "(empty)", width=100, initial_indent=f"  {label}: ",
                            subsequent_indent="    "))
    print("The conversion is training-free: MHA2MLA recovers quality with a short fine-tune.")
