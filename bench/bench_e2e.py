"""End-to-end decode benchmark: the original model against the converted one, same harness.

    python bench/bench_e2e.py                       # every model and side, writes
                                                    # bench/results/e2e_<gpu>.json and .png
    python bench/bench_e2e.py --models llama2-7b --quick

Models: Llama-2-7B-shaped (32 layers, 32 heads x 128, MHA) and Llama-3-8B-shaped (8 KV heads)
with random bf16 weights; their converted side has the MLA layers that the weight-only
conversion at -81.25 % cache makes (r = 8 RoPE pairs, d_kv = 32: D_c = 1024 and 256), with
random weights too (speed depends on shapes, not on weights; the conversion's SVDs run in float64
on the CPU, minutes for 32 layers of 4096). The default SmolLM2 model, where it is installed, is
converted for real with MLAConfig(). Sides: the original through Hugging Face's default path
(eager forward per token over a DynamicCache, SDPA), the original through mla_ext.generate's
harness (StaticKVCache, one CUDA-graph replay per token), and the converted model through the
same harness over bf16 / int8 / int4 latent caches (bf16 RoPE keys) and int4 with fp8 keys.

Rows (B, S): (1, 4k) and (1, 32k) run the real thing: the prompt (random tokens) is prefilled,
then steps are timed. Larger batches fill the cache with S random tokens per sequence (written
through the cache's own quantizer) instead of prefilling them, since a decode step's time
depends on the lengths, not on the tokens; their prefill_s is null. At S = 32k every side also
runs at B_o (the original harness's largest batch) and at its own largest batch (the most
sequences whose cache fits beside the weights, lowered until a step runs).
ms_per_step: median of CUDA-event timings of one decode step (all B sequences); roofline_frac:
(weights + cache bytes read per step) / measured HBM read bandwidth / step time.
"""
from __future__ import annotations

import argparse
import gc
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import mla_ext  # noqa: E402
from mla_ext import ops  # noqa: E402
from mla_ext.generation import (DecodeStep, capture, graph_capturable, make_cache,  # noqa: E402
                                prefill, sample_tokens)

from bench.common import measure_peak_read_bandwidth, metadata, RESULTS  # noqa: E402

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
}
CONVERSION = dict(rope_strategy="high", rope_pairs=8, d_kv=32, svd="joint",
                  rope_correction="none")
SIDES = {  # side -> (converted, cache_dtype, rope_dtype, graph)
    "original-eager": (False, None, None, False),
    "original-graph": (False, None, None, True),
    "mla-bf16": (True, "bf16", "bf16", True),
    "mla-int8": (True, "int8", "bf16", True),
    "mla-int4": (True, "int4", "bf16", True),
    "mla-int4-fp8": (True, "int4", "fp8", True),
}
ROWS = [(1, 4096), (1, 32768), (8, 8192), (64, 4096)]
LONG = 32768
TIMED_STEPS = 20
SPARE_TOKENS = 2 * TIMED_STEPS + 8     # the cache's room past S for warm-up and timed steps


def random_model(name: str, layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(num_hidden_layers=layers, head_dim=128, max_position_embeddings=131072,
                      attention_bias=False, **SHAPES[name])
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def to_mla_shapes(model) -> None:
    """Swap every attention for the MLAAttention that convert_to_mla makes at CONVERSION's
    sizes, with random weights (the kept RoPE pairs: the first r, as the 'high' strategy)."""
    from mla_ext.modeling.attention import MLAAttention
    from mla_ext.modeling.patch import plan_layers
    sizes = plan_layers(model, mla_ext.MLAConfig(**CONVERSION))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            for i, (layer, size) in enumerate(zip(model.model.layers, sizes)):
                layer.self_attn = None
                mla = MLAAttention(model.config, i, size["rope_pairs"], size["latent_dim"])
                for p in mla.parameters():
                    p.data.normal_(0.0, 0.02)
                r = size["rope_pairs"]
                mla.rope_pairs.copy_(torch.arange(r).expand(mla.num_kv_heads, r))
                layer.self_attn = mla.eval()
    finally:
        torch.set_default_dtype(previous)


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def fill_random(cache, length: int) -> None:
    """S random tokens per sequence, without a prefill: latents through the cache's own writer
    (its quantizer), K/V as random values; then the lengths."""
    table = cache.table
    b = table.batch_size
    if isinstance(cache, mla_ext.LatentCache):
        chunk = max(1, 65536 // b)
        for layer in cache.layers:
            for start in range(0, length, chunk):
                t = min(chunk, length - start)
                pos = torch.arange(start, start + t, device="cuda").view(1, -1).expand(b, -1)
                blocks = table.block_table.gather(1, pos // table.block_size).long()
                slots = (blocks * table.block_size + pos % table.block_size).reshape(-1)
                c = torch.randn(b * t, layer.latent_dim, device="cuda")
                k = torch.randn(b * t, layer.num_kv_heads, layer.rope_dim, device="cuda")
                ops.latent_cache_write(c, k, slots, *layer.tensors(), check_ranges=False)
    else:
        for layer in cache.layers:
            layer.keys[:, :, :length].normal_()
            layer.values[:, :, :length].normal_()
    table.seq_lens.fill_(length)
    table.advance(length)


def time_steps(fn, n: int) -> float:
    """Median ms of n calls of fn, each timed with CUDA events."""
    times = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def eager_side(model, b: int, s: int, real: bool) -> tuple[float, float | None]:
    """Hugging Face's default path: a DynamicCache, one eager forward + argmax per token."""
    from transformers import DynamicCache
    cache = DynamicCache(config=model.config)
    prefill_s = None
    if real:
        ids = torch.randint(0, model.config.vocab_size, (b, s), device="cuda")
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        torch.cuda.synchronize()
        prefill_s = time.perf_counter() - t0
        tok = logits[:, -1].argmax(-1, keepdim=True)
    else:
        cfg = model.config
        shape = (b, cfg.num_key_value_heads, s, cfg.head_dim)
        for i in range(cfg.num_hidden_layers):
            cache.update(torch.randn(shape, device="cuda", dtype=torch.bfloat16),
                         torch.randn(shape, device="cuda", dtype=torch.bfloat16), i)
        tok = torch.zeros(b, 1, dtype=torch.long, device="cuda")

    def step():
        nonlocal tok
        out = model(tok, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        tok = out[:, -1].argmax(-1, keepdim=True)

    for _ in range(2):
        step()
    return time_steps(step, TIMED_STEPS // 2), prefill_s


class NotCapturable(Exception):
    """The side's decode step cannot be captured (a cache format the CUDA kernel declines)."""


def graph_side(model, side: str, b: int, s: int, real: bool) -> tuple[float, float | None, int]:
    """mla_ext.generate's harness: a static cache, one CUDA-graph replay per decode step."""
    _, cache_dtype, rope_dtype, _ = SIDES[side]
    cache = make_cache(model, b, s + SPARE_TOKENS, cache_dtype, rope_dtype)
    why = graph_capturable(model, cache)
    if why is not None:
        raise NotCapturable(why)
    prefill_s = None
    if real:
        prompts = [torch.randint(0, model.config.vocab_size, (s,), device="cuda")
                   for _ in range(b)]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        first = sample_tokens(prefill(model, cache, prompts), 0.0, 1.0)
        torch.cuda.synchronize()
        prefill_s = time.perf_counter() - t0
    else:
        fill_random(cache, s)
        first = torch.zeros(b, dtype=torch.long, device="cuda")
    output = torch.zeros(b, 2 * TIMED_STEPS + 4, dtype=torch.long, device="cuda")
    step = DecodeStep(model, cache, first.clone(), output, None, 0, 0.0, 1.0)
    step()
    graph = capture(step)
    for _ in range(3):
        graph.replay()
    ms = time_steps(graph.replay, TIMED_STEPS)
    return ms, prefill_s, cache.nbytes()


def kv_bytes(model, side: str, b: int, s: int) -> int:
    converted, cache_dtype, rope_dtype, _ = SIDES[side]
    per_token = (mla_ext.kv_cache_bytes_per_token(model, cache_dtype, rope_dtype) if converted
                 else mla_ext.kv_cache_bytes_per_token(model, "bf16"))
    return b * s * per_token


def measure(model, name: str, side: str, b: int, s: int, hbm: float, real: bool) -> dict:
    row = {"model": name, "side": side, "B": b, "S": s}
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        if side == "original-eager":
            ms, prefill_s = eager_side(model, b, s, real)
        else:
            ms, prefill_s, _ = graph_side(model, side, b, s, real)
    except torch.cuda.OutOfMemoryError:
        row["error"] = "OOM"
        return row
    except NotCapturable as exc:
        row["error"] = f"not capturable: {exc}"
        return row
    finally:
        gc.collect()
        torch.cuda.empty_cache()
    kv = kv_bytes(model, side, b, s)
    read = weight_bytes(model) + kv
    row.update(ms_per_step=round(ms, 3), tokens_per_s=round(b * 1e3 / ms, 1),
               prefill_s=None if prefill_s is None else round(prefill_s, 3),
               peak_GB=round(torch.cuda.max_memory_allocated() / 1e9, 2), kv_bytes=kv,
               roofline_frac=round(read / hbm / (ms * 1e-3), 3))
    return row


def largest_batch(model, side: str, s: int) -> int:
    """Most sequences of S tokens whose cache fits beside the weights and a step's work (the
    caller lowers it until a step runs)."""
    free, _ = torch.cuda.mem_get_info()
    per_seq = kv_bytes(model, side, 1, s + SPARE_TOKENS)
    if side == "original-eager":   # DynamicCache grows a layer by concatenation: two copies
        per_seq += per_seq // model.config.num_hidden_layers
    return max(1, int(free * 0.88 // per_seq))


def run_model(name: str, args, hbm: float, rows: "Rows", max_batch: dict) -> None:
    if name == "smollm2":
        try:
            model, tok = mla_ext.load_default_model(dtype=torch.bfloat16, device="cuda")
        except FileNotFoundError as exc:
            print(f"smollm2: skipped ({exc})")
            return
    else:
        model = random_model(name, args.layers)
    for phase in ("original", "converted"):
        if phase == "converted":
            if name == "smollm2":
                cfg = mla_ext.MLAConfig()
                calib = mla_ext.calibrate(model, tok, mla_ext.default_calibration_text(),
                                          max_length=512, max_sequences=16, progress=False,
                                          **cfg.calibration_options())
                mla_ext.convert_to_mla(model, cfg, calibration=calib, progress=False)
            else:
                to_mla_shapes(model)
            torch.cuda.empty_cache()
        sides = [s for s in args.sides if SIDES[s][0] == (phase == "converted")]
        for side in sides:
            for b, s in args.rows:
                row = measure(model, name, side, b, s, hbm, real=(b == 1))
                rows.append(row)
                print(row, flush=True)
            if args.quick:
                continue
            best = largest_batch(model, side, LONG)
            for _ in range(4):
                row = measure(model, name, side, best, LONG, hbm, real=False)
                if "error" not in row:
                    break
                best = max(1, int(best * 0.85))
            row["max_batch"] = True
            rows.append(row)
            print(row, flush=True)
            max_batch[f"{name}/{side}"] = best if "error" not in row else 0
        if phase == "original":
            args.b_o = 0 if args.quick else max_batch.get(f"{name}/original-graph", 0)
        if args.b_o:
            for side in sides:
                if side == "original-graph":
                    continue   # its largest-batch row is this row
                row = measure(model, name, side, args.b_o, LONG, hbm, real=False)
                row["at_original_max_batch"] = True
                rows.append(row)
                print(row, flush=True)
    del model
    gc.collect()
    torch.cuda.empty_cache()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="llama2-7b,llama3-8b,smollm2",
                   help="comma-separated: llama2-7b, llama3-8b, smollm2")
    p.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated of {list(SIDES)}")
    p.add_argument("--layers", type=int, default=32, help="decoder layers of the random models")
    p.add_argument("--quick", action="store_true",
                   help="the (B, S) rows only: no largest-batch search at 32k")
    p.add_argument("--rows", default=",".join(f"{b}x{s}" for b, s in ROWS),
                   help="comma-separated BxS rows, e.g. 1x4096,8x8192")
    p.add_argument("--out", type=Path, default=RESULTS, help="directory of the JSON and PNG")
    p.add_argument("--name", default=None,
                   help="file name without suffix (default e2e_<gpu>, e.g. e2e_h200)")
    p.add_argument("--merge", nargs="+", type=Path, default=None, metavar="JSON",
                   help="no measurement: combine the rows of these JSONs (runs of the same GPU, "
                        "e.g. one model each) into --out/--name .json and .png")
    p.add_argument("--table", type=Path, default=None, metavar="JSON",
                   help="no measurement: print this JSON's rows as a markdown table")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.sides = [s for s in args.sides.split(",") if s]
    for m in args.models:
        if m not in (*SHAPES, "smollm2"):
            p.error(f"--models: unknown model {m!r}")
    for s in args.sides:
        if s not in SIDES:
            p.error(f"--sides: unknown side {s!r}")
    try:
        args.rows = [tuple(int(v) for v in r.split("x")) for r in args.rows.split(",") if r]
    except ValueError:
        p.error(f"--rows: expected BxS pairs, got {args.rows!r}")
    return args


def plot(payload: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = [r for r in payload["rows"] if "error" not in r]
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        mine = [r for r in rows if r["model"] == model]
        labels = sorted({(r["B"], r["S"]) for r in mine if not r.get("max_batch")})
        labels.append("max B, 32k")
        sides = [s for s in SIDES if any(r["side"] == s for r in mine)]
        width = 0.8 / max(len(sides), 1)
        for i, side in enumerate(sides):
            vals = []
            for label in labels:
                hit = [r for r in mine if r["side"] == side and (
                    r.get("max_batch") if label == "max B, 32k" else
                    (r["B"], r["S"]) == label and not r.get("max_batch"))]
                vals.append(hit[0]["tokens_per_s"] if hit else 0)
            ax.bar([j + i * width for j in range(len(labels))], vals, width, label=side)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
        ax.set_xticklabels([f"B={l[0]}\nS={l[1]}" if isinstance(l, tuple) else l
                            for l in labels], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("decode tokens/s")
        ax.set_title(f"{model} ({payload['metadata']['gpu']})")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


class Rows(list):
    """The rows measured so far, written out after each one (a run cut short keeps them)."""

    def __init__(self, path: Path, meta: dict, max_batch: dict):
        super().__init__()
        self.path, self.meta, self.max_batch = path, meta, max_batch

    def append(self, row: dict) -> None:
        super().append(row)
        self.write()

    def write(self) -> dict:
        payload = {"metadata": self.meta, "rows": list(self), "max_batch_32k": self.max_batch}
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=1))
        tmp.replace(self.path)
        return payload


def gpu_tag(name: str | None) -> str:
    """The GPU's model in a file name: 'NVIDIA H100 80GB HBM3' -> 'h100'."""
    match = re.search(r"\b([A-Za-z]{1,2}\d{2,4}[A-Za-z]?)\b", name or "")
    return match.group(1).lower() if match else "gpu"


def merge(paths: list[Path], out: Path, name: str | None) -> Path:
    """One JSON (and PNG) from several runs on the same GPU: rows and largest batches joined,
    the metadata of each run kept under metadata.runs."""
    payloads = [json.loads(Path(p).read_text()) for p in paths]
    gpus = {p["metadata"]["gpu"] for p in payloads}
    if len(gpus) != 1:
        raise SystemExit(f"--merge: runs of different GPUs {sorted(gpus)} are not comparable")
    meta = {k: v for k, v in payloads[0]["metadata"].items() if k != "runs"}
    # a payload that is itself a merge brings its runs, not its summary
    meta["runs"] = [r for p in payloads for r in p["metadata"].get("runs", [p["metadata"]])]
    merged = {"metadata": meta, "rows": [r for p in payloads for r in p["rows"]],
              "max_batch_32k": {k: v for p in payloads for k, v in p["max_batch_32k"].items()}}
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name or 'e2e_' + gpu_tag(meta['gpu'])}.json"
    path.write_text(json.dumps(merged, indent=1))
    plot(merged, path.with_suffix(".png"))
    return path


def table(payload: dict) -> str:
    """The rows as a markdown table, the original's best path and each side's speed-up over it
    at the same (model, B, S)."""
    rows = payload["rows"]
    base = {(r["model"], r["B"], r["S"]): r for r in rows
            if r["side"] == "original-graph" and "error" not in r}
    lines = ["| model | side | B | S | ms/step | tokens/s | x original-graph | prefill s | "
             "peak GB | KV GB | roofline |", "|" + "---|" * 11]
    for r in rows:
        tag = " (largest B)" if r.get("max_batch") else ""
        if "error" in r:
            lines.append(f"| {r['model']} | {r['side']}{tag} | {r['B']} | {r['S']} | "
                         f"{r['error']} | | | | | | |")
            continue
        ref = base.get((r["model"], r["B"], r["S"]))
        speedup = f"{r['tokens_per_s'] / ref['tokens_per_s']:.2f}x" if ref else ""
        prefill = "" if r["prefill_s"] is None else f"{r['prefill_s']:.2f}"
        lines.append(f"| {r['model']} | {r['side']}{tag} | {r['B']} | {r['S']} | "
                     f"{r['ms_per_step']:.2f} | {r['tokens_per_s']:,.0f} | {speedup} | {prefill} | "
                     f"{r['peak_GB']:.1f} | {r['kv_bytes'] / 1e9:.2f} | "
                     f"{100 * r['roofline_frac']:.0f} % |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return
    if args.merge:
        print(f"wrote {merge(args.merge, args.out, args.name)}")
        return
    if not torch.cuda.is_available():
        sys.exit("bench_e2e needs a CUDA device")
    hbm = measure_peak_read_bandwidth()
    meta = {**metadata(), "command": "python bench/bench_e2e.py " + " ".join(argv or sys.argv[1:]),
            "hbm_read_GBps": round(hbm / 1e9, 1)}
    max_batch = {}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.name or 'e2e_' + gpu_tag(meta['gpu'])}.json"
    rows = Rows(path, meta, max_batch)
    for name in args.models:
        run_model(name, args, hbm, rows, max_batch)
    payload = rows.write()
    try:
        plot(payload, path.with_suffix(".png"))
    except ImportError:
        print("matplotlib missing: no plot")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
