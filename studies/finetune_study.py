"""Recovery fine-tuning study on the default model, SmolLM2-135M-Instruct.

Each configuration is fine-tuned with the project's own loop (``mla_ext.train.finetune``, the
paper's recipe) on the same tokens, and its held-out perplexity is measured against the tokens
seen, before the first step and after every --eval-every steps:

  original       the unconverted model (the paper's baseline: the same tokens, no conversion)
  paper_dkv{8,16,32}   the paper's conversion: 2-norm partial RoPE r = 4, joint weight SVD
  ours_cache{8,16,32}  the project's default method (``mla_ext.MLAConfig()``: rotation-aware
                       RoPE selection, activation-aware SVD, RoPE pairs and latent width per
                       layer under a cache budget) at the same cache bytes as
                       paper_dkv{8,16,32}: cache_ratio 0.125, 0.1875 (the default), 0.3125

    python studies/finetune_study.py                       # all 7, ~7 minutes on one H200
    python studies/finetune_study.py --configs original,ours_cache16 --tokens 2M
    python studies/finetune_study.py --shakespeare /data/tinyshakespeare.txt --time-limit 400
    python studies/finetune_study.py --configs paper_dkv8,paper_dkv16 --append   # add two rows

Training data: the default corpus (the standard library's *.py files + the calibration part of
pydoc_data.topics), packed once into the memory-mapped shard format and shared by every run.
Evaluation: ``mla_ext.perplexity`` (fp32, --context tokens, stride = context) on the held-out
part of pydoc_data.topics and on tinyshakespeare.txt when present (its first
--shakespeare-tokens tokens). One calibration pass (--calib-sequences x 512 tokens) serves every
conversion. The wall-clock --time-limit is shared out among the runs still to do; a run that
reaches its share stops after an evaluation, and the JSON (--out) is rewritten after every
evaluation point, so a cut run keeps what it measured. A PNG with one curve per configuration
is written next to the JSON.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

T_START = time.monotonic()  # the --time-limit counts from here (imports included)
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import earlier_results, eval_batch_size, write_results  # noqa: E402
from studies import RESULTS, add_evaluation_args, check_evaluation_args  # noqa: E402
from studies.quality_study import SHAKESPEARE_CANDIDATES  # noqa: E402
from mla_ext.train.cli import count_arg, positive_int, positive_number  # noqa: E402

D_KVS = (8, 16, 32)
PAPER_R = 4
CONFIG_NAMES = (("original",) + tuple(f"paper_dkv{d}" for d in D_KVS)
                + tuple(f"ours_cache{d}" for d in D_KVS))
DEFAULT_OUT = RESULTS / "finetune_smollm2.json"
# What rows appended into one JSON (--append) must share.
PROTOCOL_KEYS = ("model", "train", "eval", "calibration")
# Stop a run this many seconds before its share ends on top of one evaluation and one step.
SLACK_S = 2.0


def study_config(name: str, head_dim: int):
    """The MLAConfig of a study configuration (None for the original model).

    ``ours_cache{d}`` is the default method at the cache size of ``paper_dkv{d}``: a budgeted
    default gets the cache ratio ``(2 r + d_kv) / (2 d_h)`` of the paper's config (d = 16 is
    then exactly ``MLAConfig()``, -81.25 %); a fixed one keeps its RoPE pairs and the latent
    width that keeps ``2 r + d_kv`` per KV head equal."""
    from mla_ext import MLAConfig

    if name == "original":
        return None
    method, d = name.split("_dkv") if name.startswith("paper") else name.split("_cache")
    d = int(d)
    if method == "paper":
        return MLAConfig(rope_strategy="2-norm", rope_pairs=PAPER_R, d_kv=d, svd="joint",
                         rope_correction="none")
    default = MLAConfig()
    if default.cache_ratio is not None or not isinstance(default.rope_pairs, int):
        return dataclasses.replace(default, cache_ratio=(2 * PAPER_R + d) / (2 * head_dim))
    d_kv = d + 2 * (PAPER_R - default.rope_pairs)
    if d_kv < 1:
        raise ValueError(f"{name}: the default's r = {default.rope_pairs} leaves no latent "
                         f"width at the cache of paper_dkv{d}")
    return dataclasses.replace(default, d_kv=d_kv)


def parse_configs(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIG_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown configuration(s) {unknown or [text]}; choose from {', '.join(CONFIG_NAMES)}")
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"a configuration is named twice in {text!r}")
    return names


class Study:
    """The rows of the JSON (one per configuration) and the wall-clock budget they share."""

    def __init__(self, args, names, extra, tokenizer):
        self.args, self.extra, self.tokenizer = args, extra, tokenizer
        self.out = Path(args.out)
        self.t0 = T_START
        self.deadline = self.t0 + args.time_limit
        self.rows = [{"config": n, "status": "not run", "points": []} for n in names]
        self.kept: list[dict] = []  # --append: the other configurations' rows in --out

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def check_appendable(self):
        """With --append, keep the rows of the other configurations in --out, refusing rows
        measured under another protocol (training tokens, data, evaluation, calibration)."""
        now = self.extra["protocol"]
        earlier = (earlier_results(self.out, now, PROTOCOL_KEYS, "--append")
                   if self.args.append else None)
        if earlier is None:
            return
        names = {r["config"] for r in self.rows}
        self.kept = [r for r in earlier["rows"] if r["config"] not in names]
        now["command"] = [*_as_list(earlier["protocol"].get("command")), now["command"]]

    def all_rows(self) -> list[dict]:
        return sorted(self.kept + self.rows, key=lambda r: CONFIG_NAMES.index(r["config"]))

    def save(self):
        self.extra["elapsed_s"] = round(time.monotonic() - self.t0, 1)
        write_results(self.out.stem, self.all_rows(), self.extra, out_dir=self.out.parent)


def _as_list(command) -> list[str]:
    return [] if command is None else [command] if isinstance(command, str) else list(command)


def run(args) -> Path:
    """The whole study; returns the JSON path. Work files go to --work or a temporary
    directory removed at the end."""
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        return _study(args, Path(args.work))
    with tempfile.TemporaryDirectory(prefix="finetune_study.") as work:
        return _study(args, Path(work))


def _study(args, work: Path) -> Path:
    import torch

    import mla_ext
    from mla_ext.data import load_texts
    from mla_ext.train import PackedDataset, pack
    from mla_ext.train.data import is_packed

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tok = mla_ext.load_default_model(dtype=torch.float32, device=device)
    study = Study(args, args.configs, {}, tok)
    limit = model.config.max_position_embeddings
    if args.seq_len > limit:
        raise SystemExit(f"--seq-len {args.seq_len} exceeds the model's {limit} positions")
    if args.context > limit:
        raise SystemExit(f"--context {args.context} exceeds the model's {limit} positions")
    texts = {"pydoc": mla_ext.default_evaluation_text()}
    limits = {"pydoc": args.eval_tokens, "shakespeare": args.shakespeare_tokens}
    shakespeare = args.shakespeare or next((p for p in SHAKESPEARE_CANDIDATES if p.exists()),
                                           None)
    if shakespeare is not None:
        texts["shakespeare"] = load_texts(shakespeare)[0]
    else:
        print("no tinyshakespeare.txt found (give --shakespeare PATH): pydoc only", flush=True)

    steps = args.tokens // (args.seq_len * args.batch_size)
    eval_every = args.eval_every or -(-steps // 4)  # 5 points: 0, 1/4 .. 3/4, the end
    data = args.data
    if not is_packed(data):
        data = pack(data, tok, work / "data", args.seq_len, max_sequences=steps * args.batch_size,
                    overwrite=True, progress=not args.quiet).path
    packed = PackedDataset(data)
    head_dim = model.config.head_dim
    cfgs = {n: study_config(n, head_dim) for n in args.configs}
    study.extra.update({
        "protocol": {
            "model": "SmolLM2-135M-Instruct (fp32 master weights)",
            "train": {"tokens_per_run": steps * args.seq_len * args.batch_size, "steps": steps,
                      "seq_len": args.seq_len, "batch_size": args.batch_size, "lr": args.lr,
                      "recipe": "mla_ext.train defaults (AdamW 0.9/0.95, wd 0.01, warmup 6 %, "
                                "1-sqrt decay over the last 15 %, clip 1.0, bf16 autocast on "
                                "GPU)",
                      "data": packed.index["source"], "packed_sequences": len(packed),
                      "epochs": round(steps * args.batch_size / len(packed), 2)},
            "eval": {"context": args.context, "stride": args.context, "every_steps": eval_every,
                     "texts": {k: (str(shakespeare) if k == "shakespeare" else
                                   "held-out part of pydoc_data.topics")
                               + (f", first {limits[k]} tokens" if limits[k] else ", all tokens")
                               for k in texts}},
            "calibration": f"{args.calib_sequences} x 512 tokens of the calibration part of "
                           "pydoc_data.topics",
            "time_limit_s": args.time_limit, "device": str(device),
            "command": "python studies/finetune_study.py " + " ".join(args.argv)},
    })
    study.check_appendable()

    def ppl(m) -> dict:
        return {k: mla_ext.perplexity(m, tok, text, context=args.context, stride=args.context,
                                      max_tokens=limits[k], progress=False,
                                      batch_size=eval_batch_size(device))
                for k, text in texts.items()}

    calib = None
    needs = [c for c in cfgs.values() if c is not None and c.needs_calibration]
    if needs:
        calib = mla_ext.calibrate(
            model, tok, mla_ext.default_calibration_text(), max_length=512,
            max_sequences=args.calib_sequences, progress=not args.quiet,
            **{name: any(c.calibration_options()[name] for c in needs)
               for name in needs[0].calibration_options()})
    print(f"setup {time.monotonic() - study.t0:.1f} s; {steps} steps x "
          f"{args.seq_len * args.batch_size} tokens per run, evaluation every {eval_every} steps",
          flush=True)

    for i, row in enumerate(study.rows):
        share = study.left() / (len(study.rows) - i)
        cfg = cfgs[row["config"]]
        row.update({"method": row["config"].split("_")[0], "d_kv": cfg and cfg.d_kv,
                    "rope_pairs": cfg and cfg.rope_pairs, "mla_config": cfg and cfg.to_dict()})
        # what a run costs besides its steps, as measured on the earlier ones: conversion and
        # two evaluations (before the first step and where it stops)
        overhead = max([r["timing"]["convert_s"] + 2 * r["timing"]["first_eval_s"]
                        for r in study.rows[:i] if "timing" in r], default=0.0)
        if share <= overhead + SLACK_S:
            row["status"] = "not run (time limit)"
            study.save()
            continue
        m = copy.deepcopy(model)
        _run_config(study, row, m, cfg, calib, data, steps, eval_every, ppl, device,
                    time.monotonic() + share, work)
        del m
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    study.save()
    png = plot(study.all_rows(), study.out.with_suffix(".png"))
    print(f"wrote {study.out} and {png} in {time.monotonic() - study.t0:.1f} s")
    return study.out


def _run_config(study, row, model, cfg, calib, data, steps, eval_every, ppl, device, run_end,
                work):
    """Convert ``model`` by ``cfg`` (None: keep it), fine-tune it until ``steps`` or
    ``run_end`` (monotonic seconds), filling ``row`` and saving the JSON at every point."""
    import mla_ext
    from mla_ext.train import TrainConfig, finetune

    args, name = study.args, row["config"]
    t0 = time.monotonic()
    if cfg is not None:
        mla_ext.convert_to_mla(model, cfg, calibration=calib, progress=False)
    # stored bytes: a converted model's own cache formats, the original's bf16 K/V
    row["cache_bytes_per_token_layer"] = (mla_ext.kv_cache_bytes_per_token(model)
                                          / model.config.num_hidden_layers)
    timing = row["timing"] = {"convert_s": round(time.monotonic() - t0, 2), "eval_s": 0.0}
    last_eval_s = 0.0

    def point(step, tokens, train_loss):
        nonlocal last_eval_s
        t = time.monotonic()
        row["points"].append({"step": step, "tokens": tokens, "train_loss": train_loss,
                              "ppl": ppl(model)})
        last_eval_s = time.monotonic() - t
        timing.setdefault("first_eval_s", round(last_eval_s, 2))
        timing["eval_s"] = round(timing["eval_s"] + last_eval_s, 2)
        study.save()
        print(f"  {name:12s} step {step:5d} tokens {tokens:>11,d}  " + "  ".join(
            f"ppl {k} {v:10.2f}" for k, v in row["points"][-1]["ppl"].items()), flush=True)

    def on_step(record, _model):
        mean_step_s = record["elapsed_s"] / record["step"]
        last = record["step"] == steps
        # stop while one more evaluation still fits in this run's share of the time
        out_of_time = time.monotonic() + last_eval_s + mean_step_s + SLACK_S >= run_end
        if last or out_of_time or record["step"] % eval_every == 0:
            point(record["step"], record["tokens"], record["loss"])
        return out_of_time and not last

    row["status"] = "running"
    point(0, 0, None)
    history = finetune(model, study.tokenizer, data, TrainConfig(
        steps=steps, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
        device=str(device), save_every=0, save_at_end=False, overwrite=True, plot=False,
        progress=not args.quiet), work / name, on_step=on_step)
    rates = [r["tokens_per_s"] for r in history]
    rates = rates[2:] or rates  # the first steps pay for kernel selection and allocation
    timing.update({"train_s": round(history[-1]["elapsed_s"], 2),
                   "wall_s": round(time.monotonic() - t0, 2), "steps": len(history),
                   "tokens": history[-1]["tokens"],
                   "tokens_per_s_median": round(statistics.median(rates))})
    row["status"] = "done" if len(history) == steps else "stopped (time limit)"
    study.save()
    print(f"{name}: {row['status']}, {timing['steps']} steps, {timing['tokens']:,d} tokens, "
          f"training {timing['train_s']:.1f} s ({timing['tokens_per_s_median']:,d} tokens/s "
          f"median), convert {timing['convert_s']:.1f} s, eval {timing['eval_s']:.1f} s, wall "
          f"{timing['wall_s']:.1f} s", flush=True)


def plot(rows: list[dict], path: Path) -> Path:
    """Perplexity against tokens seen, one panel per evaluation text, one line per config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = sorted({k for r in rows for p in r["points"] for k in p["ppl"]},
                   key=lambda k: k != "pydoc")
    fig, axes = plt.subplots(1, max(1, len(texts)), figsize=(6.5 * max(1, len(texts)), 4.5),
                             squeeze=False)
    for ax, text in zip(axes[0], texts):
        for r in rows:
            pts = [p for p in r["points"] if text in p["ppl"]]
            if pts:
                style = "-" if r["config"].startswith("ours") else (
                    "--" if r["config"].startswith("paper") else ":")
                ax.plot([p["tokens"] / 1e6 for p in pts], [p["ppl"][text] for p in pts],
                        style, marker="o", ms=3, label=r["config"])
        ax.set_yscale("log")
        ax.set_xlabel("tokens seen (millions)")
        ax.set_ylabel(f"held-out perplexity ({text})")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M recovery fine-tuning: perplexity vs tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", type=parse_configs, default=list(CONFIG_NAMES),
                   help=f"comma-separated subset of {','.join(CONFIG_NAMES)} (default: all)")
    p.add_argument("--tokens", type=count_arg, default=4_000_000,
                   help="training tokens per run, e.g. 4M (default 4M); the run takes "
                        "tokens // (seq-len x batch-size) steps")
    p.add_argument("--seq-len", type=positive_int, default=2048,
                   help="tokens per training sequence (default 2048)")
    p.add_argument("--batch-size", type=positive_int, default=16,
                   help="sequences per optimizer step (default 16)")
    p.add_argument("--lr", type=positive_number, default=1e-4,
                   help="peak learning rate (default 1e-4)")
    p.add_argument("--eval-every", type=positive_int, default=None,
                   help="evaluate after every N steps (default: a quarter of the steps); also "
                        "before the first step and after the last")
    p.add_argument("--time-limit", type=positive_number, default=420.0,
                   help="wall-clock seconds for the whole study, setup included (default 420)")
    p.add_argument("--out", default=str(DEFAULT_OUT),
                   help="JSON output; the PNG gets the same name (default %(default)s)")
    p.add_argument("--append", action="store_true",
                   help="keep the rows of the other configurations already in --out (measured "
                        "with the same tokens, data, evaluation and calibration): one table "
                        "from several shorter runs")
    p.add_argument("--data", default="default",
                   help="training data: 'default', a text file/directory/.jsonl, or a packed "
                        "directory (mla-ext pack) of this --seq-len")
    p.add_argument("--work", default=None,
                   help="directory for the packed data and the run logs (default: a new "
                        "temporary directory)")
    add_evaluation_args(p)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.tokens < args.seq_len * args.batch_size:
        p.error(f"--tokens {args.tokens} is less than one step of --seq-len x --batch-size = "
                f"{args.seq_len * args.batch_size} tokens")
    check_evaluation_args(p, args)
    return args


def main(argv=None):
    run(parse_args(argv))


if __name__ == "__main__":
    main()
