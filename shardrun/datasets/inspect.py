"""`shardrun data inspect`: what a set of Parquet files holds, and how many steps an epoch makes."""

from __future__ import annotations

from shardrun.datasets.index import DataIndex
from shardrun.datasets.plan import Plan


def steps_per_epoch(index: DataIndex, global_batch: int, partitions: int, seed: int = 0,
                    window: int = 8192) -> int:
    plan = Plan(index.rg_rows, partitions=partitions, seed=seed, window=window)
    return plan.steps_in_epoch(0, global_batch // partitions)


def summary(index: DataIndex, global_batch: int, partitions: int, seq_len_from_files: int | None = None) -> str:
    """One line for the driver's log; `seq_len_from_files`: data.seq_len was unset and taken from the files."""
    steps = steps_per_epoch(index, global_batch, partitions)
    taken = (f"; data.seq_len {seq_len_from_files}, taken from the files (unset in the spec)"
             if seq_len_from_files else "")
    files = f"{len(index.files)} file{'s' if len(index.files) != 1 else ''}"
    return (f"data: {files}, {index.rows:,} rows in {index.num_row_groups:,} row groups, "
            f"{index.bytes / 1e6:,.1f} MB; {partitions} partition{'s' if partitions != 1 else ''}, "
            f"{steps:,} steps per epoch at a global batch of {global_batch}{taken}")


def report(index: DataIndex, global_batch: int | None, partitions: int | None, *,
           max_files: int = 20) -> str:
    """Files, rows, row groups, bytes, schema and (for a global batch) steps per epoch over `partitions`
    (default 1)."""
    lines = [f"{'file':<60} {'rows':>10} {'row groups':>10} {'MB':>9}"]
    for f in index.files[:max_files]:
        lines.append(f"{f.name[-60:]:<60} {sum(f.row_groups):>10,} {len(f.row_groups):>10,} "
                     f"{f.size / 1e6:>9,.2f}")
    if len(index.files) > max_files:
        lines.append(f"... and {len(index.files) - max_files} more files")
    sizes = index.rg_rows
    lines += [
        f"total: {len(index.files)} files, {index.rows:,} rows, {index.num_row_groups:,} row groups "
        f"({sizes.min():,} to {sizes.max():,} rows each), {index.bytes / 1e6:,.1f} MB",
        "schema: " + ", ".join(f"{c}: {t}" for c, t in index.schema.items()),
    ]
    if index.metadata:
        lines.append("written by shardrun: " + ", ".join(f"{k.removeprefix('shardrun.')} {v}"
                                                         for k, v in index.metadata.items()))
    for name, why in index.skipped:
        lines.append(f"skipped: {name}: {why}")
    if global_batch:
        p = partitions or 1
        lines.append(f"steps per epoch: {steps_per_epoch(index, global_batch, p):,} at a global batch of "
                     f"{global_batch} over {p} partitions")
    return "\n".join(lines)
