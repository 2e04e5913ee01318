"""Model FLOPs per token and device peaks, for MFU (model FLOPs utilisation).

FLOPs per token of a decoder: 6N for the weights (forward 2N, backward 4N) plus the attention
scores and values, 12 * layers * width * seq_len (PaLM, appendix B; torchtitan does the same).
N leaves out the embeddings (a lookup, not a matmul); GPT-2-style tied output weights are counted
once, in the head, as a matmul.
"""

from __future__ import annotations

import torch.nn as nn

# Dense (no sparsity) peak FLOP/s per GPU by precision, from NVIDIA's data sheets, for the GPUs of
# Azure's NC and ND series. fp32 means plain fp32 math (no TF32): what DeepSpeed's fp32 runs use
# unless TF32 is enabled.
PEAK_FLOPS: dict[str, dict[str, float]] = {
    "V100": {"bf16": 0.0, "fp16": 125e12, "fp32": 15.7e12},       # NCv3, NDv2 (SXM2)
    "T4": {"bf16": 0.0, "fp16": 65e12, "fp32": 8.1e12},           # NCasT4_v3
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},    # NC A100 v4 (PCIe), ND A100 v4
    "H100 NVL": {"bf16": 835e12, "fp16": 835e12, "fp32": 60e12},  # NC H100 v5
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},      # ND H100 v5 (SXM5)
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},      # ND H200 v5
}


def device_peak(device_name: str, precision: str) -> float | None:
    """Peak FLOP/s of a GPU named like torch.cuda.get_device_name() ('NVIDIA H100 80GB HBM3'), or None."""
    name = device_name.upper()
    for key in sorted(PEAK_FLOPS, key=len, reverse=True):  # 'H100 NVL' before 'H100'
        if key in name:
            return PEAK_FLOPS[key].get(precision) or None
    return None


def peak_flops(configured: float | None, device: str, precision: str) -> float | None:
    """metrics.peak_flops when set, else the GPU's peak from the table; None on CPUs (no table: set
    metrics.peak_flops to get MFU)."""
    if configured:
        return configured
    if device.startswith("cuda"):
        import torch

        return device_peak(torch.cuda.get_device_name(device), precision)
    return None


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: the model's own `flops_per_token(seq_len)` if it has one, else 6N."""
    own = getattr(model, "flops_per_token", None)
    if callable(own):
        return float(own(seq_len))
    return 6.0 * sum(p.numel() for p in model.parameters())


def transformer_flops_per_token(non_embedding_params: int, n_layer: int, n_embd: int, seq_len: int) -> float:
    return 6.0 * non_embedding_params + 12.0 * n_layer * n_embd * seq_len
