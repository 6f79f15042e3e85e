"""The learning-rate schedule of the MHA2MLA recovery fine-tune: linear warmup, a constant
plateau, then a 1-sqrt decay over the last fraction of the steps (warmup-stable-decay).

The factor is a pure function of the step, so resuming needs only the step count; the
LambdaLR wrapper exists so the scheduler state travels in checkpoints like any other.
"""
from __future__ import annotations

import math

import torch


def phase_steps(total_steps: int, warmup: float, decay: float) -> tuple[int, int]:
    """(warmup steps, decay steps) for fractions of ``total_steps``; ValueError when they do
    not fit."""
    if total_steps < 1:
        raise ValueError(f"steps must be at least 1, got {total_steps}")
    for name, value in (("warmup", warmup), ("decay", decay)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} is a fraction of the steps in [0, 1], got {value}")
    if warmup + decay > 1.0:
        raise ValueError(f"warmup ({warmup}) + decay ({decay}) exceed all the steps")
    n_warmup = round(warmup * total_steps)
    n_decay = min(round(decay * total_steps), total_steps - n_warmup)
    return n_warmup, n_decay


def lr_factor(step: int, total_steps: int, warmup: float, decay: float) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based).

    Warmup reaches the peak on its last step, so no step runs at LR 0; the decay starts at the
    peak and ends one step short of 0, for the same reason."""
    n_warmup, n_decay = phase_steps(total_steps, warmup, decay)
    if step < n_warmup:
        return (step + 1) / n_warmup
    decay_start = total_steps - n_decay
    # LambdaLR also asks for the step after the last one, which has no decay phase to be in
    # when the decay fraction rounds to zero steps.
    if step < decay_start or n_decay == 0:
        return 1.0
    progress = min(step - decay_start, n_decay) / n_decay
    return 1.0 - math.sqrt(progress)


def make_scheduler(optimizer, total_steps: int, warmup: float, decay: float):
    """A LambdaLR over ``optimizer`` following ``lr_factor``."""
    phase_steps(total_steps, warmup, decay)  # fail here, not on the first step
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, decay))
