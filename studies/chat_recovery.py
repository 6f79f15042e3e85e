"""Recovery that keeps the default model an assistant: the whole recipe, measured.

SmolLM2-135M-Instruct is converted with the default ``MLAConfig()`` (-81.25 % of the cache),
then fine-tuned on the default corpus with the original's own chat answers mixed in and a
distillation term from the original (``mla-ext finetune --chat-mix F --distill W --teacher
default``); the original is fine-tuned on the same packed tokens with the paper's loss
(next-token cross-entropy) as the baseline. The recovery check (``mla_ext.assistant``) then asks
for the same answer as the original on at least 8 of the 10 demo prompts (exact, or equal first
sentences after normalisation) and a held-out perplexity at most 1.3x the baseline's.

    python studies/chat_recovery.py          # sized for 8 minutes on one H100 (not yet run there)
    python studies/chat_recovery.py --steps 800 --chat-mix 0.25 --distill 1
    python studies/chat_recovery.py --shakespeare ../shared/data/tinyshakespeare.txt

Phases: chat data (``--chat-prompts`` questions about the corpus answered greedily by the fp32
original, cached: a second run reads it), packing (``--steps`` x ``--batch-size`` sequences of
``--seq-len`` tokens, ``--chat-mix`` of the tokens chat), calibration (``--calib-sequences`` x 512
tokens) and conversion, the answers and perplexities of the original and the training-free
model, the two fine-tunes, the check. Perplexity: ``mla_ext.perplexity`` in fp32, windows and
stride of ``--context`` tokens, on the held-out part of pydoc_data.topics (all of it unless
``--eval-tokens``) and on tinyshakespeare.txt when present. Answers: fp32 models, greedy, 48 new
tokens at most, the converted model through a ``--cache-dtype`` latent cache. The JSON (--out)
holds the protocol, one row per model, every answer, the verdict and the time of each phase.
"""
from __future__ import annotations

import argparse
import copy
import gc
import sys
import tempfile
import time
from pathlib import Path

T_START = time.monotonic()
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import eval_batch_size, write_results  # noqa: E402
from studies import RESULTS, add_evaluation_args, check_evaluation_args  # noqa: E402
from studies.quality_study import SHAKESPEARE_CANDIDATES  # noqa: E402
from mla_ext.train.cli import fraction_arg, positive_int, positive_number  # noqa: E402

DEFAULT_OUT = RESULTS / "chat_recovery_smollm2.json"
CACHE_CHOICES = ("bf16", "fp16", "fp32", "int8", "int4", "fp8")


def _fraction(text: str) -> float:
    value = positive_number(text)
    if value > 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {text!r}")
    return value


class Phases:
    """Seconds spent in each phase, in order."""

    def __init__(self):
        self.times: dict[str, float] = {}

    def __call__(self, name: str):
        phases = self

        class _Timer:
            def __enter__(self):
                self.t0 = time.monotonic()
                print(f"{name} ...", flush=True)

            def __exit__(self, *exc):
                phases.times[name] = round(time.monotonic() - self.t0, 2)
                print(f"{name}: {phases.times[name]:.1f} s", flush=True)

        return _Timer()


def run(args) -> Path:
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
        return _study(args, Path(args.work))
    with tempfile.TemporaryDirectory(prefix="chat_recovery.") as work:
        return _study(args, Path(work))


def _study(args, work: Path) -> Path:
    import torch

    import mla_ext
    from mla_ext.assistant import (ANSWER_TOKENS, DEMO_PROMPTS, MAX_PPL_RATIO, MIN_MATCHES,
                                   check_recovery, format_report)
    from mla_ext.data import load_texts
    from mla_ext.train import (TrainConfig, chat_data, corpus_prompts, finetune, mix_sources,
                               pack)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    phases = Phases()
    with phases("load"):
        original, tok = mla_ext.load_default_model(dtype=torch.float32, device=device)
    limit = original.config.max_position_embeddings
    for flag, value in (("--seq-len", args.seq_len), ("--context", args.context)):
        if value > limit:
            raise SystemExit(f"{flag} {value} exceeds the model's {limit} positions")
    texts = {"pydoc": mla_ext.default_evaluation_text()}
    limits = {"pydoc": args.eval_tokens, "shakespeare": args.shakespeare_tokens}
    shakespeare = args.shakespeare or next((p for p in SHAKESPEARE_CANDIDATES if p.exists()),
                                           None)
    if shakespeare is not None:
        texts["shakespeare"] = load_texts(shakespeare)[0]

    def ppl(model) -> dict:
        return {k: mla_ext.perplexity(model, tok, text, context=args.context,
                                      stride=args.context, max_tokens=limits[k], progress=False,
                                      batch_size=eval_batch_size(device))
                for k, text in texts.items()}

    with phases("chat data"):
        chat = chat_data(original, tok, corpus_prompts(args.chat_prompts),
                         max_new_tokens=args.chat_max_new_tokens,
                         batch_size=args.chat_batch_size, cache_dir=args.chat_cache,
                         progress=not args.quiet)
    sequences = args.steps * args.batch_size
    with phases("pack"):
        data = pack(mix_sources(args.data, chat.source(), args.chat_mix), tok, work / "data",
                    args.seq_len, max_sequences=sequences, overwrite=True,
                    progress=not args.quiet)
    cfg = mla_ext.MLAConfig()
    with phases("calibrate and convert"):
        calib = mla_ext.calibrate(original, tok, mla_ext.default_calibration_text(),
                                  max_length=512, max_sequences=args.calib_sequences,
                                  progress=not args.quiet, **cfg.calibration_options())
        model = mla_ext.convert_to_mla(copy.deepcopy(original), cfg, calibration=calib,
                                       progress=False)
        del calib
    rows = {"original": {"model": "original"},
            "original_finetuned": {"model": "original fine-tuned on the same tokens "
                                            "(cross-entropy, the paper's baseline)"},
            "training_free": {"model": "converted, training-free"},
            "recovered": {"model": "converted, recovered"}}
    for key, m in (("original", original), ("training_free", model)):
        rows[key]["cache_bytes_per_token_layer"] = (
            mla_ext.kv_cache_bytes_per_token(m) / original.config.num_hidden_layers)
    check = dict(max_new_tokens=ANSWER_TOKENS, cache_dtype=args.cache_dtype,
                 context=args.context, progress=False)
    with phases("evaluate before training"):
        before = check_recovery(model, tok, original=original, **check)
        reference = [r["reference"] for r in before["answers"]["rows"]]
        rows["original"].update(ppl=ppl(original), answers=reference)
        rows["training_free"].update(ppl=ppl(model), matches=before["answers"]["matches"],
                                     answers=[r["answer"] for r in before["answers"]["rows"]])

    train = dict(steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size, lr=args.lr,
                 device=str(device), save_every=0, save_at_end=False, overwrite=True,
                 plot=False, progress=not args.quiet)
    with phases("recover the converted model"):
        history = finetune(model, tok, data.path, TrainConfig(distill=args.distill, **train),
                           work / "recovered", teacher=original if args.distill else None)
        rows["recovered"]["train"] = _train_summary(history)
    baseline = copy.deepcopy(original).requires_grad_(True)
    with phases("fine-tune the original"):
        history = finetune(baseline, tok, data.path, TrainConfig(**train), work / "baseline")
        rows["original_finetuned"]["train"] = _train_summary(history)
    with phases("check"):
        after = check_recovery(model, tok, original_answers=reference, baseline=baseline,
                               text=texts["pydoc"], eval_tokens=args.eval_tokens, **check)
        rows["recovered"].update(ppl=ppl(model), matches=after["answers"]["matches"],
                                 answers=[r["answer"] for r in after["answers"]["rows"]])
        rows["original_finetuned"]["ppl"] = ppl(baseline)
    del baseline
    gc.collect()
    ratios = {k: rows["recovered"]["ppl"][k] / rows["original_finetuned"]["ppl"][k]
              for k in texts}
    verdict = {"matches": after["answers"]["matches"], "total": after["answers"]["total"],
               "min_matches": MIN_MATCHES, "answers_pass": after["answers_pass"],
               "ppl_ratio": ratios, "max_ppl_ratio": MAX_PPL_RATIO,
               "ppl_pass": after["ppl_pass"], "passed": after["passed"],
               "answers": after["answers"]["rows"]}
    extra = {
        "protocol": {
            "model": "SmolLM2-135M-Instruct (fp32 master weights)",
            "conversion": {"mla_config": cfg.to_dict(),
                           "calibration": f"{args.calib_sequences} x 512 tokens of the "
                                          "calibration part of pydoc_data.topics"},
            "chat_data": {"prompts": len(chat.records), "max_new_tokens":
                          args.chat_max_new_tokens, "decoding": "greedy, fp32 original",
                          "cache_file": chat.path.name, "from_cache": chat.from_cache},
            "train": {"steps": args.steps, "seq_len": args.seq_len,
                      "batch_size": args.batch_size, "lr": args.lr,
                      "tokens_per_run": sequences * args.seq_len, "chat_mix": args.chat_mix,
                      "distill": args.distill, "data": data.index["source"],
                      "recipe": "mla_ext.train defaults (AdamW 0.9/0.95, wd 0.01, warmup 6 %, "
                                "1-sqrt decay over the last 15 %, clip 1.0, bf16 autocast on "
                                "GPU); the baseline without distillation"},
            "eval": {"context": args.context, "stride": args.context,
                     "texts": {k: (str(shakespeare) if k == "shakespeare" else
                                   "held-out part of pydoc_data.topics")
                               + (f", first {limits[k]} tokens" if limits[k] else ", all tokens")
                               for k in texts},
                     "answers": f"{len(DEMO_PROMPTS)} demo prompts (mla_ext.assistant), "
                                f"greedy, {ANSWER_TOKENS} new tokens at most, fp32, converted "
                                f"model over a {args.cache_dtype or 'stored-format'} latent "
                                "cache",
                     "ppl_ratio_checked_on": "pydoc"},
            "device": str(device) + (f" ({torch.cuda.get_device_name(device)})"
                                     if device.type == "cuda" else ""),
            "command": "python studies/chat_recovery.py " + " ".join(args.argv)},
        "verdict": verdict,
        "phases_s": phases.times,
        "elapsed_s": round(time.monotonic() - T_START, 1),
    }
    out = Path(args.out)
    path = write_results(out.stem, list(rows.values()), extra, out_dir=out.parent)
    print(format_report(after))
    print("perplexity " + "; ".join(
        f"{k}: original {rows['original']['ppl'][k]:.2f}, fine-tuned "
        f"{rows['original_finetuned']['ppl'][k]:.2f}, training-free "
        f"{rows['training_free']['ppl'][k]:.2f}, recovered {rows['recovered']['ppl'][k]:.2f} "
        f"({ratios[k]:.3f}x)" for k in texts))
    print(f"training-free: answers as the original on {before['answers']['matches']} of "
          f"{before['answers']['total']}")
    print(f"wrote {path} in {time.monotonic() - T_START:.1f} s")
    return path


def _train_summary(history: list[dict]) -> dict:
    return {"steps": len(history), "tokens": history[-1]["tokens"],
            "first_loss": history[0]["loss"], "last_loss": history[-1]["loss"],
            "train_s": round(history[-1]["elapsed_s"], 2)}


def parse_args(argv=None):
    from mla_ext.train.chat import DEFAULT_MAX_NEW_TOKENS

    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=positive_int, default=400,
                   help="optimizer steps of each fine-tune (default 400)")
    p.add_argument("--seq-len", type=positive_int, default=1024,
                   help="tokens per training sequence (default 1024)")
    p.add_argument("--batch-size", type=positive_int, default=8,
                   help="sequences per optimizer step (default 8)")
    p.add_argument("--lr", type=positive_number, default=1e-4,
                   help="peak learning rate (default 1e-4)")
    p.add_argument("--chat-mix", type=_fraction, default=0.5,
                   help="fraction of the training tokens that are chat (default 0.5)")
    p.add_argument("--distill", type=fraction_arg, default=0.5,
                   help="weight of KL(original || model) in the converted model's loss "
                        "(default 0.5; 0: cross-entropy only)")
    p.add_argument("--chat-prompts", type=positive_int, default=1024,
                   help="questions about the corpus answered by the original (default 1024)")
    p.add_argument("--chat-max-new-tokens", type=positive_int, default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"longest chat answer (default {DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--chat-batch-size", type=positive_int, default=64,
                   help="prompts per generate call (default 64)")
    p.add_argument("--chat-cache", default=None,
                   help="chat data cache directory (default ~/.cache/mla_ext/chat)")
    p.add_argument("--data", default="default",
                   help="the text the chat is mixed into: 'default' or a text file, "
                        "directory or .jsonl")
    p.add_argument("--cache-dtype", choices=CACHE_CHOICES, default=None,
                   help="latent cache format of the converted model's answers (default: each "
                        "layer's stored format)")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSON output (default %(default)s)")
    p.add_argument("--work", default=None,
                   help="directory for the packed data (default: a temporary directory)")
    add_evaluation_args(p)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    check_evaluation_args(p, args)
    return args


def main(argv=None):
    run(parse_args(argv))


if __name__ == "__main__":
    main()
