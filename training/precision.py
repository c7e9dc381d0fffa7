"""Mixed precision on a GPU: autocast dtype from `--amp`, and the gradient scaler fp16 needs."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

import torch


def mixed_precision(
    device: torch.device, amp: str
) -> tuple[Callable[[], AbstractContextManager], torch.amp.GradScaler]:
    """(autocast context factory, gradient scaler) for `--amp` auto|bf16|fp16|none. CPUs train in float32;
    auto means bf16 where the GPU supports it, else fp16. The scaler only scales for fp16, whose gradients
    underflow without it."""
    amp_dtype = None
    if device.type == "cuda" and amp != "none":
        amp_dtype = torch.float16 if amp == "fp16" else torch.bfloat16
        if amp == "auto" and not torch.cuda.is_bf16_supported():
            amp_dtype = torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    autocast = (lambda: torch.autocast("cuda", dtype=amp_dtype)) if amp_dtype else nullcontext
    return autocast, scaler
