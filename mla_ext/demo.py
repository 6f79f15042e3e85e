"""The demo: the default model before and after a training-free MHA2MLA conversion, with the
paper's recipe and with ours, step by step."""
from __future__ import annotations

import copy
import tempfile
import textwrap
import time
from pathlib import Path

import torch

from .assistant import DEMO_PROMPTS, MIN_MATCHES, compare_answers
from .config import MLAConfig
from .convert import calibrate
from .data import default_calibration_text, default_evaluation_text
from .eval import chat, chat_answers, perplexity
from .modeling import convert_to_mla, kv_cache_bytes_per_token
from .models import DEFAULT_MODEL_NAME, load_default_model

# The paper's defaults for a d_h = 64 model: 2-norm, r = d_h/16 = 4, joint SVD, d_kv = d_h/4.
PAPER = MLAConfig(rope_strategy="2-norm", rope_pairs=4, d_kv=16, svd="joint",
                  rope_correction="none")
# Ours at the same cache size (-81.25 %): rotation-aware RoPE selection + score/output-weighted
# activation-aware joint SVD, each layer's RoPE pairs and latent width chosen under the budget
# (the split that measures best, `python -m mla_ext.demo splits`, docs/results.md).
OURS = MLAConfig()
PROMPT = "What is the capital of France? Answer in one sentence."
# The recovery fine-tune of the demo on a GPU (mla_ext.train): steps of RECOVERY_BATCH x
# RECOVERY_SEQ_LEN tokens of the default corpus with RECOVERY_CHAT_MIX of the tokens chat text
# (the original's own answers to RECOVERY_CHAT_PROMPTS questions about the corpus, generated
# once and cached, mla_ext.train.chat), and RECOVERY_DISTILL x KL(original || model) in the loss.
# On documentation alone (the paper's loss) the perplexity recovered (16.9 after 200 steps on
# the H200) but the chat answer stayed a repetition ("The following is a summary of ...").
GPU_RECOVERY_STEPS = 200
RECOVERY_BATCH, RECOVERY_SEQ_LEN = 8, 1024
RECOVERY_CHAT_MIX = 0.5
RECOVERY_DISTILL = 0.5
RECOVERY_CHAT_PROMPTS = 512


def _label(cfg: MLAConfig) -> str:
    if cfg.cache_ratio is not None:
        rope = f"r={cfg.rope_pairs}"
        if cfg.rope_pairs == "auto":
            rope = ("r per layer" if cfg.rope_pair_step == 1
                    else f"r per layer in steps of {cfg.rope_pair_step}")
        return (f"{cfg.rope_strategy} {rope}, {cfg.svd} SVD, latent per layer "
                f"(budget {1 - cfg.cache_ratio:.2%} smaller)")
    d_kv = "full rank" if cfg.d_kv is None else f"d_kv={cfg.d_kv}"
    return f"{cfg.rope_strategy} r={cfg.rope_pairs}, {cfg.svd} SVD {d_kv}"


def _correction(cfg: MLAConfig) -> str:
    return "" if cfg.rope_correction == "none" else f", {cfg.rope_correction} RoPE correction"


class _Setup:
    """What every demo table needs: the original model, its calibration and the perplexity of
    the demo's protocol (first ``eval_tokens`` held-out tokens, windows of ``context``)."""

    def __init__(self, device, eval_tokens, calib_sequences, context):
        print(f"loading {DEFAULT_MODEL_NAME} on {device} ...")
        self.original, self.tokenizer = load_default_model(dtype=torch.float32, device=device)
        self.layers = self.original.config.num_hidden_layers
        self.text = default_evaluation_text()
        self.eval_tokens, self.context = eval_tokens, context
        print(f"calibrating on {calib_sequences} x 512 tokens ...")
        self.calib = calibrate(self.original, self.tokenizer, default_calibration_text(),
                               max_length=512, max_sequences=calib_sequences, collect_xtx=True,
                               collect_distances=True, collect_rope_fit=True,
                               collect_query_gram=True, progress=False)

    def ppl(self, model, cache_dtype=None, rope_dtype=None):
        return perplexity(model, self.tokenizer, self.text, context=self.context,
                          stride=self.context, max_tokens=self.eval_tokens,
                          cache_dtype=cache_dtype, rope_dtype=rope_dtype, progress=False)

    def answers(self, model, prompts):
        """Greedy answers as the chat rows get them (the served copy over a converted model's
        stored cache formats)."""
        return chat_answers(_serving_copy(model), self.tokenizer, prompts)

    def convert(self, cfg):
        return convert_to_mla(copy.deepcopy(self.original), cfg, calibration=self.calib,
                              progress=False)

    def row(self, name, model, stored_formats=False, answer=False):
        """A table row: cache bytes per token and layer and the perplexity, in bf16 without a
        cache, or (stored_formats) in each layer's stored cache format with the context read
        back through the cache as in serving; with answer, the chat answer to PROMPT."""
        if stored_formats:
            nbytes = kv_cache_bytes_per_token(model)
            ppl = perplexity(model, self.tokenizer, self.text, context=self.context,
                             stride=self.context, max_tokens=self.eval_tokens,
                             through_cache=True, progress=False)
        else:
            nbytes = kv_cache_bytes_per_token(model, "bf16")
            ppl = self.ppl(model)
        r = {"name": name, "bytes": nbytes / self.layers, "ppl": ppl}
        if answer:
            r["answer"], stats = chat(_serving_copy(model), self.tokenizer, PROMPT,
                                      return_stats=True)
            r["speed"] = (f"{stats.tokens_per_s:.0f} tokens/s"
                          f"{', CUDA graph' if stats.cuda_graph else ''}")
        return r


def _serving_copy(model):
    """The model as it is served: on a GPU a bf16 copy, whose decode steps run the CUDA kernels
    replayed from a CUDA graph (the float32 model, kept for the perplexities, would decode through
    the PyTorch reference); on a CPU the model itself."""
    param = next(model.parameters())
    if param.device.type != "cuda" or param.dtype != torch.float32:
        return model
    return copy.deepcopy(model).to(torch.bfloat16)


def run_demo(device: str = "cpu", eval_tokens: int | None = 8192, calib_sequences: int = 16,
             context: int = 512, recovery_steps: int | None = None,
             recovery_seq_len: int = RECOVERY_SEQ_LEN,
             chat_prompts: int = RECOVERY_CHAT_PROMPTS,
             check_prompts=DEMO_PROMPTS) -> list[dict]:
    """Run the demo, print its table and return its rows. recovery_steps: steps of the short
    recovery fine-tune after the training-free steps (None: GPU_RECOVERY_STEPS on a GPU, none
    on a CPU; 0: none). With a recovery, chat_prompts questions make its chat data, and the
    training-free and recovered models answer check_prompts, compared with the original's
    answers (mla_ext.assistant; the rows get "matches")."""
    if recovery_steps is None:
        recovery_steps = GPU_RECOVERY_STEPS if torch.device(device).type == "cuda" else 0
    if isinstance(recovery_steps, bool) or not isinstance(recovery_steps, int) \
            or recovery_steps < 0:
        raise ValueError(f"recovery_steps must be a non-negative int, got {recovery_steps!r}")
    t0 = time.time()
    setup = _Setup(device, eval_tokens, calib_sequences, context)
    rows = [setup.row("original", setup.original, answer=True)]
    rows.append(setup.row(f"paper: {_label(PAPER)}", setup.convert(PAPER), answer=True))
    # a budgeted OURS chooses r per layer with the latent: its RoPE step alone is shown at the
    # paper's r in every layer
    rope_pairs = OURS.rope_pairs if OURS.rope_pairs != "auto" else PAPER.rope_pairs
    rope_only = MLAConfig(rope_strategy=OURS.rope_strategy, rope_pairs=rope_pairs,
                          d_kv=None, svd="joint", rope_correction=OURS.rope_correction)
    rows.append(setup.row(f"ours, step 1: partial RoPE only ({OURS.rope_strategy} "
                          f"r={rope_pairs}{_correction(OURS)})", setup.convert(rope_only)))
    ours = setup.convert(OURS)
    rows.append(setup.row(f"ours, step 2: + {OURS.svd} SVD; RoPE pairs, latent width, cache "
                          "format and RoPE-key sharing per layer in the byte budget", ours,
                          stored_formats=True, answer=recovery_steps == 0))
    if recovery_steps:
        check_prompts = list(check_prompts)
        reference = setup.answers(setup.original, check_prompts)
        rows[-1]["matches"] = compare_answers(setup.answers(ours, check_prompts), reference,
                                              check_prompts)
        tokens = _recover(setup, ours, recovery_steps, recovery_seq_len, device, chat_prompts)
        rows.append(setup.row(f"ours, step 3: + recovery fine-tune ({recovery_steps} steps, "
                              f"{tokens / 1e6:.1f}M tokens, {RECOVERY_CHAT_MIX:.0%} chat, "
                              f"distilled at {RECOVERY_DISTILL})", ours, stored_formats=True,
                              answer=True))
        rows[-1]["matches"] = compare_answers(setup.answers(ours, check_prompts), reference,
                                              check_prompts)
    _print_table(rows, eval_tokens, context, recovered=recovery_steps > 0)
    print(f"(demo took {time.time() - t0:.0f} s)")
    return rows


def _recover(setup, model, steps: int, seq_len: int, device, chat_prompts: int) -> int:
    """The short recovery fine-tune (mla_ext.train) on the default corpus with the original's
    chat answers mixed in, distilled from the original, in place; returns the tokens it trained
    on."""
    from .train import TrainConfig, finetune, mix_sources, pack
    from .train.chat import chat_data, corpus_prompts

    chat = chat_data(setup.original, setup.tokenizer, corpus_prompts(chat_prompts),
                     progress=False)
    print(f"chat data: the original's answers to {len(chat.records)} questions about the "
          f"corpus ({'cached' if chat.from_cache else 'generated'}, {chat.path})")
    print(f"recovery fine-tune: {steps} steps of {RECOVERY_BATCH} x {seq_len} tokens ...")
    with tempfile.TemporaryDirectory(prefix="mla-ext-demo-") as work:
        data = pack(mix_sources("default", chat.source(), RECOVERY_CHAT_MIX), setup.tokenizer,
                    Path(work) / "data", seq_len, max_sequences=steps * RECOVERY_BATCH,
                    overwrite=True, progress=False)
        history = finetune(model, setup.tokenizer, data.path, TrainConfig(
            steps=steps, seq_len=seq_len, batch_size=RECOVERY_BATCH, device=str(device),
            save_every=0, save_at_end=False, overwrite=True, plot=False, progress=False,
            distill=RECOVERY_DISTILL), Path(work) / "run", teacher=setup.original)
    model.eval()
    return int(history[-1]["tokens"]) if history else 0


def split_configs() -> list[MLAConfig]:
    """The ways to spend -81.25 % of the cache (d_r + d_kv = 24 of 2 d_h = 128 per KV head):
    the same split in every layer, then the budget's choices (r per layer in steps of 4, which
    the CUDA decode kernel takes, and any r). Without the fitted RoPE correction, as
    docs/results.md's table of them was measured."""
    plain = {"rope_strategy": "rotation", "svd": "activation", "rope_correction": "none"}
    fixed = [MLAConfig(rope_pairs=r, d_kv=24 - 2 * r, **plain) for r in (4, 6, 8)]
    budgeted = [MLAConfig(rope_pairs=8, cache_ratio=0.1875, **plain)]
    budgeted += [MLAConfig(rope_pairs="auto", cache_ratio=0.1875, rope_pair_step=step, **plain)
                 for step in (4, 1)]
    return fixed + budgeted


def _pick_splits(only: list[int] | None) -> list[MLAConfig]:
    configs = split_configs()
    if only is None:
        return configs
    if not only or any(isinstance(i, bool) or not isinstance(i, int)
                       or not 0 <= i < len(configs) for i in only):
        raise ValueError(f"only must list indices of split_configs() in [0, {len(configs)}), "
                         f"got {only!r}")
    return [configs[i] for i in only]


def run_split_study(device: str = "cpu", eval_tokens: int | None = 8192,
                    calib_sequences: int = 16, context: int = 512,
                    only: list[int] | None = None) -> list[dict]:
    """Perplexity of the splits of split_configs() (all, or those at the indices ``only``)
    under the demo's protocol; each row also records its conversion time and per-layer sizes."""
    configs = _pick_splits(only)
    t0 = time.time()
    setup = _Setup(device, eval_tokens, calib_sequences, context)
    rows = [setup.row("original", setup.original)]
    for cfg in configs:
        start = time.time()
        model = setup.convert(cfg)
        seconds = time.time() - start
        rows.append(setup.row(_label(cfg), model))
        rows[-1]["convert_s"] = seconds
        rows[-1]["layers"] = [(p["rope_pairs"], p["latent_dim"])
                              for p in model.config.mla_ext["layers"]]
        print(f"  {rows[-1]['name']}: {rows[-1]['ppl']:.2f} (converted in {seconds:.0f} s)",
              flush=True)
        if cfg.cache_ratio is not None:
            print("    (r, D_c) per layer: " + " ".join(f"({r},{w})"
                                                       for r, w in rows[-1]["layers"]), flush=True)
    _print_table(rows, eval_tokens, context)
    print(f"(study took {time.time() - t0:.0f} s)")
    return rows


def _print_table(rows: list[dict], eval_tokens, context, recovered: bool = False) -> None:
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
    answered = [r for r in rows if "answer" in r]
    if answered:
        print(f"chat, greedy: {PROMPT!r}")
    for r in answered:
        print(textwrap.fill(r["answer"] or "(empty)", width=100,
                            initial_indent=f"  {r['name']} [{r['speed']}]: ",
                            subsequent_indent="      "))
    checked = [r for r in rows if "matches" in r]
    for r in checked:
        m = r["matches"]
        print(f"  {r['name']}: answers as the original on {m['matches']} of {m['total']} demo "
              f"prompts (the recovery check asks for {MIN_MATCHES} of {len(DEMO_PROMPTS)})")
    if recovered:
        print("Steps 1-2 are training-free; step 3 adds a short recovery fine-tune of step 2's "
              "model (mla-ext finetune runs longer ones; mla-ext check-recovery checks one).")
    else:
        print("All conversions are training-free; MHA2MLA recovers quality with a short "
              "fine-tune (mla-ext finetune; the demo runs one on a GPU).")


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m mla_ext.demo",
        description="The demo ('demo', the same as mla-ext demo) or the study of how to split "
                    "-81.25 %% of the cache between RoPE keys and latent ('splits').")
    p.add_argument("table", choices=("demo", "splits"), nargs="?", default="demo")
    p.add_argument("--device", default="cpu")
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--calib-sequences", type=int, default=16)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--recovery-steps", type=int, default=None,
                   help=f"demo: recovery fine-tune steps (default {GPU_RECOVERY_STEPS} on a GPU, "
                        "0 on a CPU)")
    p.add_argument("--only", type=int, nargs="+", default=None, metavar="I",
                   help="splits: measure only these rows of split_configs(): " + "; ".join(
                       f"{i} = {_label(cfg)}" for i, cfg in enumerate(split_configs())).replace("%", "%%"))
    args = p.parse_args(argv)
    if args.table == "demo":
        if args.only is not None:
            p.error("--only selects rows of the 'splits' table")
        run_demo(device=args.device, eval_tokens=args.eval_tokens,
                 calib_sequences=args.calib_sequences, context=args.context,
                 recovery_steps=args.recovery_steps)
        return
    try:
        _pick_splits(args.only)
    except ValueError as err:
        p.error(f"--only: {err}")
    run_split_study(device=args.device, eval_tokens=args.eval_tokens,
                    calib_sequences=args.calib_sequences, context=args.context, only=args.only)


if __name__ == "__main__":
    main()
