"""Training-free quality study on the default model (SmolLM2-135M-Instruct).

Held-out perplexity of the original model and of converted ones, the way the paper's ablations
are laid out (its Tables 1, 3, 5), with perplexity in place of benchmark suites:
  1. partial RoPE only (full-rank latent): every strategy at r = 2, 4, 8;
  2. partial RoPE r = 4 + low rank: weight SVD (joint, split; the paper) and activation-aware
     SVD (ours) at d_kv = 8, 16, 32, with the 2-norm and the rotation-aware selection;
  3. the cache formats on the best d_kv = 16 configuration, read back through the LatentCache.

    python studies/quality_study.py                     # writes studies/results/quality_smollm2.json
    python studies/quality_study.py --render            # JSON -> markdown tables (stdout)
    python studies/quality_study.py --resume            # measure only the rows --out lacks

`--study rope` measures instead the RoPE selections at -81.25 % (partial RoPE alone at r = 4,
then under the cache budget, per-layer splits), the rows of docs/results.md's "Greedy RoPE
selection" section; on a CPU with its protocol:

    OMP_NUM_THREADS=1 python studies/quality_study.py --study rope --max-tokens 8192 \
        --shakespeare-tokens 8192 --calib-sequences 16 --out studies/results/quality_rope_cpu.json

`--study formats` measures the cache formats (bf16, int8, fp8, int4, read back through the
LatentCache) on the default conversion, ``MLAConfig()``.

`--study correction` measures the fitted correction of the dropped RoPE pairs
(``rope_correction``: none, fitted-uniform, fitted-attention) on partial RoPE alone (rotation,
r = 4) and on the default conversion ``MLAConfig()``; its calibration also collects the fit's
sums (``collect_rope_fit=True``). The CPU protocol:

    OMP_NUM_THREADS=1 python studies/quality_study.py --study correction --max-tokens 8192 \
        --shakespeare-tokens 8192 --calib-sequences 16 \
        --out studies/results/quality_correction_cpu.json

`--study score_svd` measures the score/output-weighted joint SVD (``svd="activation-score"``:
the NoPE key rows weighted by the queries' second moment, the value rows by ``W_o^T W_o``)
against the activation-aware one, in the default conversion ``MLAConfig()`` (budget -81.25 %,
fitted RoPE correction); the CPU protocol:

    OMP_NUM_THREADS=1 python studies/quality_study.py --study score_svd --max-tokens 8192 \
        --shakespeare-tokens 8192 --calib-sequences 16 \
        --out studies/results/quality_score_svd_cpu.json

`--study byte_budget` measures the cache budget in stored bytes at 144 and 96 bytes per token
and layer (-81.25 %, -87.5 %): the default conversion, + cache formats searched per layer
(``cache_formats="auto"``), + a shared RoPE key searched per layer (``rope_sharing="auto"``),
both; every row read back through the LatentCache in its own formats. The CPU protocol:

    OMP_NUM_THREADS=1 python studies/quality_study.py --study byte_budget --max-tokens 8192 \
        --shakespeare-tokens 8192 --calib-sequences 16 \
        --out studies/results/quality_byte_budget_cpu.json

One calibration pass (64 x 512 tokens of the calibration part of pydoc_data.topics) serves every
configuration. Texts: the held-out part of pydoc_data.topics and, when present,
../shared/data/tinyshakespeare.txt (its first --shakespeare-tokens tokens).
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import earlier_results, eval_batch_size, metadata  # noqa: E402

from studies import RESULTS  # noqa: E402

DEFAULT_JSON = RESULTS / "quality_smollm2.json"
# ../shared/data beside the checkout; carry/p2 on a GPU machine (tools/prepare_h200_carry.sh puts it there)
SHAKESPEARE_CANDIDATES = [ROOT.parent / "shared" / "data" / "tinyshakespeare.txt",
                          ROOT / "carry" / "p2" / "tinyshakespeare.txt"]
STRATEGIES = ("high", "low", "uniform", "2-norm", "rotation")
SVDS = ("joint", "split", "activation", "activation-split")
CACHE_DTYPES = ("bf16", "int8", "fp8", "int4")
# What rows kept by --resume must share with the run that continues them.
RESUME_KEYS = ("context", "stride", "calibration", "texts")


def _uncorrected():
    """MLAConfig with ``rope_correction="none"`` unless a row says otherwise: the tables
    measured before the fitted RoPE correction became the default."""
    from functools import partial

    from mla_ext import MLAConfig

    return partial(MLAConfig, rope_correction="none")


def _configs(quick: bool):
    """The ablation tables; measured before the fitted RoPE correction, so without it."""
    MLAConfig = _uncorrected()  # noqa: N806

    rs = (4,) if quick else (2, 4, 8)
    for strategy in STRATEGIES:
        for r in rs:
            yield "partial_rope", MLAConfig(rope_strategy=strategy, rope_pairs=r, d_kv=None)
    for strategy in ("2-norm", "rotation") if not quick else ("2-norm",):
        for svd in SVDS if not quick else ("joint", "activation"):
            for d_kv in (8, 16, 32) if not quick else (16,):
                yield "low_rank", MLAConfig(rope_strategy=strategy, rope_pairs=4, d_kv=d_kv,
                                            svd=svd)
    yield "low_rank", MLAConfig(rope_strategy="high", rope_pairs=4, d_kv=16, svd="joint")
    for strategy in ("2-norm", "rotation"):
        yield "budget", MLAConfig(rope_strategy=strategy, rope_pairs=4, svd="activation",
                                  cache_ratio=0.1875)


def _rope_configs():
    """The RoPE selections at -81.25 % of the cache (``--study rope``), without the fitted RoPE
    correction, as docs/results.md's table of them was measured."""
    MLAConfig = _uncorrected()  # noqa: N806

    for strategy in ("rotation", "greedy"):
        yield "partial_rope", MLAConfig(rope_strategy=strategy, rope_pairs=4, d_kv=None)
    for strategy in ("rotation", "greedy"):
        yield "low_rank", MLAConfig(rope_strategy=strategy, rope_pairs=6, d_kv=12,
                                    svd="activation")
    for step in (4, 1):
        for strategy in ("rotation", "greedy"):
            yield "budget", MLAConfig(rope_strategy=strategy, rope_pairs="auto",
                                      svd="activation", cache_ratio=0.1875, rope_pair_step=step,
                                      cache_formats="none", rope_sharing="per-head")


def _format_configs():
    """The default conversion before the formats search, whose cache formats follow
    (``--study formats``)."""
    from mla_ext import MLAConfig

    yield "budget", MLAConfig(cache_formats="none", rope_sharing="per-head")


def _correction_configs():
    """The fitted RoPE correction, partial RoPE alone and the default conversion
    (``--study correction``)."""
    from mla_ext import MLAConfig
    from mla_ext.convert.rope_correction import ROPE_CORRECTIONS

    for correction in ROPE_CORRECTIONS:
        yield "partial_rope", MLAConfig(rope_strategy="rotation", rope_pairs=4, d_kv=None,
                                        rope_correction=correction)
    for correction in ROPE_CORRECTIONS:
        yield "budget", MLAConfig(rope_correction=correction, cache_formats="none",
                                  rope_sharing="per-head")


def _score_svd_configs():
    """The activation-aware SVD against the score/output-weighted one in the default
    conversion (``--study score_svd``)."""
    from mla_ext import MLAConfig

    for svd in ("activation", "activation-score"):
        yield "budget", MLAConfig(svd=svd, cache_formats="none", rope_sharing="per-head")


def _score_balance_configs():
    """The key/value balance of the score/output-weighted SVD in the default conversion
    (``--study score_balance``: ``svd_key_weight`` 0.5 and 2; 1 is ``--study score_svd``)."""
    from mla_ext import MLAConfig

    for weight in (0.5, 2.0):
        yield "budget", MLAConfig(svd="activation-score", svd_key_weight=weight,
                                  cache_formats="none", rope_sharing="per-head")


def _byte_budget_configs():
    """The cache budget in stored bytes (``--study byte_budget``) at 144 and 96 bytes per token
    and layer (-81.25 %, -87.5 % of the bf16 K/V cache): the default conversion (bf16 latent
    and keys), + formats searched per layer, + a shared RoPE key searched per layer, both.
    Every row is read back through its own cache formats."""
    from mla_ext import MLAConfig

    for ratio in (0.1875, 0.125):
        yield "bytes", MLAConfig(cache_ratio=ratio, cache_formats="none", rope_sharing="per-head")
        yield "bytes", MLAConfig(cache_ratio=ratio, cache_formats="auto", rope_sharing="per-head")
    for ratio in (0.1875, 0.125):
        yield "bytes", MLAConfig(cache_ratio=ratio, cache_formats="auto", rope_sharing="auto")
        yield "bytes", MLAConfig(cache_ratio=ratio, cache_formats="none", rope_sharing="auto")


STUDIES = {"full": _configs, "rope": lambda quick: _rope_configs(),
           "formats": lambda quick: _format_configs(),
           "correction": lambda quick: _correction_configs(),
           "score_svd": lambda quick: _score_svd_configs(),
           "score_balance": lambda quick: _score_balance_configs(),
           "byte_budget": lambda quick: _byte_budget_configs()}
# Studies whose converted rows are read back through the cache (each layer's stored format).
THROUGH_CACHE = ("byte_budget",)


def run(args, save=None, argv=None) -> dict:
    import mla_ext
    from mla_ext.data import load_texts

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, tok = mla_ext.load_default_model(dtype=torch.float32, device=device)
    texts = {"pydoc": mla_ext.default_evaluation_text()}
    shakespeare = next((p for p in SHAKESPEARE_CANDIDATES if p.exists()), None)
    if args.shakespeare:
        shakespeare = Path(args.shakespeare)
    if shakespeare is not None:
        texts["shakespeare"] = load_texts(shakespeare)[0]
    limits = {"pydoc": args.max_tokens, "shakespeare": args.shakespeare_tokens}

    def ppl(m, cache_dtype=None, through_cache=None):
        return {name: mla_ext.perplexity(m, tok, text, context=args.context, stride=args.context,
                                         max_tokens=limits[name], progress=False,
                                         cache_dtype=cache_dtype, through_cache=through_cache,
                                         batch_size=eval_batch_size(next(m.parameters()).device))
                for name, text in texts.items()}

    t0 = time.time()

    protocol = {"context": args.context, "stride": args.context,
                "calibration": f"{args.calib_sequences} x 512 tokens of the calibration part of "
                               "pydoc_data.topics",
                "texts": {k: ("all held-out tokens" if limits[k] is None
                              else f"first {limits[k]} tokens") for k in texts},
                "command": " ".join(["python studies/quality_study.py", *(argv or [])])}

    def result():
        return {"metadata": {**metadata(), "device": device, "seconds": round(time.time() - t0, 1)},
                "protocol": protocol, "rows": rows}

    def keep(row):
        # written after every row, so a run cut short by a time limit keeps what it measured
        rows.append(row)
        print(_fmt(row), flush=True)
        if save is not None:
            save(result())

    rows: list[dict] = []
    # --resume: the rows an earlier run of this protocol measured are kept, not measured again
    earlier = (earlier_results(args.out, protocol, RESUME_KEYS, "--resume")
               if args.resume else None)
    measured = {_row_key(r["section"], r["config"], r["cache_dtype"]): r
                for r in (earlier or {"rows": []})["rows"]}

    def measure(section, config, cache_dtype, compute):
        key = _row_key(section, config, cache_dtype)
        if key in measured:
            rows.append(measured[key])
            return measured[key]
        row = compute()
        keep(row)
        return row
    configs = list(STUDIES[args.study](args.quick))
    calib = mla_ext.calibrate(model, tok, mla_ext.default_calibration_text(), max_length=512,
                              max_sequences=args.calib_sequences, collect_xtx=True,
                              collect_distances=True, collect_attention_sample=True,
                              collect_rope_fit=any(c.needs_rope_fit for _, c in configs),
                              collect_query_gram=any(c.svd == "activation-score"
                                                     for _, c in configs),
                              progress=not args.quiet)
    measure("original", None, "bf16", lambda: {
        "section": "original", "config": None, "ppl": ppl(model),
        "bytes_per_token_layer": mla_ext.kv_cache_bytes_per_token(model, "bf16")
        / model.config.num_hidden_layers, "cache_dtype": "bf16"})

    def converted(section, cfg):
        start = time.time()
        mla = mla_ext.convert_to_mla(copy.deepcopy(model), cfg, calibration=calib, progress=False)
        return {"section": section, "config": cfg.to_dict(), "cache_dtype": None,
                "convert_s": round(time.time() - start, 1),
                "layers": [(p["rope_pairs"], p["latent_dim"])
                           for p in mla.config.mla_ext["layers"]],
                "formats": [layer.self_attn.cache_format.spec
                            if layer.self_attn.cache_format else None
                            for layer in mla.model.layers],
                "rope_heads": [layer.self_attn.num_rope_heads for layer in mla.model.layers],
                "ppl": ppl(mla, through_cache=args.study in THROUGH_CACHE),
                "bytes_per_token_layer": mla_ext.kv_cache_bytes_per_token(mla)
                / model.config.num_hidden_layers}

    best = None
    for section, cfg in configs:
        row = measure(section, cfg.to_dict(), None, lambda: converted(section, cfg))
        if section == "low_rank" and cfg.d_kv == 16 or section == "budget":
            if best is None or row["ppl"]["pydoc"] < best[0]["ppl"]["pydoc"]:
                best = (row, cfg)
    if best is not None and args.study in ("full", "formats"):
        # converted once, and only if a format row is still to measure
        best_model = functools.cache(lambda: mla_ext.convert_to_mla(
            copy.deepcopy(model), best[1], calibration=calib, progress=False))
        for dtype in CACHE_DTYPES:
            measure("cache_dtype", best[1].to_dict(), dtype, lambda: {
                "section": "cache_dtype", "config": best[1].to_dict(), "cache_dtype": dtype,
                "ppl": ppl(best_model(), cache_dtype=dtype),
                "bytes_per_token_layer": mla_ext.kv_cache_bytes_per_token(best_model(), dtype)
                / model.config.num_hidden_layers})
    if save is not None:
        save(result())
    return result()


def _row_key(section: str, config: dict | None, cache_dtype: str | None) -> str:
    return json.dumps([section, config, cache_dtype], sort_keys=True)


def _name(cfg: dict | None) -> str:
    if cfg is None:
        return "original"
    weight = cfg.get("svd_key_weight", 1.0)
    if weight != 1.0:
        return _name({**cfg, "svd_key_weight": 1.0}) + f" key_weight={weight}"
    correction = cfg.get("rope_correction", "none")
    if correction != "none":
        return _name({**cfg, "rope_correction": "none"}) + f" {correction}"
    extras = []
    if cfg.get("cache_formats") not in (None, "none"):
        extras.append(f"formats={cfg['cache_formats']}")
    if cfg.get("rope_sharing", "per-head") != "per-head":
        extras.append(f"rope_sharing={cfg['rope_sharing']}")
    if extras:
        return _name({**cfg, "cache_formats": None, "rope_sharing": "per-head"}) + " " + \
            " ".join(extras)
    if cfg.get("cache_ratio") is not None:
        step = (f" step {cfg.get('rope_pair_step', 4)}" if cfg["rope_pairs"] == "auto" else "")
        return (f"{cfg['rope_strategy']} r={cfg['rope_pairs']}{step} {cfg['svd']} "
                f"cache_ratio={cfg['cache_ratio']}")
    if cfg["d_kv"] is None:  # no low-rank factorization: the SVD setting plays no part
        return f"{cfg['rope_strategy']} r={cfg['rope_pairs']} d_kv=full"
    return f"{cfg['rope_strategy']} r={cfg['rope_pairs']} {cfg['svd']} d_kv={cfg['d_kv']}"


def _fmt(row: dict) -> str:
    ppl = "  ".join(f"{k} {v:10.2f}" for k, v in row["ppl"].items())
    return f"{row['section']:13s} {_name(row['config']):40s} {row['cache_dtype'] or '':5s} {ppl}"


def render(data: dict) -> str:
    rows = data["rows"]
    texts = list(rows[0]["ppl"])
    orig = rows[0]["ppl"]
    head = "| configuration | cache B/token/layer | " + " | ".join(
        f"ppl {t} (x original)" for t in texts) + " |\n|---|---|" + "---|" * len(texts) + "\n"

    def line(r):
        cells = " | ".join(f"{r['ppl'][t]:.2f} ({r['ppl'][t] / orig[t]:.1f}x)" for t in texts)
        label = _name(r["config"]) + (f", {r['cache_dtype']} cache" if r["cache_dtype"] and
                                      r["section"] == "cache_dtype" else "")
        return f"| {label} | {r['bytes_per_token_layer']:.0f} | {cells} |\n"

    proto = data["protocol"]
    out = ["# Quality results (training-free)\n\n",
           f"Model SmolLM2-135M-Instruct (fp32), perplexity with context {proto['context']} and "
           f"stride {proto['stride']}; texts: " + ", ".join(f"{k}: {v}" for k, v in
                                                             proto["texts"].items()) + "; "
           f"calibration: {proto['calibration']}.\n",
           f"Produced by `{proto['command']}` on {data['metadata'].get('gpu') or 'CPU'} "
           f"({data['metadata']['timestamp']}, commit {data['metadata']['git_commit']}); "
           "rendered by `python studies/quality_study.py --render`.\n\n"]
    titles = {"original": "Original model", "partial_rope": "1. Partial RoPE only (full-rank latent)",
              "low_rank": "2. Partial RoPE r = 4 + low-rank keys/values",
              "budget": "2b. A cache budget of -81.25 % spread over the layers (ours)",
              "bytes": "A cache budget in stored bytes: formats and a shared RoPE key per layer "
                       "(through the LatentCache in each layer's formats, 64-token chunks)",
              "cache_dtype": "3. Cache formats on the best -81.25 % configuration (through the "
                             "LatentCache, 64-token chunks)"}
    for section, title in titles.items():
        part = [r for r in rows if r["section"] == section]
        if part:
            out.append(f"## {title}\n\n{head}" + "".join(line(r) for r in part) + "\n")
    return "".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(DEFAULT_JSON), help="JSON output (default %(default)s)")
    p.add_argument("--render", action="store_true",
                   help="only render --out as markdown tables (to stdout, or --doc)")
    p.add_argument("--doc", default=None,
                   help="file that --render writes (default: stdout; docs/results.md quotes "
                        "the tables by hand, so writing it would replace its other sections)")
    p.add_argument("--device", default=None)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=None, help="pydoc tokens (default: all)")
    p.add_argument("--shakespeare", default=None, help="path of tinyshakespeare.txt")
    p.add_argument("--shakespeare-tokens", type=int, default=65536)
    p.add_argument("--calib-sequences", type=int, default=64)
    p.add_argument("--quick", action="store_true", help="a few configurations (smoke test)")
    p.add_argument("--study", choices=sorted(STUDIES), default="full",
                   help="full: the ablation tables (default); rope: the RoPE selections at "
                        "-81.25 %%; formats: the cache formats of the default conversion; "
                        "correction: the fitted RoPE correction (see above)")
    p.add_argument("--resume", action="store_true",
                   help="keep the rows --out already has (same context, calibration and texts) "
                        "and measure only the others: a run cut by a time limit continues")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.render:
        tables = render(json.loads(Path(args.out).read_text()))
        if args.doc is None:
            print(tables, end="")
        else:
            Path(args.doc).write_text(tables)
            print(f"wrote {args.doc}")
        return
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(data):
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1))
        tmp.replace(out)

    run(args, save=save, argv=sys.argv[1:] if argv is None else argv)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
