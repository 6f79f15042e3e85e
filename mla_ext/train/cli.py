"""The ``mla-ext finetune`` and ``mla-ext pack`` subcommands."""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path


def positive_int(text: str) -> int:
    """Positive integers (steps, lengths, batch sizes): the argparse type of such options."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def positive_number(text: str) -> float:
    """Positive finite numbers (learning rates, tolerances, seconds)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def non_negative_number(text: str) -> float:
    """Finite numbers >= 0 (sampling temperatures)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not (value >= 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"expected a finite number >= 0, got {text!r}")
    return value


def device_arg(text: str) -> str:
    """A device this machine has: cpu, cuda or cuda:N (checked before any work starts)."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA device")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA "
                                             f"device(s), cuda:0 to cuda:{count - 1}")
    return text


def path_arg(text: str) -> str:
    """A file or directory path; the empty string is refused (it would mean the current
    directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty string")
    return text


def count_arg(text: str) -> int:
    """Non-negative integers, with k/M/G suffixes for token counts (e.g. 50M)."""
    scale = {"k": 10**3, "m": 10**6, "g": 10**9}.get(text[-1:].lower(), 1)
    try:
        value = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count such as 1000 or 50M, got "
                                         f"{text!r}") from None
    if value < 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"expected a non-negative whole count, got {text!r}")
    return int(value)


def fraction_arg(text: str) -> float:
    """Fractions in [0, 1] (schedule shares, mixes, distillation weights)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1], got {value}")
    return value


def _add_data_args(p):
    p.add_argument("--data", default="default",
                   help="'default' (the stdlib *.py sources + the calibration part of "
                        "pydoc_data.topics), a text file, a directory of text files, a .jsonl "
                        "file (field 'text'), a packed directory, or hf:NAME (a Hugging Face "
                        "dataset; needs the datasets package)")
    p.add_argument("--max-tokens", type=count_arg, default=None,
                   help="pack at most this many tokens (e.g. 500M); a streamed hf: dataset "
                        "defaults to what the run consumes")
    p.add_argument("--text-field", default="text", help="JSONL / dataset field (default text)")
    p.add_argument("--hf-config", default=None, help="configuration name of an hf: dataset")
    p.add_argument("--hf-split", default="train", help="split of an hf: dataset (default train)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_chat_args(p):
    from .chat import DEFAULT_BATCH_SIZE, DEFAULT_MAX_NEW_TOKENS, DEFAULT_PROMPTS

    g = p.add_argument_group(
        "chat data", "Mix conversations answered by the original instruct model into --data, "
        "so that the recovered model keeps answering chat prompts: questions built from the "
        "default corpus (explain a documentation topic, summarise a passage, explain or use a "
        "standard-library function), answered greedily by --chat-model once, rendered in its "
        "chat template and cached (the cache key covers the model's weights, the tokenizer, "
        "the prompts and the generation settings; a later run reads the cache). With "
        "--distill W --teacher default the model also matches the original's distributions on "
        "these conversations.")
    g.add_argument("--chat-mix", type=fraction_arg, default=0.0, metavar="FRACTION",
                   help="fraction of the packed training tokens that are chat, the rest --data "
                        "(default 0: no chat); the conversations repeat as often as needed; "
                        "whole documents are interleaved")
    g.add_argument("--chat-model", default=None,
                   help="the model whose answers are the chat data: 'default' or a model "
                        "directory (default: --teacher when given, else 'default')")
    g.add_argument("--chat-prompts", type=positive_int, default=DEFAULT_PROMPTS,
                   help=f"questions asked (default {DEFAULT_PROMPTS})")
    g.add_argument("--chat-max-new-tokens", type=positive_int, default=DEFAULT_MAX_NEW_TOKENS,
                   help=f"longest answer in tokens (default {DEFAULT_MAX_NEW_TOKENS})")
    g.add_argument("--chat-batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE,
                   help=f"prompts answered per generate call (default {DEFAULT_BATCH_SIZE})")
    g.add_argument("--chat-cache", default=None, metavar="DIR",
                   help="chat data cache (default $MLA_EXT_CACHE_DIR/chat, else "
                        "~/.cache/mla_ext/chat)")


def add_finetune_parsers(sub) -> None:
    """Register ``finetune`` and ``pack`` on the ``mla-ext`` subparsers."""
    from ..models import DTYPES
    from .loop import DISTRIBUTED, PRECISIONS, TRAIN_ONLY, TrainConfig

    d = TrainConfig()
    p = sub.add_parser(
        "finetune", help="fine-tune a (converted) model: the paper's recovery recipe",
        description="Full-parameter fine-tuning with the MHA2MLA recipe: AdamW (0.9, 0.95), "
                    "weight decay 0.01, peak LR 1e-4, linear warmup, constant, 1-sqrt decay, "
                    "gradient clipping 1.0, bf16 autocast on GPU. Multi-process: launch with "
                    "`python -m torch.distributed.run --nproc_per_node N -m mla_ext.cli "
                    "finetune --distributed ddp|fsdp ...`.")
    p.add_argument("--model", type=path_arg, default="default",
                   help="'default' (SmolLM2-135M-Instruct, unconverted: the paper's baseline), "
                        "an mla_ext checkpoint directory (mla-ext convert) or a local Hugging "
                        "Face model directory")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="parameter (master weight) dtype (default fp32)")
    p.add_argument("--device", type=device_arg, default=None,
                   help="default: cuda (cuda:LOCAL_RANK) if present")
    _add_data_args(p)
    p.add_argument("--out", required=True, type=path_arg,
                   help="run directory: data/, checkpoints/, log.jsonl, loss.png, final/")
    p.add_argument("--steps", type=positive_int, default=d.steps,
                   help=f"optimizer steps (default {d.steps})")
    p.add_argument("--seq-len", type=positive_int, default=d.seq_len,
                   help=f"tokens per sequence (default {d.seq_len})")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                   help=f"sequences per micro-batch per process (default {d.batch_size})")
    p.add_argument("--grad-accum", type=positive_int, default=d.grad_accum,
                   help="micro-batches per optimizer step per process (default 1); global "
                        "batch = batch size x grad accum x processes")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak learning rate (default {d.lr})")
    p.add_argument("--warmup", type=fraction_arg, default=d.warmup,
                   help=f"fraction of steps of linear warmup (default {d.warmup})")
    p.add_argument("--decay", type=fraction_arg, default=d.decay,
                   help=f"final fraction of steps of 1-sqrt decay (default {d.decay})")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help=f"AdamW weight decay on matrices (default {d.weight_decay})")
    p.add_argument("--betas", type=float, nargs=2, default=list(d.betas), metavar=("B1", "B2"),
                   help="AdamW betas (default 0.9 0.95)")
    p.add_argument("--clip", type=float, default=d.clip,
                   help=f"gradient norm clip, 0 disables (default {d.clip})")
    p.add_argument("--precision", choices=PRECISIONS, default=d.precision,
                   help="autocast: auto = bf16 on GPU, fp32 on CPU (default auto)")
    p.add_argument("--train-only", choices=TRAIN_ONLY, default=d.train_only,
                   help="'attention' trains only attention layers and norms (default all)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in the backward pass (less memory)")
    p.add_argument("--distributed", choices=DISTRIBUTED, default=d.distributed,
                   help="multi-process engine under torchrun (default none)")
    p.add_argument("--distill", type=fraction_arg, default=d.distill, metavar="W",
                   help="weight in [0, 1] of KL(teacher || model) in the loss, the rest next-token "
                        "cross-entropy (default 0: the paper's recipe); needs --teacher")
    p.add_argument("--teacher", default=None,
                   help="the model to distil from with --distill: 'default' (the original "
                        "SmolLM2-135M-Instruct) or a model directory, as --model")
    _add_chat_args(p)
    p.add_argument("--save-every", type=count_arg, default=500,
                   help="checkpoint every N steps, 0 = only at the end (default 500)")
    p.add_argument("--keep", type=count_arg, default=d.keep,
                   help=f"checkpoints kept on disk, 0 = all (default {d.keep})")
    p.add_argument("--seed", type=int, default=d.seed, help="data order seed (default 0)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                   help="continue from the newest checkpoint in --out, or from CHECKPOINT")
    p.add_argument("--stop-after", type=positive_int, default=None, metavar="STEP",
                   help="stop after this step with a checkpoint (continue later with --resume)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard an earlier run's checkpoints, log and final model in --out")
    p.add_argument("--no-plot", action="store_true", help="no loss-curve PNG")
    p.add_argument("--pack-only", action="store_true",
                   help="only tokenize and pack --data into OUT/data, then exit")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("pack", help="tokenize and pack text into memory-mapped shards",
                       description="Tokenize text (files, directories, JSONL, hf:NAME) and pack "
                                   "it into fixed-length sequences: shard_*.bin (uint16/uint32) "
                                   "+ index.json, readable without loading it all.")
    p.add_argument("--tokenizer", default="default",
                   help="'default' (SmolLM2's), an mla_ext checkpoint or a Hugging Face model "
                        "directory")
    _add_data_args(p)
    p.add_argument("--out", required=True, type=path_arg, help="output directory")
    p.add_argument("--seq-len", type=positive_int, default=d.seq_len,
                   help=f"tokens per sequence (default {d.seq_len})")
    p.add_argument("--shard-tokens", type=count_arg, default=None,
                   help="tokens per shard file (default 128Mi)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=cmd_pack)


def _config(args):
    from .loop import TrainConfig

    max_sequences = None
    if args.max_tokens is not None:
        max_sequences = max(1, args.max_tokens // args.seq_len)
    return TrainConfig(
        steps=args.steps, seq_len=args.seq_len, batch_size=args.batch_size,
        grad_accum=args.grad_accum, lr=args.lr, warmup=args.warmup, decay=args.decay,
        weight_decay=args.weight_decay, betas=tuple(args.betas), clip=args.clip,
        precision=args.precision, train_only=args.train_only,
        gradient_checkpointing=args.gradient_checkpointing, distributed=args.distributed,
        device=args.device, save_every=args.save_every, keep=args.keep, seed=args.seed,
        resume=args.resume, stop_after=args.stop_after, max_sequences=max_sequences,
        overwrite=args.overwrite, progress=not args.no_progress, plot=not args.no_plot,
        hf_config=args.hf_config, hf_split=args.hf_split, text_field=args.text_field,
        distill=args.distill)


def _source(args):
    """The packed directory or validated TextSource ``--data`` names (read once, here)."""
    from .data import is_packed, resolve_source

    if is_packed(args.data):
        return args.data
    return resolve_source(args.data, hf_config=args.hf_config, hf_split=args.hf_split,
                          text_field=args.text_field)


def _max_positions(model: str):
    """max_position_embeddings of a model directory, read without loading the model."""
    file = Path(model) / "config.json"
    if model == "default" or not file.is_file():
        return None
    try:
        return json.loads(file.read_text()).get("max_position_embeddings")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return None


def load_tokenizer(name: str):
    """The tokenizer of 'default', an mla_ext checkpoint or a Hugging Face model directory."""
    from transformers import AutoTokenizer

    if name == "default":
        from ..models import default_model_file

        file = default_model_file()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)
    if not Path(name).is_dir():
        raise FileNotFoundError(f"no tokenizer at {name} (give 'default' or a model directory)")
    return AutoTokenizer.from_pretrained(name)


def cmd_finetune(args):
    from ..models import DTYPES
    from ..models import load_model
    from .checkpoint import find_checkpoint
    from .data import tokenizer_hash
    from .loop import DATA, check_out_dir, data_signature, packed_data, finetune

    config = _config(args)
    config.validate()
    limit = _max_positions(args.model)
    if limit is not None and args.seq_len > limit:
        raise ValueError(f"--seq-len {args.seq_len} exceeds max_position_embeddings {limit} of "
                         f"{args.model}")
    if not Path(args.model).is_dir() and args.model != "default":
        raise FileNotFoundError(f"--model {args.model} is neither 'default' nor a directory")
    out = Path(args.out)
    data = _source(args)
    if args.chat_mix > 0 and isinstance(data, str):
        raise ValueError(f"--chat-mix mixes chat into text; --data {args.data} is packed "
                         "already (give the text it was packed from)")
    if args.chat_model is not None and args.chat_mix == 0:
        raise ValueError("--chat-model needs --chat-mix FRACTION (> 0)")
    _check_chat_model(args)
    if args.pack_only:
        if isinstance(data, str):
            raise ValueError(f"--data {args.data} is packed already")
        tokenizer = load_tokenizer(args.model)
        if args.chat_mix > 0:
            data = _with_chat(args, data, None)
        sig = data_signature(data.fingerprint(), tokenizer_hash(tokenizer), config.seq_len,
                              config.max_sequences)
        path = packed_data(out / DATA, data, tokenizer, config, config.max_sequences, sig)
        _report_packed(path)
        return
    if (config.distill > 0) != (args.teacher is not None):
        raise ValueError("--distill W (> 0) and --teacher MODEL go together")
    if config.resume:
        find_checkpoint(out, config.resume)
    check_out_dir(out, config)
    # finetune places the model (each process on its own GPU under torchrun)
    model, tokenizer = load_model(args.model, dtype=DTYPES[args.dtype], device="cpu")
    teacher = None
    if args.teacher is not None:
        teacher, _ = load_model(args.teacher, dtype=DTYPES[args.dtype], device="cpu")
    if args.chat_mix > 0:
        data = _with_chat(args, data, teacher)
    history = finetune(model, tokenizer, data, config, out, teacher=teacher)
    if int(os.environ.get("RANK", "0")) == 0 and history:
        last = history[-1]
        print(f"step {last['step']}: loss {last['loss']:.4f}, {last['tokens']} tokens; run in "
              f"{out} (model in {out / 'final'} when all steps are done)")


def _chat_model_name(args) -> str:
    return args.chat_model or args.teacher or "default"


def _check_chat_model(args) -> None:
    name = _chat_model_name(args)
    if args.chat_mix > 0 and name != "default" and not Path(name).is_dir():
        raise FileNotFoundError(f"--chat-model {name} is neither 'default' nor a directory")


def _with_chat(args, data, teacher):
    """``data`` with the chat model's cached (or newly generated) answers mixed in."""
    import torch

    from ..models import DTYPES, load_model
    from .chat import chat_data, corpus_prompts
    from .data import mix_sources

    name = _chat_model_name(args)
    device = args.device or (f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
                             if torch.cuda.is_available() else "cpu")
    if teacher is not None and name == args.teacher:
        chat_model, chat_tokenizer = teacher, load_tokenizer(name)
    else:
        chat_model, chat_tokenizer = load_model(name, dtype=DTYPES[args.dtype], device="cpu")
    home = next(chat_model.parameters()).device
    try:
        chat = chat_data(chat_model.to(device), chat_tokenizer,
                         corpus_prompts(args.chat_prompts),
                         max_new_tokens=args.chat_max_new_tokens,
                         batch_size=args.chat_batch_size, cache_dir=args.chat_cache,
                         progress=not args.no_progress)
    finally:
        chat_model.to(home)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"chat data: {len(chat.records)} answers of {name} "
              f"({'cached' if chat.from_cache else 'generated'}) in {chat.path}")
    return mix_sources(data, chat.source(), args.chat_mix)


def _report_packed(path):
    from .data import PackedDataset

    ds = PackedDataset(path)
    idx = ds.index
    print(f"packed {idx['sequences']} sequences x {idx['seq_len']} tokens ({idx['tokens']} "
          f"tokens, {idx['dropped_tokens']} dropped, {idx['dtype']}, {len(idx['shards'])} "
          f"shard(s)) into {path}")


def cmd_pack(args):
    from .data import DEFAULT_SHARD_TOKENS, is_packed, pack

    if is_packed(args.data):
        raise ValueError(f"--data {args.data} is packed already")
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"--out {out} exists; pass --overwrite to replace it")
    source = _source(args)
    max_sequences = None
    if args.max_tokens is not None:
        max_sequences = max(1, args.max_tokens // args.seq_len)
    if source.hf_name and max_sequences is None:
        raise ValueError(f"--data {args.data} is a streamed dataset: give --max-tokens")
    tokenizer = load_tokenizer(args.tokenizer)
    path = pack(source, tokenizer, out, args.seq_len, max_sequences=max_sequences,
                shard_tokens=args.shard_tokens or DEFAULT_SHARD_TOKENS, overwrite=args.overwrite,
                progress=not args.no_progress)
    _report_packed(path.path)
