"""Tabular data with shardrun: an MLP classifier over a Parquet table (data.format: table).

With `data.format: table`, each batch is a dict of tensors, one per column, with the label column
named `label`; shardrun calls `model(**batch)`, so forward's parameters are the column names.
`python -m examples.tabular_model --out DIR` writes a synthetic dataset to try it; see
examples/tabular.yaml.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


class MLP(nn.Module):
    def __init__(self, features: int, hidden: int, classes: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, features: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.net(features), label)


def build(features: int = 8, hidden: int = 64, classes: int = 4) -> nn.Module:
    return MLP(features, hidden, classes)


def make_data(out: Path, rows: int = 20_000, features: int = 8, classes: int = 4, seed: int = 0) -> None:
    """Gaussian clusters, one per class: `features` (fixed-size list of float32) and `label` (int64)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 2, (classes, features)).astype(np.float32)
    label = rng.integers(0, classes, rows)
    x = centers[label] + rng.normal(0, 1, (rows, features)).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    per_file = rows // 4
    for i in range(4):
        sl = slice(i * per_file, (i + 1) * per_file)
        col = pa.FixedSizeListArray.from_arrays(pa.array(x[sl].reshape(-1)), features)
        pq.write_table(pa.table({"features": col, "label": pa.array(label[sl])}),
                       out / f"part-{i:05d}.parquet", row_group_size=1000)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--rows", type=int, default=20_000)
    args = parser.parse_args()
    make_data(args.out, args.rows)
