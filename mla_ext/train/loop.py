"""``finetune``: the recovery fine-tune of a converted (or original) model.

The defaults follow the paper (PAPER_NOTES.md): full-parameter AdamW (0.9, 0.95), weight decay
0.01, peak LR 1e-4, linear warmup, constant, 1-sqrt decay over the last fraction, gradient
clipping at 1.0, bf16 autocast on GPU.

One optimizer step consumes a global batch of ``batch_size * grad_accum * world_size``
sequences: the consecutive positions ``[step * G, (step + 1) * G)`` of a seeded per-epoch
permutation (``data.GlobalOrder``), cut into micro-batches of ``batch_size``; micro-batch
``a * world_size + rank`` goes to accumulation step ``a`` of process ``rank``. The global batch
depends only on the step, so 1 process with accumulation 2 and 2 processes with accumulation 1
see the same sequences, and a resume needs nothing but the step number.

Distributed runs go through ``torchrun``; the engine is PyTorch's DDP or FSDP2
(``fully_shard`` per decoder layer, then the root).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..modeling.checkpoint import CheckpointError
from ..staging import staged_directory
from . import checkpoint as ckpt
from .data import (DataError, GlobalOrder, PackedDataset, TextSource, is_packed, pack,
                   resolve_source, tokenizer_hash)
from .schedule import make_scheduler, phase_steps

DISTRIBUTED = ("none", "ddp", "fsdp")
TRAIN_ONLY = ("all", "attention")
PRECISIONS = ("auto", "bf16", "fp32")
LOG = "log.jsonl"
PLOT = "loss.png"
FINAL = "final"
DATA = "data"


@dataclass
class TrainConfig:
    """Settings of a fine-tuning run (the CLI flags of ``mla-ext finetune``).

    batch_size is per process and per micro-batch; warmup and decay are fractions of steps;
    save_every 0 saves only at the end; keep is how many checkpoints stay on disk (0: all);
    resume is None, "latest" (the newest checkpoint in out_dir) or a checkpoint directory;
    stop_after ends the run (with a checkpoint) after that step, for jobs cut into slices;
    save_at_end False writes neither the end-of-run checkpoint nor final/ (save_every
    checkpoints still are): for studies and benchmarks that need only the log and the model
    left in memory;
    max_sequences caps packing (a streamed dataset defaults to what the run consumes);
    distill in [0, 1] mixes the loss as (1 - distill) * next-token cross-entropy + distill *
    KL(teacher || model) per token (``finetune(..., teacher=)``): 0 is the paper's recipe; a
    converted model distilled from its original keeps closer to the original's behaviour on
    text unlike the training data (the demo's chat answer).
    """
    steps: int = 1000
    seq_len: int = 2048
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-4
    warmup: float = 0.06
    decay: float = 0.15
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    clip: float = 1.0
    precision: str = "auto"
    train_only: str = "all"
    gradient_checkpointing: bool = False
    distributed: str = "none"
    device: str | None = None
    save_every: int = 0
    keep: int = 2
    seed: int = 0
    resume: str | None = None
    stop_after: int | None = None
    save_at_end: bool = True
    max_sequences: int | None = None
    overwrite: bool = False
    progress: bool = True
    plot: bool = True
    hf_config: str | None = None
    hf_split: str = "train"
    text_field: str = "text"
    distill: float = 0.0

    def validate(self) -> None:
        """ValueError naming the first bad setting."""
        for name in ("steps", "seq_len", "batch_size", "grad_accum"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be at least 2 (one input and one target), got "
                             f"{self.seq_len}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be positive, got {self.lr}")
        phase_steps(self.steps, self.warmup, self.decay)
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas}")
        if self.clip < 0:
            raise ValueError(f"clip must be >= 0 (0 disables clipping), got {self.clip}")
        for name, value, choices in (("precision", self.precision, PRECISIONS),
                                     ("train_only", self.train_only, TRAIN_ONLY),
                                     ("distributed", self.distributed, DISTRIBUTED)):
            if value not in choices:
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        for name in ("save_every", "keep"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.stop_after is not None and not 1 <= self.stop_after <= self.steps:
            raise ValueError(f"stop_after must be in 1..steps ({self.steps}), got "
                             f"{self.stop_after}")
        if self.max_sequences is not None and self.max_sequences < 1:
            raise ValueError(f"max_sequences must be positive, got {self.max_sequences}")
        if isinstance(self.distill, bool) or not 0 <= self.distill <= 1:
            raise ValueError(f"distill must be a number in [0, 1], got {self.distill!r}")

    def resume_settings(self, world_size: int) -> dict:
        s = {k: getattr(self, k) for k in ckpt.RESUME_INVARIANTS if hasattr(self, k)}
        s["betas"] = list(self.betas)
        s["global_batch"] = self.batch_size * self.grad_accum * world_size
        return s


class _Dist:
    """Rank, world size and device of this process; owns the process group if it made it."""

    def __init__(self, mode: str, device: str | None):
        self.mode = mode
        env_world = int(os.environ.get("WORLD_SIZE", "1"))
        if mode == "none":
            if env_world > 1:
                raise ValueError(f"launched with {env_world} processes but distributed='none': "
                                 "pass --distributed ddp or fsdp")
            self.rank, self.world, self.local_rank = 0, 1, 0
        else:
            if "RANK" not in os.environ and not dist.is_initialized():
                raise ValueError(f"distributed={mode!r} needs a torchrun launch, e.g. "
                                 "`python -m torch.distributed.run --nproc_per_node 2 -m "
                                 "mla_ext.cli finetune --distributed ddp ...`")
            self.rank = int(os.environ.get("RANK", "0"))
            self.world = env_world
            self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device is None:
            device = f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.created = False

    @property
    def on(self) -> bool:
        return self.mode != "none"

    @property
    def main(self) -> bool:
        return self.rank == 0

    def init(self):
        if self.on and not dist.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.created = True
        if self.on:
            self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def barrier(self):
        if self.on:
            dist.barrier()

    def main_then_share(self, fn):
        """Run ``fn`` on rank 0 only and hand its result (or its exception) to every rank, so a
        failure there never leaves the others waiting at a collective."""
        result, error = None, None
        if self.main:
            try:
                result = fn()
            except Exception as exc:  # re-raised on every rank below
                error = exc
        if self.on:
            box = [result, error]
            dist.broadcast_object_list(box, src=0)
            result, error = box
        if error is not None:
            raise error
        return result

    def mean(self, value: torch.Tensor) -> float:
        if self.on:
            value = value.detach().clone().to(self.device)
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value = value / self.world
        return float(value)

    def any(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (every rank gets the same answer)."""
        if not self.on:
            return bool(flag)
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def close(self):
        if self.created and dist.is_initialized():
            # every rank done with its last collective before any tears its connections down
            dist.barrier()
            dist.destroy_process_group()


def finetune(model, tokenizer, data=None, config: TrainConfig | None = None,
             out_dir="finetune-out", on_step=None, teacher=None) -> list[dict]:
    """Fine-tune ``model`` on ``data``; return the history (one dict per optimizer step:
    step, loss, lr, grad_norm, tokens, tokens_per_s, elapsed_s).

    on_step: called on every rank after each optimizer step (and its log line) as
    ``on_step(record, model)``, with the training model (wrapped under DDP/FSDP, in train
    mode), e.g. to evaluate it; a true return on any rank ends the run after that step, as
    ``stop_after`` would (a checkpoint unless save_at_end is False, no final/).

    data: "default"/None (the default corpus), a text file, a directory, a JSONL file, a packed
    directory (``pack`` / ``mla-ext pack``), "hf:NAME", or a TextSource.
    out_dir gets: data/ (the packed tokens unless data was packed already), checkpoints/,
    log.jsonl, loss.png and final/ (the trained model: ``mla_ext.load_pretrained`` reads it
    when the model is converted; an unconverted model is saved in Hugging Face format).
    teacher: the model whose next-token distributions ``config.distill`` > 0 distils (same
    vocabulary; e.g. the original of a converted model); it is moved to the training device,
    frozen and never saved.
    Under FSDP the passed model is left sharded; the saved final/ is the result to use.
    With distributed "ddp"/"fsdp" under torchrun, a process group that already exists is used
    and left open; otherwise one is made (gloo on CPU, NCCL on GPU) and closed at the end.
    """
    config = config or TrainConfig()
    config.validate()
    _check_model(model, config)
    _check_teacher(teacher, model, config)
    out = Path(out_dir)
    env = _Dist(config.distributed, config.device)
    packed_input = data is not None and not isinstance(data, TextSource) and is_packed(data)
    if packed_input:
        dataset = PackedDataset(data)
        _check_packed(dataset, config, tokenizer)
        source = None
        data_sig = data_signature(dataset.index["source_fingerprint"],
                                   dataset.index["tokenizer_hash"], config.seq_len,
                                   dataset.index["max_sequences"])
    else:
        if tokenizer is None:
            raise ValueError("tokenizer is None: it is needed to pack the data (pass the "
                             "model's tokenizer, or data packed already)")
        source = resolve_source(data, hf_config=config.hf_config, hf_split=config.hf_split,
                                text_field=config.text_field)
        max_sequences = config.max_sequences
        if source.needs_limit and max_sequences is None:
            max_sequences = config.steps * config.batch_size * config.grad_accum * env.world
        data_sig = data_signature(source.fingerprint(), tokenizer_hash(tokenizer),
                                   config.seq_len, max_sequences)
    check_out_dir(out, config)
    model_sig = ckpt.model_signature(model)

    env.init()
    try:
        resume_state, resume_path = None, None
        if config.resume:
            resume_path = ckpt.find_checkpoint(out, config.resume)
            resume_state = env.main_then_share(lambda: ckpt.verify(resume_path))
            ckpt.check_compatible(resume_state, resume_path, model_sig,
                                  config.resume_settings(env.world), data_sig)
        elif env.main and config.overwrite:
            _clear_run(out)
        if not packed_input:
            dataset = env.main_then_share(
                lambda: packed_data(out / DATA, source, tokenizer, config, max_sequences,
                                     data_sig))
            dataset = PackedDataset(dataset)
        if teacher is not None:
            teacher.to(env.device).eval().requires_grad_(False)
        return _train(model, tokenizer, dataset, config, out, env, model_sig, data_sig,
                      resume_state, resume_path, on_step, teacher)
    finally:
        env.close()


def _check_model(model, config: TrainConfig) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and config.seq_len > limit:
        raise ValueError(f"seq_len {config.seq_len} exceeds the model's max_position_embeddings "
                         f"({limit})")
    if config.train_only == "attention" and not any(_is_attention_or_norm(n)
                                                    for n, _ in model.named_parameters()):
        raise ValueError("train_only='attention' found no attention or norm parameters "
                         "(expected names containing 'self_attn' or 'norm')")


def _check_teacher(teacher, model, config: TrainConfig) -> None:
    if config.distill > 0 and teacher is None:
        raise ValueError(f"distill = {config.distill} needs a teacher (finetune(..., "
                         f"teacher=the original model))")
    if config.distill == 0 and teacher is not None:
        raise ValueError("a teacher was given but distill is 0 (set TrainConfig.distill)")
    if teacher is not None:
        ours, theirs = model.config.vocab_size, getattr(teacher.config, "vocab_size", None)
        if theirs != ours:
            raise ValueError(f"the teacher's vocab_size ({theirs}) differs from the model's "
                             f"({ours}): distillation compares distributions over one vocabulary")


def _loss(wrapped, teacher, x, distill: float) -> torch.Tensor:
    """Next-token cross-entropy, mixed with KL(teacher || model) over the same positions (pure
    distillation computes no cross-entropy)."""
    out = wrapped(input_ids=x, labels=x if distill < 1 else None, use_cache=False)
    if not distill:
        return out.loss
    with torch.no_grad():
        target = teacher(input_ids=x, use_cache=False).logits[:, :-1].float().log_softmax(-1)
    pred = out.logits[:, :-1].float().log_softmax(-1)
    kl = torch.nn.functional.kl_div(pred, target, log_target=True, reduction="none").sum(-1)
    kl = kl.mean()
    return kl if distill == 1 else (1 - distill) * out.loss + distill * kl


def _is_attention_or_norm(name: str) -> bool:
    module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
    return ".self_attn." in f".{name}" or "norm" in module


def _check_packed(dataset: PackedDataset, config: TrainConfig, tokenizer) -> None:
    if dataset.seq_len != config.seq_len:
        raise DataError(f"packed data {dataset.path} has seq_len {dataset.seq_len}, the run "
                        f"asks for {config.seq_len}: repack it or pass --seq-len "
                        f"{dataset.seq_len}")
    if tokenizer is not None and dataset.index["tokenizer_hash"] != tokenizer_hash(tokenizer):
        raise DataError(f"packed data {dataset.path} was tokenized by another tokenizer "
                        f"({dataset.index['tokenizer']!r})")


def data_signature(source_fp, tok_hash, seq_len, max_sequences) -> str:
    return json.dumps([source_fp, tok_hash, seq_len, max_sequences])


def packed_data(path: Path, source, tokenizer, config, max_sequences, data_sig) -> Path:
    """``path`` holding ``source`` packed for this run, reusing an identical earlier packing."""
    if is_packed(path):
        idx = PackedDataset(path).index
        if data_signature(idx["source_fingerprint"], idx["tokenizer_hash"], idx["seq_len"],
                           idx["max_sequences"]) == data_sig:
            return path
    pack(source, tokenizer, path, config.seq_len, max_sequences=max_sequences, overwrite=True,
         progress=config.progress)
    return path


def check_out_dir(out: Path, config: TrainConfig) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out {out} exists and is not a directory")
    if config.resume or config.overwrite:
        return
    earlier = [p for p in (out / ckpt.CHECKPOINTS, out / FINAL, out / LOG) if p.exists()]
    if earlier:
        raise FileExistsError(f"out {out} holds an earlier run ({earlier[0].name}); pass "
                              "--resume to continue it or --overwrite to start again")


def _clear_run(out: Path) -> None:
    for name in (ckpt.CHECKPOINTS, FINAL):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in (LOG, PLOT):
        (out / name).unlink(missing_ok=True)


def _autocast(config: TrainConfig, device: torch.device):
    precision = config.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _prepare(model, config: TrainConfig, env: _Dist):
    """Freeze, move, wrap; return (wrapped model, trainable parameters by name)."""
    if config.train_only == "attention":
        for name, p in model.named_parameters():
            p.requires_grad_(_is_attention_or_norm(name))
    if config.gradient_checkpointing:
        # Non-reentrant checkpointing still yields gradients when the embeddings are frozen.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    if config.distributed == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(env.device.type, (env.world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    model.to(env.device)
    if config.distributed == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [env.device.index] if env.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    return model


def _optimizer(wrapped, config: TrainConfig):
    decay, no_decay = [], []
    for p in wrapped.parameters():
        if p.requires_grad:
            # As the Hugging Face Trainer does (and so the paper's runs): no weight decay on
            # norm weights and biases, only on matrices.
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=config.lr,
                             betas=tuple(config.betas), eps=config.eps)


def _state_options(env: _Dist):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=env.on)


def _train(model, tokenizer, dataset, config, out, env, model_sig, data_sig, resume_state,
           resume_path, on_step=None, teacher=None):
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    unwrapped = model
    trainable_before = {n: p.requires_grad for n, p in model.named_parameters()}
    torch.manual_seed(config.seed)
    wrapped = _prepare(model, config, env)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    optimizer = _optimizer(wrapped, config)
    scheduler = make_scheduler(optimizer, config.steps, config.warmup, config.decay)
    start_step, tokens, elapsed = 0, 0, 0.0
    if resume_state is not None:
        msd = ckpt.load_tensors(resume_path / ckpt.MODEL)
        osd = ckpt.load_tensors(resume_path / ckpt.OPTIMIZER)
        set_state_dict(wrapped, optimizer, model_state_dict=msd, optim_state_dict=osd,
                       options=_state_options(env))
        del msd, osd
        scheduler.load_state_dict(resume_state["scheduler"])
        rng_file = resume_path / f"rng_rank{env.rank}.pt"
        if rng_file.is_file():
            ckpt.set_rng_state(ckpt.load_tensors(rng_file))
        start_step, tokens = resume_state["step"], resume_state["tokens"]
        elapsed = resume_state["elapsed_s"]
    history = _restart_log(out / LOG, start_step, env)

    micro_batches = config.grad_accum * env.world
    order = GlobalOrder(len(dataset), config.seed)
    step_tokens = config.batch_size * micro_batches * config.seq_len
    end_step = config.stop_after or config.steps
    if start_step >= end_step:
        raise CheckpointError(f"resume checkpoint {resume_path} is at step {start_step}: "
                              f"nothing left to do for {end_step} steps")
    bar = _progress(config, env, start_step, end_step)
    log = open(out / LOG, "a") if env.main else None
    finished = start_step
    try:
        for step in range(start_step, end_step):
            t0 = time.perf_counter()
            losses = []
            for a in range(config.grad_accum):
                ids = order.micro_batch(step, a * env.world + env.rank, config.batch_size,
                                        micro_batches)
                x = dataset.batch(ids).to(env.device, non_blocking=True)
                last = a == config.grad_accum - 1
                with _sync(wrapped, config, last), _autocast(config, env.device):
                    loss = _loss(wrapped, teacher, x, config.distill)
                (loss / config.grad_accum).backward()
                losses.append(loss.detach().float())
            grad_norm = _clip(params, config.clip)
            optimizer.step()
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_value = env.mean(torch.stack(losses).mean())
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"the loss is {loss_value} at step {step + 1}; resume "
                                         "from the last checkpoint with a lower --lr")
            dt = time.perf_counter() - t0
            tokens += step_tokens
            elapsed += dt
            record = {"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                      "tokens": tokens, "tokens_per_s": step_tokens / dt, "elapsed_s": elapsed}
            history.append(record)
            if log is not None:
                log.write(json.dumps(record) + "\n")
                log.flush()
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}")
            finished = step + 1
            stop = on_step is not None and env.any(on_step(record, wrapped))
            done = step + 1 == end_step or stop
            if (done and config.save_at_end) or (config.save_every
                                                 and (step + 1) % config.save_every == 0):
                if log is not None:
                    os.fsync(log.fileno())
                _save_checkpoint(wrapped, optimizer, scheduler, config, out, env, step + 1,
                                 tokens, elapsed, model_sig, data_sig, get_state_dict)
            if stop:
                break
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    if finished == config.steps:
        if config.save_at_end:
            _save_final(unwrapped, wrapped, tokenizer, config, out, env, get_state_dict)
        if env.main and config.plot:
            plot_history(history, out / PLOT)
    if config.gradient_checkpointing:
        unwrapped.gradient_checkpointing_disable()
    if config.distributed != "fsdp":  # FSDP replaced the parameters; nothing to give back
        for name, p in unwrapped.named_parameters():
            p.requires_grad_(trainable_before[name])
    unwrapped.config.use_cache = True
    unwrapped.eval()
    return history


def _sync(wrapped, config, last: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of a step."""
    if config.distributed == "ddp" and not last:
        return wrapped.no_sync()
    if config.distributed == "fsdp":
        wrapped.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def _clip(params, clip: float) -> float:
    if clip > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, clip)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if hasattr(norm, "full_tensor"):  # DTensor under FSDP
        norm = norm.full_tensor()
    return float(norm)


def _progress(config, env, start, end):
    if not (config.progress and env.main):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=end, initial=start, desc="finetune", unit="step", dynamic_ncols=True,
                file=sys.stderr)


def _restart_log(path: Path, step: int, env: _Dist) -> list[dict]:
    """The log's records up to ``step``; later ones (written after the checkpoint we resume
    from, by a run that then died) are cut from the file too."""
    history = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break  # a line cut short by a crash ends the usable log
            if record.get("step", 0) > step:
                break
            history.append(record)
    env.barrier()
    if env.main:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
        tmp.replace(path)
    env.barrier()
    return history


def _save_checkpoint(wrapped, optimizer, scheduler, config, out, env, step, tokens, elapsed,
                     model_sig, data_sig, get_state_dict):
    msd, osd = get_state_dict(wrapped, optimizer, options=_state_options(env))
    tmp = env.main_then_share(lambda: ckpt.temp_dir(out, step))
    torch.save(ckpt.rng_state(), tmp / f"rng_rank{env.rank}.pt")
    env.barrier()

    def publish():
        torch.save(msd, tmp / ckpt.MODEL)
        torch.save(osd, tmp / ckpt.OPTIMIZER)
        state = {"step": step, "tokens": tokens, "elapsed_s": elapsed,
                 # the data position: the global batch of step s starts at s * global_batch
                 "sequences_seen": step * config.resume_settings(env.world)["global_batch"],
                 "scheduler": scheduler.state_dict(), "model": model_sig,
                 "settings": config.resume_settings(env.world), "steps": config.steps,
                 "world_size": env.world, "data_signature": data_sig,
                 "config": json.loads(json.dumps(asdict(config), default=str))}
        (tmp / ckpt.STATE).write_text(json.dumps(state, indent=2))
        final = ckpt.write_manifest_and_publish(tmp, out / ckpt.CHECKPOINTS /
                                                ckpt.step_dir_name(step))
        ckpt.prune(out, config.keep)
        return final

    env.main_then_share(publish)


def _save_final(unwrapped, wrapped, tokenizer, config, out, env, get_state_dict):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if config.distributed == "fsdp":
        full = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True,
                                                                      cpu_offload=True))
        env.main_then_share(lambda: _write_final(_gathered_copy(unwrapped, full), tokenizer,
                                                 out / FINAL))
    else:
        env.main_then_share(lambda: _write_final(unwrapped, tokenizer, out / FINAL))


def _gathered_copy(sharded, state: dict):
    """A plain CPU model with ``state``'s weights, shaped like the FSDP-sharded ``sharded``."""
    from ..modeling.patch import CONFIG_KEY, build_mla_structure
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(sharded.config)
    with torch.device("meta"):
        clone = AutoModelForCausalLM.from_config(config)
    settings = getattr(config, CONFIG_KEY, None)
    if settings:
        build_mla_structure(clone, settings["layers"])
    clone.to_empty(device="cpu")
    missing, unexpected = clone.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"gathered weights do not fit the model: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}")
    if config.tie_word_embeddings:
        clone.tie_weights()
    # Non-persistent buffers (rotary inv_freq) are in no state dict: take them from the
    # sharded model, where FSDP leaves buffers whole.
    buffers = dict(sharded.named_buffers())
    for name, buf in clone.named_buffers():
        if name in buffers and name not in state:
            buf.copy_(buffers[name].detach().cpu())
    return clone.eval()


def _write_final(model, tokenizer, path: Path) -> Path:
    from ..modeling.checkpoint import save_pretrained
    from ..modeling.patch import CONFIG_KEY

    model.config.use_cache = True
    if getattr(model.config, CONFIG_KEY, None):
        return save_pretrained(model, path, tokenizer=tokenizer, overwrite=True)
    # An unconverted model (the paper's baseline: the original fine-tuned on the same tokens)
    # is stored in the Hugging Face format, written aside and renamed like save_pretrained.
    with staged_directory(path) as tmp:
        with _dense_gguf_as_plain(model):
            model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return path


@contextlib.contextmanager
def _dense_gguf_as_plain(model):
    """Present a model loaded from GGUF as an ordinary one while it is saved.

    The default model comes from a GGUF file, dequantized into ordinary fp32 tensors, yet
    transformers keeps the GGUF quantizer on it, refuses to save it and would write a
    quantization_config that makes the directory unloadable without the GGUF file. Weights
    still packed in GGUF blocks stay refused."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or type(quantizer).__name__ != "GgufHfQuantizer" \
            or getattr(quantizer, "packed_modules", None):
        yield
        return
    had_config = hasattr(model.config, "quantization_config")
    saved_config = getattr(model.config, "quantization_config", None)
    model.hf_quantizer = None
    if had_config:
        del model.config.quantization_config
    try:
        yield
    finally:
        model.hf_quantizer = quantizer
        if had_config:
            model.config.quantization_config = saved_config


def read_log(path) -> list[dict]:
    """The records of a run's log.jsonl (or of ``<out>/log.jsonl`` for a run directory)."""
    path = Path(path)
    if path.is_dir():
        path = path / LOG
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_history(history: list[dict], path) -> Path | None:
    """Loss (and LR on a second axis) against step, as a PNG; None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no loss curve (pip install matplotlib)",
              file=sys.stderr)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(steps, [r["loss"] for r in history], color="tab:blue", lw=1, label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss", color="tab:blue")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in history], color="tab:orange", lw=1, label="LR")
    lr_ax.set_ylabel("learning rate", color="tab:orange")
    ax.set_title("fine-tuning loss")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
