"""FSDP2 recovery fine-tune of a Llama-2-7B-shaped MHA2MLA model, with an exact-resume check.
Run it under torchrun, one process per GPU:

    torchrun --standalone --nproc_per_node 2 studies/finetune_fsdp.py               # full shape
    torchrun --standalone --nproc_per_node 1 studies/finetune_fsdp.py --layers 16   # one H200

What runs:
 1. every rank builds the same random model (same seed) on its device: the Llama-2-7B shape
    (--layers 32, --hidden 4096, --heads 32 = --kv-heads, --head-dim 128, --intermediate 11008;
    the vocabulary is the default tokenizer's, 49,152, since the data is real text), made a
    converted model directly: the project's planner and MLA modules (``plan_layers``,
    ``build_mla_structure``) with uniform partial RoPE --rope-pairs 8 and --d-kv 16 (D_c 512),
    weights drawn N(0, 0.02) (an SVD of random weights would only cost time);
 2. the uninterrupted run: ``mla_ext.train.finetune`` with distributed="fsdp" (FSDP2
    ``fully_shard`` per decoder layer), bf16 autocast, activation checkpointing, fp32 master
    weights and AdamW state, --steps steps on the default corpus packed in the memory-mapped
    shard format, writing its one checkpoint after --checkpoint-step;
 3. the restart: a new model (another seed, so only the checkpoint can give it the right
    weights) and a new optimizer resume from that checkpoint and run the remaining steps;
 4. the check: each resumed step's loss equals the uninterrupted run's within --rtol.

Reported in studies/results/finetune_fsdp_<tag>.json (tag: <processes>x<device>, e.g. 2xh200):
the losses of both runs, tokens per second (global and per GPU, median after --warmup-steps),
peak GPU memory per rank (allocated and reserved) for each run, the checkpoint's size and
save / load times, parameter counts and the exact shape that ran. The exit status is 1 when
the resume check fails (the JSON is written first).

Memory: fp32 parameters, gradients and two AdamW moments are 16 bytes per parameter, split
over the ranks; the full shape (about 6.1 B parameters) needs about 100 GB of that alone, which
fits two H200s but not one: on one GPU use --layers 16 (about 3.2 B). The checkpoint holds the
full model and optimizer state (12 bytes per parameter) gathered on rank 0; the script checks
the free disk space of --work before building anything.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import write_results  # noqa: E402
from studies import RESULTS  # noqa: E402
from mla_ext.train.cli import positive_int, positive_number  # noqa: E402

GB = 1e9
# bytes per parameter: fp32 weights + gradients + two AdamW moments (sharded), and a checkpoint
# (weights + moments, gathered)
STATE_BYTES, CHECKPOINT_BYTES = 16, 12


def llama_config(args, vocab_size: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=args.hidden,
                       intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                       num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                       head_dim=args.head_dim, max_position_embeddings=max(4096, args.seq_len),
                       rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False,
                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0})


def build_model(args, vocab_size: int, seed: int, device):
    """The random converted model, built on ``device`` (identical on every rank for a seed)."""
    import torch
    from transformers import LlamaForCausalLM

    from mla_ext import MLAConfig
    from mla_ext.convert import select_rope_pairs
    from mla_ext.modeling import MLAAttention
    from mla_ext.modeling.patch import CONFIG_KEY, build_mla_structure, plan_layers

    config = llama_config(args, vocab_size)
    mla = MLAConfig(rope_strategy="uniform", rope_pairs=args.rope_pairs, d_kv=args.d_kv,
                    svd="joint")
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(config)
        plan = plan_layers(model, mla)
        build_mla_structure(model, plan)
    pairs = select_rope_pairs("uniform", args.rope_pairs, head_dim=args.head_dim,
                              num_heads=args.heads, num_kv_heads=args.kv_heads)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, MLAAttention):
                for lin in (module.q_proj, module.kr_proj, module.kv_down, module.k_up,
                            module.v_up, module.o_proj):
                    lin.weight.normal_(0.0, config.initializer_range)
                module.rope_pairs.copy_(pairs)
    setattr(model.config, CONFIG_KEY, {"mla_config": mla.to_dict(), "layers": plan})
    return model


def parameter_counts(args, vocab_size: int) -> dict:
    """Parameters of the model ``build_model`` makes, computed from the shape (no allocation)."""
    d, h, h_kv, d_h = args.hidden, args.heads, args.kv_heads, args.head_dim
    d_r, d_c = 2 * args.rope_pairs, args.d_kv * args.kv_heads
    attention = d * (h * d_h + h_kv * d_r + d_c) + d_c * h_kv * (2 * d_h - d_r) + h * d_h * d
    layer = attention + 3 * d * args.intermediate + 2 * d
    embeddings = 2 * vocab_size * d
    return {"total": args.layers * layer + embeddings + d, "per_layer": layer,
            "attention_per_layer": attention, "embeddings": embeddings}


def _tag(world: int, device) -> str:
    import torch

    if device.type != "cuda":
        return f"{world}x{device.type}"
    name = torch.cuda.get_device_name(device).lower()
    for known in ("h200", "h100", "a100", "l40s", "b200"):
        if known in name:
            return f"{world}x{known}"
    return f"{world}x" + "".join(c for c in name.split()[-1] if c.isalnum())


def _peaks(device) -> dict:
    import resource

    import torch

    peak = {"host_rss_peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB}
    if device.type == "cuda":
        peak.update({"peak_allocated_gb": torch.cuda.max_memory_allocated(device) / GB,
                     "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / GB})
        torch.cuda.reset_peak_memory_stats(device)
    return {k: round(v, 2) for k, v in peak.items()}


class StepClock:
    """``on_step`` of finetune: the wall time at the end of every step, to separate the time
    spent between steps (checkpoint writing, resume loading) from the steps themselves."""

    def __init__(self):
        self.ends: dict[int, float] = {}

    def __call__(self, record, _model):
        self.ends[record["step"]] = time.monotonic()
        return False


def _gap(clock: StepClock, history: list[dict], step: int, since: float | None = None) -> float:
    """Seconds before ``step`` that were not the step itself: after the previous step's end
    (or ``since``) until ``step`` began."""
    by_step = {r["step"]: r for r in history}
    dt = by_step[step]["elapsed_s"] - by_step[step - 1]["elapsed_s"] if step - 1 in by_step \
        else by_step[step]["elapsed_s"]
    start = clock.ends[step - 1] if since is None else since
    return clock.ends[step] - dt - start


def run(args) -> dict:
    import torch
    import torch.distributed as dist

    from mla_ext.train import TrainConfig, finetune
    from mla_ext.train.checkpoint import CHECKPOINTS, step_dir_name
    from mla_ext.train.cli import load_tokenizer

    t_start = time.monotonic()
    local_rank = int(os.environ["LOCAL_RANK"])
    if args.device:
        device = torch.device(args.device)
    else:
        device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    main = rank == 0
    say = print if main else (lambda *a, **k: None)
    work, made_work = args.work, False
    try:
        tokenizer = load_tokenizer("default")
        vocab = len(tokenizer)
        counts = parameter_counts(args, vocab)
        ckpt_bytes = CHECKPOINT_BYTES * counts["total"]
        box = [None]
        if main:
            if work is None:  # on the checkout's disk (/tmp may be memory), git-ignored
                (ROOT / "runs").mkdir(exist_ok=True)
                work, made_work = tempfile.mkdtemp(prefix="finetune_fsdp.", dir=ROOT / "runs"), True
            Path(work).mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(work).free
            box = [{"work": str(work), "free": free, "error": None if ckpt_bytes < 0.9 * free
                    else f"the checkpoint needs about {ckpt_bytes / GB:.0f} GB and --work "
                         f"{work} has {free / GB:.0f} GB free: pass a smaller --layers or a "
                         "--work on a larger disk"}]
        dist.broadcast_object_list(box, src=0)
        if box[0]["error"]:
            raise SystemExit(box[0]["error"])
        work = Path(box[0]["work"])
        tag = args.tag or _tag(world, device)
        out = Path(args.out) if args.out else RESULTS / f"finetune_fsdp_{tag}.json"
        state_gb = STATE_BYTES * counts["total"] / world / GB
        capacity = torch.cuda.get_device_properties(device).total_memory / GB \
            if device.type == "cuda" else None
        say(f"{world} process(es) on {device.type}; {counts['total'] / 1e9:.2f} B parameters "
            f"({args.layers} layers); fp32 weights+grads+AdamW {state_gb:.1f} GB per rank"
            + (f" of {capacity:.0f} GB" if capacity else "")
            + f"; checkpoint ~{ckpt_bytes / GB:.1f} GB in {work}", flush=True)
        if capacity and state_gb > 0.85 * capacity:
            say(f"warning: the training state alone is {state_gb:.0f} GB per rank, near or over "
                f"the {capacity:.0f} GB of the GPU: expect an out-of-memory error; use more "
                "processes or fewer --layers", flush=True)

        global_batch = args.batch_size * args.grad_accum * world
        cfg = dict(steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size,
                   grad_accum=args.grad_accum, lr=args.lr, distributed="fsdp",
                   gradient_checkpointing=not args.no_activation_checkpointing,
                   precision="auto", device=str(device), save_at_end=False, keep=0,
                   max_sequences=args.steps * global_batch, plot=False,
                   progress=not args.quiet)

        t = time.monotonic()
        model = build_model(args, vocab, seed=args.seed, device=device)
        build_s = time.monotonic() - t
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        say(f"built in {build_s:.1f} s; uninterrupted run of {args.steps} steps "
            f"(checkpoint after step {args.checkpoint_step})", flush=True)
        clock = StepClock()
        t = time.monotonic()
        straight = finetune(model, tokenizer, "default",
                            TrainConfig(save_every=args.checkpoint_step, **cfg), work,
                            on_step=clock)
        straight_s = time.monotonic() - t
        peaks_straight = _peaks(device)
        save_s = _gap(clock, straight, args.checkpoint_step + 1)
        first_s = _gap(clock, straight, 1, since=t)  # packing + sharding + the first step's set-up
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

        ckpt = work / CHECKPOINTS / step_dir_name(args.checkpoint_step)
        size = sum(f.stat().st_size for f in ckpt.iterdir()) if main else None
        say(f"restart: a new model resumes from {ckpt}", flush=True)
        model = build_model(args, vocab, seed=args.seed + 1, device=device)
        clock = StepClock()
        t = time.monotonic()
        resumed = finetune(model, tokenizer, "default",
                           TrainConfig(save_every=0, resume=str(ckpt), **cfg), work,
                           on_step=clock)
        resumed_s = time.monotonic() - t
        peaks_resumed = _peaks(device)
        load_s = _gap(clock, resumed, args.checkpoint_step + 1, since=t)
        del model

        per_rank = [None] * world
        dist.all_gather_object(per_rank, {"rank": rank, "device": str(device),
                                          "uninterrupted": peaks_straight,
                                          "resumed": peaks_resumed})
        result = None
        if main:
            result = _report(args, out, tag, world, device, vocab, counts, straight, resumed,
                             per_rank, size, {
                                 "build_s": build_s, "uninterrupted_run_s": straight_s,
                                 "first_step_setup_s": first_s, "checkpoint_save_s": save_s,
                                 "resumed_run_s": resumed_s, "resume_load_s": load_s,
                                 "total_s": time.monotonic() - t_start})
        dist.barrier()
        return result
    finally:
        if made_work:
            shutil.rmtree(work, ignore_errors=True)
        if dist.is_initialized():
            dist.destroy_process_group()


def _report(args, out, tag, world, device, vocab, counts, straight, resumed, per_rank,
            ckpt_size, timing) -> dict:
    import torch

    k = args.checkpoint_step
    by_step = {r["step"]: r for r in resumed}
    rows, diffs = [], []
    for r in straight:
        row = {"step": r["step"], "loss": r["loss"], "lr": r["lr"], "grad_norm": r["grad_norm"],
               "tokens": r["tokens"], "tokens_per_s": r["tokens_per_s"]}
        if r["step"] > k:
            other = by_step[r["step"]]["loss"]
            row["loss_resumed"] = other
            row["rel_diff"] = abs(other - r["loss"]) / abs(r["loss"])
            diffs.append(row["rel_diff"])
        rows.append(row)
    rates = [r["tokens_per_s"] for r in straight[args.warmup_steps:] if r["step"] != k + 1]
    rate = statistics.median(rates or [r["tokens_per_s"] for r in straight])
    losses = [r["loss"] for r in straight]
    n = max(1, min(5, len(losses) // 3))
    non_embedding = counts["total"] - counts["embeddings"]
    passed = max(diffs) <= args.rtol
    result = {
        "tag": tag,
        "command": (f"torchrun --standalone --nproc_per_node {world} studies/finetune_fsdp.py "
                    + " ".join(args.argv)).strip(),
        "what_ran": {
            "shape": {"layers": args.layers, "hidden": args.hidden, "heads": args.heads,
                      "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                      "intermediate": args.intermediate, "vocab": vocab,
                      "mla": {"rope_strategy": "uniform", "rope_pairs": args.rope_pairs,
                              "d_kv": args.d_kv, "D_c": args.d_kv * args.kv_heads},
                      "full_llama2_7b_shape": args.layers == 32 and args.hidden == 4096
                      and args.heads == 32 and args.kv_heads == 32 and args.head_dim == 128
                      and args.intermediate == 11008},
            "weights": "random N(0, 0.02), built directly as a converted model",
            "parameters": counts, "processes": world, "device": str(device.type),
            "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
            "engine": "FSDP2 fully_shard per decoder layer + root (mla_ext.train)",
            "precision": "bf16 autocast, fp32 master weights and AdamW state"
            if device.type == "cuda" else "fp32",
            "activation_checkpointing": not args.no_activation_checkpointing,
            "data": "default corpus (stdlib *.py + pydoc_data.topics calibration part), packed",
            "steps": args.steps, "checkpoint_step": k, "seq_len": args.seq_len,
            "batch_size_per_rank": args.batch_size, "grad_accum": args.grad_accum,
            "global_batch_tokens": args.batch_size * args.grad_accum * world * args.seq_len,
            "lr": args.lr},
        "throughput": {
            "tokens_per_s": round(rate), "tokens_per_s_per_gpu": round(rate / world),
            "model_tflops_per_gpu_6N": round(6 * non_embedding * rate / world / 1e12, 1),
            "measured_over": f"median of steps {args.warmup_steps + 1}..{args.steps} of the "
                             f"uninterrupted run, step {k + 1} (after the checkpoint) excluded"},
        "memory_per_rank": per_rank,
        "checkpoint": {"step": k, "bytes": ckpt_size,
                       "save_s": round(timing["checkpoint_save_s"], 1),
                       "resume_load_s": round(timing["resume_load_s"], 1)},
        "resume_check": {"steps": f"{k + 1}..{args.steps}", "rtol": args.rtol,
                         "max_rel_diff": max(diffs),
                         "first_resumed_step_equal": by_step[k + 1]["loss"] == straight[k]["loss"],
                         "passed": passed},
        "loss": {"first": losses[0], "last": losses[-1],
                 "decreased": sum(losses[-n:]) / n < sum(losses[:n]) / n},
        "timing_s": {key: round(v, 1) for key, v in timing.items()},
    }
    path = write_results(out.stem, rows, result, out_dir=out.parent)
    print(json.dumps({k: result[k] for k in ("throughput", "memory_per_rank", "checkpoint",
                                             "resume_check", "loss", "timing_s")}, indent=1))
    print(f"{'PASSED' if passed else 'FAILED'}: resumed losses within rtol {args.rtol} "
          f"(max {max(diffs):.2e}); wrote {path}", flush=True)
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    shape = p.add_argument_group("model shape (default: Llama-2-7B with MHA2MLA d_kv 16, r 8)")
    shape.add_argument("--layers", type=positive_int, default=32, help="decoder layers (32)")
    shape.add_argument("--hidden", type=positive_int, default=4096, help="hidden size d (4096)")
    shape.add_argument("--heads", type=positive_int, default=32, help="query heads (32)")
    shape.add_argument("--kv-heads", type=positive_int, default=None,
                       help="key/value heads (default: --heads, i.e. MHA)")
    shape.add_argument("--head-dim", type=positive_int, default=None,
                       help="head dim (default: hidden / heads)")
    shape.add_argument("--intermediate", type=positive_int, default=11008,
                       help="MLP width (11008)")
    shape.add_argument("--d-kv", type=positive_int, default=16,
                       help="latent width per KV head (16: D_c = 16 x kv-heads)")
    shape.add_argument("--rope-pairs", type=positive_int, default=8,
                       help="RoPE frequency pairs kept per KV head (8)")
    run_ = p.add_argument_group("run")
    run_.add_argument("--steps", type=positive_int, default=30, help="optimizer steps (30)")
    run_.add_argument("--checkpoint-step", type=positive_int, default=None,
                      help="the uninterrupted run's one checkpoint, after this step; the restart "
                           "resumes from it (default 2/3 of --steps; must be more than half "
                           "of --steps and less than --steps)")
    run_.add_argument("--seq-len", type=positive_int, default=2048, help="tokens per sequence")
    run_.add_argument("--batch-size", type=positive_int, default=4,
                      help="sequences per micro-batch per rank (4)")
    run_.add_argument("--grad-accum", type=positive_int, default=1,
                      help="micro-batches per step per rank (1)")
    run_.add_argument("--lr", type=positive_number, default=1e-4, help="peak learning rate (1e-4)")
    run_.add_argument("--seed", type=int, default=0, help="weight init and data order seed")
    run_.add_argument("--no-activation-checkpointing", action="store_true",
                      help="keep activations instead of recomputing them")
    run_.add_argument("--rtol", type=positive_number, default=1e-3,
                      help="tolerance of resumed vs uninterrupted losses (1e-3: bf16 GPU "
                           "kernels may differ in their last bits from run to run)")
    run_.add_argument("--warmup-steps", type=int, default=3,
                      help="first steps left out of the tokens/s median (3)")
    run_.add_argument("--device", default=None,
                      help="default: cuda:LOCAL_RANK if CUDA is present, else cpu (gloo)")
    out = p.add_argument_group("output")
    out.add_argument("--tag", default=None,
                     help="name of the result: finetune_fsdp_<tag>.json (default "
                          "<processes>x<device>, e.g. 2xh200)")
    out.add_argument("--out", default=None,
                     help="JSON path (default studies/results/finetune_fsdp_<tag>.json)")
    out.add_argument("--work", default=None,
                     help="run directory: packed data, log, the checkpoint (default: a new "
                          "directory under runs/ in the checkout, removed at the end)")
    out.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.kv_heads = args.kv_heads or args.heads
    if args.head_dim is None:
        if args.hidden % args.heads:
            p.error(f"--hidden {args.hidden} is not a multiple of --heads {args.heads}: give "
                    "--head-dim")
        args.head_dim = args.hidden // args.heads
    if args.heads % args.kv_heads:
        p.error(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    if 2 * args.rope_pairs > args.head_dim:
        p.error(f"--rope-pairs {args.rope_pairs} exceeds the {args.head_dim // 2} pairs of "
                f"--head-dim {args.head_dim}")
    if args.steps < 3:
        p.error(f"--steps must be at least 3 (a checkpoint in the second half, then resumed "
                f"steps), got {args.steps}")
    k = args.checkpoint_step or (2 * args.steps) // 3
    if not args.steps / 2 < k < args.steps:
        p.error(f"--checkpoint-step {k} must be more than half of --steps ({args.steps}) and "
                "less than it, so that the run writes exactly one checkpoint before its end")
    args.checkpoint_step = k
    if not 0 <= args.warmup_steps < args.steps:
        p.error(f"--warmup-steps must be in 0..{args.steps - 1}, got {args.warmup_steps}")
    if "LOCAL_RANK" not in os.environ:
        p.error("run under torchrun, one process per GPU: torchrun --standalone "
                "--nproc_per_node N studies/finetune_fsdp.py ...")
    return args


def main(argv=None):
    result = run(parse_args(argv))
    if result is not None and not result["resume_check"]["passed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
