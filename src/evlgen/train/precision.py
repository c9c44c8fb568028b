"""Mixed precision for training: which autocast dtype, and whether fp16 needs a gradient scaler.

Trainable weights always stay float32; autocast only changes the dtype matmuls run in.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from evlgen.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Precision:
    autocast: torch.dtype | None
    scaler: bool

    @property
    def name(self) -> str:
        return "fp32" if self.autocast is None else str(self.autocast).removeprefix("torch.")


def resolve_precision(name: str, device: torch.device) -> Precision:
    if device.type != "cuda":
        if name == "fp16":
            raise ConfigError("train.precision=fp16 needs a GPU; use fp32 or bf16 on CPU")
        return Precision(torch.bfloat16 if name == "bf16" else None, False)
    if name == "auto":
        name = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return {
        "fp32": Precision(None, False),
        "bf16": Precision(torch.bfloat16, False),
        "fp16": Precision(torch.float16, True),
    }[name]


def autocast(prec: Precision, device: torch.device) -> contextlib.AbstractContextManager:
    if prec.autocast is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=prec.autocast)
