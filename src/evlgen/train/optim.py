"""AdamW over the trainable parameters and the paper's learning-rate schedule, as pure functions.

The schedule is a function of the step alone (linear warm-up from `warmup_start_lr`, then cosine down
to `min_lr`), so a resumed run needs no scheduler state: the step number is the whole state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from evlgen.config import TrainConfig


def is_no_decay(name: str, param: nn.Parameter) -> bool:
    """Biases, norms and every other 1-d tensor are not decayed (as the reference)."""
    return param.ndim < 2 or name.endswith(".bias")


def param_groups(named: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in named:
        if p.requires_grad:
            (no_decay if is_no_decay(name, p) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(named: Iterable[tuple[str, nn.Parameter]], cfg: TrainConfig) -> torch.optim.AdamW:
    groups = param_groups(named, cfg.weight_decay)
    if not any(g["params"] for g in groups):
        raise ValueError("nothing to train: the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=lr_at(0, cfg), betas=cfg.betas, eps=cfg.eps)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for the update made at 0-based `step`."""
    if step < cfg.warmup_steps:
        return cfg.warmup_start_lr + (cfg.lr - cfg.warmup_start_lr) * step / cfg.warmup_steps
    decay_steps = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
