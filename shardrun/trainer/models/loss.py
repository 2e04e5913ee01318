"""The loss of next-token prediction, shared by every causal LM shardrun trains."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
"""Targets left out of the loss: padding (torch's cross_entropy default, and the data stream's)."""


def mean_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not IGNORE_INDEX, in the logits' own dtype with an fp32 mean:
    an fp32 copy of bf16 logits would cost batch x length x vocabulary x 4 bytes (gigabytes at GPT-2 size), and
    the kernel accumulates in fp32 either way."""
    flat = targets.reshape(-1)
    per_token = F.cross_entropy(logits.reshape(-1, logits.size(-1)), flat, reduction="none",
                                ignore_index=IGNORE_INDEX)
    return per_token.float().sum() / (flat != IGNORE_INDEX).sum().clamp(min=1)
