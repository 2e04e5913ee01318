"""Data streaming benchmark: tokens per second one rank receives as torch batches.

Four readers deliver the same token shards as {inputs, targets} int64 tensors of micro_batch x
seq_len, the way a training loop consumes them:
  raw       a plain pyarrow scan, file by file, no shuffle: the physical limit
  shardrun  shardrun's Stream (one rank, one partition, default prefetch and shuffle)
  ray       Ray Data: read_parquet, streaming_split(1), iter_torch_batches
  hf        Hugging Face datasets streaming: load_dataset("parquet", streaming=True), torch format

Every repetition of every reader runs in its own process, so its peak memory is its own; the
readers take turns within a repetition, so a busy spell on a shared machine hits them alike.

    python bench/data.py                 # 5 repetitions of 3 epochs, medians, printed
    python bench/data.py --record        # the same, also appended to docs/benchmarks.md
    python bench/data.py --quick         # tiny data, one epoch, no Ray: checks that it all runs (or --smoke)
"""

from __future__ import annotations

import argparse
import glob
import importlib
import importlib.util
import json
import os
import statistics
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from common import SAY, Parser, fresh_ray_env, in_turns, measured_child, positive, report, spread, table

from shardrun.config import DataSpec
from shardrun.datasets import Stream, build_index
from shardrun.datasets.prepare import prepare_stdlib

SECTION = "## Data streaming"
READERS = ("raw", "shardrun", "ray", "hf")
NEEDS = {"ray": "ray", "hf": "datasets"}
"""Reader -> the package it needs (ray comes with shardrun; datasets with shardrun[bench])."""
PRELOAD = {"ray": ("ray", "ray.data"), "hf": ("datasets",)}
"""Optional packages, imported in the child that needs them (not in the parent) before the clock starts."""
COLUMN = "tokens"
RAY_CPUS = 2  # as many as shardrun's default read_threads
# Memory a reader holds: anonymous pages and shared memory (Ray's object store), each process's
# proportional share; not the library code that pages in as it runs.
VERSIONS = ("torch", "pyarrow", "numpy", "ray", "datasets")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    readers = choose_readers(args.only, args.quick)
    data = prepare_data(args.cache, args.seq_len, args.mb)
    per_epoch = data["rows"] // args.micro_batch
    if per_epoch < 1:
        sys.exit(f"bench: {data['rows']} rows make no micro-batch of {args.micro_batch}; use a larger --mb")
    n_batches = per_epoch * args.epochs
    print(f"data: {describe_data(data)}; {args.epochs} x {per_epoch} batches of {args.micro_batch} x "
          f"{args.seq_len} per reader and repetition", flush=True)
    results = {r: [] for r in readers}
    for rep, order in in_turns(readers, args.reps):
        for reader in order:
            res = run_rep(reader, data["dir"], args.seq_len, args.micro_batch, n_batches)
            results[reader].append(res)
            print(f"  rep {rep + 1}/{args.reps} {reader:9s} {res['tokens_per_s'] / 1e6:8.1f} M tokens/s, "
                  f"first batch {res['first_batch_s']:.2f} s, peak +{res['peak_mb']:.0f} MB", flush=True)
    rows = summarize(results)
    details = [f"Data: {describe_data(data).rsplit(' (', 1)[0]}; seq_len {args.seq_len}, micro-batch "
               f"{args.micro_batch}; medians of {args.reps} repetitions of {args.epochs} epochs"]
    report(SECTION, args, [format_table(rows)], findings(rows), details=details, versions_of=VERSIONS)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(__doc__, reps=5, reps_help="repetitions per reader", measures="speed", quick_aliases=("--smoke",),
               quick={"reps": 1, "mb": 1, "epochs": 1},
               quick_help="tiny data, one repetition, no Ray unless --only names it")
    p.add_argument("--seq-len", type=positive, default=512, help="tokens per sample (default 512)")
    p.add_argument("--micro-batch", type=positive, default=16, help="samples per batch (default 16)")
    p.add_argument("--mb", type=float, default=32,
                   help="MB of standard-library text to tokenize (default 32, about all of it)")
    p.add_argument("--epochs", type=positive, default=3,
                   help="passes over the data in each repetition (default 3: about 95 M tokens)")
    p.add_argument("--only", help=f"comma list of readers (default all: {','.join(READERS)})")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "shardrun" / "bench-data",
                   help="where the token shards are prepared and kept (default ~/.cache/shardrun/bench-data)")
    p.add_argument("--child", choices=READERS, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--batches", type=int, help=argparse.SUPPRESS)
    args = p.parse(argv)
    if args.mb <= 0:
        p.error("--mb must be positive")
    return args


def choose_readers(only: str | None, quick: bool) -> list[str]:
    """The readers to run: those named, else every one whose package is installed (but Ray in a quick run)."""
    if only:
        named = [r.strip() for r in only.split(",") if r.strip()]
        unknown = [r for r in named if r not in READERS]
        if unknown or not named:
            sys.exit(f"bench: --only {only}: unknown reader {', '.join(unknown)} (readers: {', '.join(READERS)})")
        missing = [r for r in named if not installed(r)]
        if missing:
            sys.exit(f"bench: {', '.join(missing)} needs {', '.join(NEEDS[r] for r in missing)}: "
                     "pip install 'shardrun[bench]'")
        return named
    readers = [r for r in READERS if installed(r)]
    for r in sorted(set(READERS) - set(readers)):
        print(f"bench: leaving out {r}: {NEEDS[r]} is not installed (pip install 'shardrun[bench]')")
    if quick and "ray" in readers:
        # Ray's start and first batch alone take 15-25 s; --quick --only ...,ray runs it too
        print("bench: leaving out ray in a quick run (name it in --only to run it)")
        readers.remove("ray")
    return readers


def installed(reader: str) -> bool:
    return reader not in NEEDS or importlib.util.find_spec(NEEDS[reader]) is not None


# -- data ----------------------------------------------------------------------------------------


def prepare_data(cache: Path, seq_len: int, mb: float) -> dict:
    """Byte-level token shards of the standard library, made once per (seq_len, size) and kept."""
    out = cache / f"stdlib-s{seq_len}-{mb:g}mb"
    if not out.exists():
        print(f"preparing {out} (once) ...", flush=True)
        prepare_stdlib(out, seq_len, int(mb * 1e6))
    return describe_shards(out)


def describe_shards(out: Path) -> dict:
    files = sorted(glob.glob(str(out / "*.parquet")))
    metas = [pq.read_metadata(f) for f in files]
    row_groups = [m.row_group(j) for m in metas for j in range(m.num_row_groups)]
    return {"dir": str(out), "files": len(files), "rows": sum(m.num_rows for m in metas),
            "row_groups": len(row_groups), "max_row_group_rows": max(rg.num_rows for rg in row_groups),
            "compression": row_groups[0].column(0).compression.lower(),
            "bytes": sum(os.path.getsize(f) for f in files)}


def describe_data(data: dict) -> str:
    return (f"{data['rows']:,} rows in {data['files']} files, {data['row_groups']} row groups of up to "
            f"{data['max_row_group_rows']} rows, {data['compression']}, {data['bytes'] / 1e6:.1f} MB "
            f"({data['dir']})")


# -- one repetition, in a child process ------------------------------------------------------------


def run_rep(reader: str, data_dir: str, seq_len: int, micro_batch: int, n_batches: int) -> dict:
    """Start a child for this reader, let it read n_batches, and sample its memory meanwhile."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", reader, "--data", data_dir,
           "--seq-len", str(seq_len), "--micro-batch", str(micro_batch), "--batches", str(n_batches)]
    res, start_s, peak_mb = measured_child(cmd, child_env(reader), f"the {reader} reader")
    tokens = micro_batch * seq_len
    res.update(start_s=start_s, peak_mb=peak_mb, tokens_per_s=res["batches"] * tokens / res["seconds"],
               after_first_per_s=(res["batches"] - 1) * tokens / max(res["seconds"] - res["first_batch_s"], 1e-9))
    return res


def child_env(reader: str) -> dict[str, str]:
    env = fresh_ray_env(os.environ) if reader == "ray" else dict(os.environ)
    if reader == "hf":
        env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return env


def run_child(args: argparse.Namespace) -> int:
    """In the child: set the reader's runtime up, wait for the parent's go, read, report as JSON."""
    for module in PRELOAD.get(args.child, ()):
        importlib.import_module(module)
    pa.array([0]).to_numpy()  # pyarrow imports pandas (0.2-0.3 s) on the first to_numpy
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
    files = sorted(glob.glob(os.path.join(args.data, "*.parquet")))
    with runtime(args.child):
        print(f"{SAY}ready", flush=True)
        sys.stdin.readline()
        t0 = time.perf_counter()
        batches = READER_FUNCTIONS[args.child](files, args.data, args.seq_len, args.micro_batch)
        first_batch_s, n = None, 0
        for batch in batches:
            n += 1
            if n == 1:
                first_batch_s = time.perf_counter() - t0
                check(batch, args.micro_batch, args.seq_len)
            if n == args.batches:
                break
        seconds = time.perf_counter() - t0
        batches.close()
    if n < args.batches:
        sys.exit(f"{args.child} gave {n} batches, expected {args.batches}")
    print(SAY + json.dumps({"batches": n, "seconds": seconds, "first_batch_s": first_batch_s}), flush=True)
    return 0


def check(batch: dict, micro_batch: int, seq_len: int) -> None:
    """Every reader must hand over what a training step takes: shifted int64 inputs and targets."""
    for k in ("inputs", "targets"):
        t = batch[k]
        if tuple(t.shape) != (micro_batch, seq_len) or t.dtype != torch.int64:
            raise SystemExit(f"{k} is {t.dtype} {tuple(t.shape)}, expected int64 ({micro_batch}, {seq_len})")
    if not torch.equal(batch["inputs"][:, 1:], batch["targets"][:, :-1]):
        raise SystemExit("targets are not inputs shifted by one")


@contextmanager
def runtime(reader: str):
    """What a reader needs around it: for Ray a local cluster (started before the clock runs)."""
    if reader != "ray":
        yield
        return
    import ray

    ray.init(address="local", num_cpus=RAY_CPUS, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()


# -- the readers: each yields {inputs, targets} int64 (micro_batch, seq_len), epoch after epoch -----


def shifted(rows):
    """Token rows (n, seq_len + 1) as int64 inputs and targets shifted by one."""
    t = rows.long()
    return {"inputs": t[:, :-1], "targets": t[:, 1:]}


def read_raw(files, data_dir, seq_len, micro_batch):
    """File by file, record batches to numpy without a copy, micro-batch by micro-batch to int64."""
    while True:  # epoch after epoch, each leaving out its last incomplete batch
        rest = None
        for f in files:
            for rb in pq.ParquetFile(f).iter_batches(columns=[COLUMN]):
                col = rb.column(0)
                rows = col.flatten().to_numpy().reshape(len(col), -1)
                if rest is not None and len(rest):
                    rows = np.concatenate([rest, rows])
                usable = len(rows) - len(rows) % micro_batch
                for i in range(0, usable, micro_batch):
                    yield shifted(torch.from_numpy(rows[i:i + micro_batch]))
                rest = rows[usable:]


def read_shardrun(files, data_dir, seq_len, micro_batch):
    """Rank 0 of 1 as a training loop opens it, with DataSpec's defaults (prefetch, shuffle window)."""
    spec = DataSpec(paths=[data_dir], seq_len=seq_len, partitions=1)
    with Stream(spec, build_index(spec), rank=0, world_size=1, micro_batch_size=micro_batch,
                grad_accum_steps=1) as stream:
        while True:
            yield stream.next_batch()


def read_ray(files, data_dir, seq_len, micro_batch):
    """The split a Ray Train worker gets (streaming_split), as torch batches."""
    import ray  # optional here: imported by the Ray child only (PRELOAD)

    (split,) = ray.data.read_parquet(data_dir).select_columns([COLUMN]).streaming_split(1)
    while True:  # each pass over the split is an epoch, as in a Ray Train loop
        for batch in split.iter_torch_batches(batch_size=micro_batch, drop_last=True):
            yield shifted(batch[COLUMN])


def read_hf(files, data_dir, seq_len, micro_batch):
    """A streaming (iterable) dataset over the files, batched in torch format."""
    import datasets  # optional: pip install 'shardrun[bench]' (PRELOAD)

    # IterableDataset.iter(batch_size) is several times faster than a torch DataLoader over the
    # dataset, which collates sample by sample; the benchmark gives HF its fastest path.
    ds = datasets.load_dataset("parquet", data_files=files, split="train", streaming=True).with_format("torch")
    while True:
        for batch in ds.iter(batch_size=micro_batch, drop_last_batch=True):
            yield shifted(batch[COLUMN])


READER_FUNCTIONS = {"raw": read_raw, "shardrun": read_shardrun, "ray": read_ray, "hf": read_hf}


# -- results -------------------------------------------------------------------------------------


def summarize(results: dict[str, list[dict]]) -> list[dict]:
    """Per reader: its speeds, and the medians of the rest."""
    raw = statistics.median(r["tokens_per_s"] for r in results["raw"]) if results.get("raw") else None
    rows = []
    for reader, reps in results.items():
        speeds = [r["tokens_per_s"] for r in reps]
        median = statistics.median(speeds)
        rows.append({"reader": reader, "speeds": speeds, "median": median, "vs_raw": median / raw if raw else None,
                     **{k: statistics.median(r[k] for r in reps)
                        for k in ("after_first_per_s", "first_batch_s", "peak_mb", "start_s")}})
    return rows


def format_table(rows: list[dict]) -> str:
    header = ["reader", "M tokens/s (median)", "min - max", "vs raw", "M tokens/s after the first batch",
              "first batch (s)", "peak memory (MB)", "process start (s)"]
    return table(header, [[r["reader"], *spread(r["speeds"], 1, 1e6),
                           f"{r['vs_raw']:.2f}" if r["vs_raw"] is not None else "-",
                           f"{r['after_first_per_s'] / 1e6:.1f}", f"{r['first_batch_s']:.2f}", f"{r['peak_mb']:.0f}",
                           f"{r['start_s']:.1f}"] for r in rows])


def findings(rows: list[dict]) -> list[str]:
    """The issue's goal, checked: shardrun at least 0.9 x raw, and ahead of Ray Data and HF."""
    by = {r["reader"]: r for r in rows}
    if "shardrun" not in by:
        return []
    s = by["shardrun"]
    out = []
    if s["vs_raw"] is not None:
        verdict = "meets" if s["vs_raw"] >= 0.9 else "misses"
        out.append(f"shardrun / raw = {s['vs_raw']:.2f}: {verdict} the goal of 0.9")
    for other in ("ray", "hf"):
        if other in by:
            ratio = s["median"] / by[other]["median"]
            out.append(f"shardrun / {other} = {ratio:.1f}: {'ahead' if ratio > 1 else 'behind'}")
    return out


if __name__ == "__main__":
    sys.exit(main())
