"""Checkpoint save and load: shardrun's checkpoint.save/load of a DeepSpeed engine against raw file I/O.

Per ZeRO stage and rank count (1 rank alone, 2 under torchrun), in fresh processes: the built-in GPT
(default 8 x 512: 25M parameters, about 400 MB of checkpoint with its AdamW state) in a DeepSpeed
engine built by shardrun, one step trained so that the optimizer holds its state, then per repetition:
  save           shardrun.trainer.checkpoint.save (DeepSpeed's files, the rank files, the manifest)
  save + fsync   the same, then every file of the checkpoint fsync'd: until it is on the disk
  load cold      shardrun.trainer.checkpoint.load with the checkpoint's pages out of the page cache
  load hot       the same again, from the page cache
  raw            the checkpoint's byte count, split among the ranks, written by os.write (8 MiB at a
                 time) with and without fsync, and read back cold and hot: what the disk and the page
                 cache allow
  snapshot       copying the state the save writes (module and optimizer state dicts) in memory: what
                 an asynchronous save would make the loop wait for; serialize: torch.save of it into
                 memory (the CPU share of a save, no disk)

    python bench/checkpoint.py                 # ZeRO 2 and 3, 1 and 2 ranks, 3 repetitions
    python bench/checkpoint.py --record        # the same, appended to docs/benchmarks.md
    python bench/checkpoint.py --quick         # a tiny model, one repetition: checks that it all runs
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import (
    VOCAB,
    Parser,
    deepspeed_cpu_env,
    on_ranks,
    plural,
    positive,
    rank_counts,
    report,
    run_to_end,
    table,
    zero_stages,
)

SECTION = "## Checkpoints"
CHUNK = 8 << 20
SEQ = 64
VERSIONS = ("torch", "deepspeed")
DROP_CACHES = "/proc/sys/vm/drop_caches"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    base = Path(args.dir) if args.dir else None
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="shardrun-ckpt-bench-", dir=base) as work:
        where = describe_fs(work)
        print(f"checkpoints in {work} ({where}); cold reads after {EVICTION[eviction(args)]}", flush=True)
        env = deepspeed_cpu_env()
        results = []
        for world in args.ranks:
            for stage in args.stages:
                res = launch(args, stage, world, Path(work), env)
                results.append(res)
                resident = res["resident_before_cold_load"]
                print(f"  ZeRO {stage}, {plural(world, 'rank')}: {res['bytes'] / 1e6:.0f} MB, save "
                      f"{statistics.median(res['save']):.2f} s, load cold {statistics.median(res['load_cold']):.2f} "
                      f"s ({'?' if resident is None else f'{resident / 1e6:.1f}'} MB of it in the page cache "
                      "before)", flush=True)
    report(SECTION, args, format_tables(results), findings(results), details=[setup(args, results, where)],
           versions_of=VERSIONS)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(__doc__, reps=3, reps_help="saves and loads per stage and rank count", measures="checkpoints",
               quick={"layers": 2, "width": 64, "reps": 1}, quick_help="a tiny model, one repetition")
    p.add_argument("--layers", type=positive, default=8, help="GPT blocks (default 8)")
    p.add_argument("--width", type=int, default=512, help="GPT width, n_embd, a multiple of 8 (default 512: 25M "
                   "parameters, about 400 MB of checkpoint)")
    p.add_argument("--stages", type=zero_stages, default=[2, 3], metavar="N[,N...]", help="ZeRO stages (default 2,3)")
    p.add_argument("--ranks", type=rank_counts, default=[1, 2], metavar="N[,N...]",
                   help="rank counts; 2 or more run under torchrun (default 1,2)")
    p.add_argument("--dir", help="where to write (default: a temporary directory; give a path on the disk "
                   "checkpoints go to)")
    p.add_argument("--drop-caches", action="store_true",
                   help=f"cold reads after writing 3 to {DROP_CACHES} (root; the whole machine's cache) instead of "
                        "evicting the files' own pages with posix_fadvise")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse(argv)
    if args.width < 8 or args.width % 8:
        p.error("--width must be a multiple of 8")
    if args.drop_caches and not args.child and not os.access(DROP_CACHES, os.W_OK):
        p.error(f"--drop-caches: {DROP_CACHES} is not writable here (root, and a /proc/sys that is not "
                "read-only, as in most containers); leave the flag out to evict the files' pages instead")
    return args


EVICTION = {"fadvise": "posix_fadvise(DONTNEED) on each file, after fsync (its clean pages only; no root)",
            "drop_caches": f"echo 3 > {DROP_CACHES} after sync (the whole machine's page cache)"}


def eviction(args: argparse.Namespace) -> str:
    """Which EVICTION the cold reads come after."""
    return "drop_caches" if args.drop_caches else "fadvise"


def describe_fs(path: str) -> str:
    """The file system a path is on, from /proc/self/mounts (the longest mount point above it)."""
    best = ("", "?", "?")
    real = os.path.realpath(path)
    for line in Path("/proc/self/mounts").read_text().splitlines():
        device, point, fstype, *_ = line.split()
        point = point.replace("\\040", " ")
        if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) > len(best[0]):
            best = (point, device, fstype)
    return f"{best[2]} on {best[1]}"


# -- the parent ----------------------------------------------------------------------------------------


def launch(args: argparse.Namespace, stage: int, world: int, work: Path, env: dict[str, str]) -> dict:
    """One stage on world ranks in fresh processes; rank 0's numbers."""
    out = work / f"result-{stage}-{world}.json"
    script = [str(Path(__file__).resolve()), "--child", "--stage", str(stage), "--out", str(out),
              "--layers", str(args.layers), "--width", str(args.width), "--reps", str(args.reps),
              "--dir", str(work / f"zero{stage}-{world}")]
    if args.drop_caches:
        script.append("--drop-caches")
    run_to_end(on_ranks(script, world), env, f"ZeRO {stage} on {world} rank(s)")
    shutil.rmtree(work / f"zero{stage}-{world}", ignore_errors=True)
    return {"stage": stage, "world": world, **json.loads(out.read_text())}


# -- the child: one rank ---------------------------------------------------------------------------------


def run_child(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from shardrun.checkpoint_format import read_manifest
    from shardrun.config import parse
    from shardrun.trainer import checkpoint, engine, models
    from shardrun.trainer.topology import Topology

    topology = Topology.from_env(use_gpu=False)
    spec = parse({"name": "ckpt", "model": {"n_layer": args.layers, "n_head": max(1, args.width // 64),
                                            "n_embd": args.width, "block_size": SEQ, "vocab_size": VOCAB},
                  "data": {"paths": [args.dir], "seq_len": SEQ},
                  "deepspeed": {"zero_stage": args.stage, "precision": "fp32", "micro_batch_size": 1},
                  "scaling": {"num_workers": topology.world_size}, "run": {"max_steps": 10}},
                 source="bench/checkpoint.py")
    torch.manual_seed(0)
    model = models.build(spec.model)
    params = sum(p.numel() for p in model.parameters())
    eng = engine.build(model, spec, topology)
    tokens = torch.randint(0, VOCAB, (1, SEQ + 1))
    eng.backward(eng(tokens[:, :-1], tokens[:, 1:]))  # one step: the optimizer holds its state
    eng.step()
    state = checkpoint.TrainState(step=1, samples=1, tokens=SEQ)
    main = topology.is_main
    root = Path(args.dir)
    if main:
        root.mkdir(parents=True, exist_ok=True)
    dist.barrier()

    def timed(fn) -> float:
        """Seconds from a barrier to a barrier after fn on every rank: the slowest rank's time."""
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - t0

    out = {k: [] for k in ("save", "fsync", "load_cold", "load_hot", "raw_write", "raw_write_fsync",
                           "raw_read_cold", "raw_read_hot", "snapshot", "serialize")}
    for rep in range(args.reps):
        ckpt = root / f"ckpt-{rep}"
        if main:
            ckpt.mkdir()
        dist.barrier()
        out["save"].append(timed(lambda ckpt=ckpt: checkpoint.save(
            eng, str(ckpt), state, {"bench": True}, topology, zero_stage=args.stage, precision="fp32")))
        files = sorted(p for p in ckpt.rglob("*") if p.is_file())
        total = sum(p.stat().st_size for p in files)
        mine = files[topology.rank::topology.world_size]  # each rank syncs a share of the files
        out["fsync"].append(timed(lambda mine=mine: [fsync(p) for p in mine]))
        evict(mine, args.drop_caches and main)
        dist.barrier()
        resident = resident_bytes(files) if main else None
        manifest = read_manifest(str(ckpt))
        out["load_cold"].append(timed(lambda ckpt=ckpt, m=manifest: checkpoint.load(eng, str(ckpt), topology, m)))
        out["load_hot"].append(timed(lambda ckpt=ckpt, m=manifest: checkpoint.load(eng, str(ckpt), topology, m)))

        share = -(-total // topology.world_size)
        raw = root / f"raw-{rep}-{topology.rank}"
        out["raw_write"].append(timed(lambda raw=raw, n=share: write_raw(raw, n, sync=False)))
        out["raw_write_fsync"].append(timed(lambda raw=raw, n=share: write_raw(Path(f"{raw}.sync"), n, sync=True)))
        evict([raw], args.drop_caches and main)
        dist.barrier()
        out["raw_read_cold"].append(timed(lambda raw=raw: read_raw(raw)))
        out["raw_read_hot"].append(timed(lambda raw=raw: read_raw(raw)))
        for path in (raw, Path(f"{raw}.sync")):
            path.unlink()

        snap: list = []
        out["snapshot"].append(timed(lambda snap=snap: snap.append(snapshot(eng))))
        out["serialize"].append(timed(lambda snap=snap: torch.save(snap[0], io.BytesIO())))
        snap.clear()
        dist.barrier()
        if main:
            shutil.rmtree(ckpt)
            print(f"rep {rep + 1}: {total / 1e6:.0f} MB in {len(files)} files; resident before the cold load: "
                  f"{'unknown' if resident is None else f'{resident / 1e6:.1f} MB'}", flush=True)
    if main:
        Path(args.out).write_text(json.dumps({**out, "bytes": total, "files": len(files), "params": params,
                                              "resident_before_cold_load": resident}))
    return 0


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def evict(paths: list[Path], drop_all: bool) -> None:
    """Take the files' pages out of the page cache: they must be clean (fsync'd) to go."""
    for path in paths:
        fsync(path)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    if drop_all:
        os.sync()
        Path(DROP_CACHES).write_text("3\n")


def resident_bytes(paths: list[Path]) -> int | None:
    """Bytes of these files in the page cache (util-linux fincore), or None without it."""
    fincore = shutil.which("fincore")
    if not fincore or not paths:
        return None
    done = subprocess.run([fincore, "--bytes", "--noheadings", "--output", "RES", *map(str, paths)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        return None
    return sum(int(x) for x in done.stdout.split())


def write_raw(path: Path, size: int, *, sync: bool) -> None:
    """size bytes (not zeros) by os.write, CHUNK at a time; fsync'd before the close if sync."""
    block = os.urandom(min(CHUNK, size))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = size
        while left:
            left -= os.write(fd, block[:min(left, len(block))])
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_raw(path: Path) -> None:
    buf = bytearray(CHUNK)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def snapshot(eng) -> dict:
    """A copy of what a save writes (module and optimizer state dicts): the loop's wait in an asynchronous save."""
    import torch

    def copy(x):
        if isinstance(x, torch.Tensor):
            return x.detach().clone()
        if isinstance(x, dict):
            return {k: copy(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(copy(v) for v in x)
        return x

    return copy({"module": eng.module_state_dict(), "optimizer": eng.optimizer.state_dict()})


# -- results ------------------------------------------------------------------------------------------------


def rate(seconds: list[float], nbytes: int) -> str:
    s = statistics.median(seconds)
    return f"{s:.2f} ({nbytes / s / 1e6:,.0f} MB/s)"


def format_tables(results: list[dict]) -> list[str]:
    """Checkpoint save and load, raw file I/O, and what an asynchronous save would wait for; per stage and ranks."""
    ckpt, raw, overlap = [], [], []
    for r in results:
        n, head = r["bytes"], [str(r["stage"]), str(r["world"])]
        synced = [a + b for a, b in zip(r["save"], r["fsync"], strict=True)]
        ckpt.append([*head, f"{n / 1e6:,.0f} ({r['files']})", rate(r["save"], n), rate(synced, n),
                     rate(r["load_cold"], n), rate(r["load_hot"], n)])
        raw.append([*head, rate(r["raw_write"], n), rate(r["raw_write_fsync"], n), rate(r["raw_read_cold"], n),
                    rate(r["raw_read_hot"], n)])
        snap, save = statistics.median(r["snapshot"]), statistics.median(r["save"])
        overlap.append([*head, f"{snap:.2f}", f"{statistics.median(r['serialize']):.2f}", f"{save:.2f}",
                        f"{statistics.median(synced):.2f}", f"{snap / save:.2f}"])
    return [table(["ZeRO", "ranks", "checkpoint (MB, files)", "save (s, MB/s)", "save + fsync", "load cold",
                   "load hot"], ckpt, align="r"),
            table(["ZeRO", "ranks", "raw write (s, MB/s)", "raw write + fsync", "raw read cold", "raw read hot"], raw,
                  align="r"),
            table(["ZeRO", "ranks", "snapshot in memory (s): an async save's wait", "serialize to memory (s)",
                   "save (s)", "save + fsync (s)", "the loop's wait, async / sync"], overlap, align="r")]


def findings(results: list[dict]) -> list[str]:
    out = []
    for r in results:
        save, raw = statistics.median(r["save"]), statistics.median(r["raw_write"])
        cold, read = statistics.median(r["load_cold"]), statistics.median(r["raw_read_cold"])
        snap = statistics.median(r["snapshot"])
        out.append(f"ZeRO {r['stage']}, {plural(r['world'], 'rank')}: save = {save / raw:.1f} x "
                   f"a raw write of its bytes, cold load = {cold / read:.1f} x a raw read; an asynchronous save "
                   f"would keep the loop waiting {snap:.2f} s instead of {save:.2f} s")
    return out


def setup(args: argparse.Namespace, results: list[dict], where: str) -> str:
    """The record's line on what ran."""
    return (f"Setup: GPT {args.layers} x {args.width} ({results[0]['params'] / 1e6:.1f}M parameters), fp32, AdamW; "
            f"checkpoints on {where}; cold reads after {EVICTION[eviction(args)]}; medians of {args.reps} repetitions")


if __name__ == "__main__":
    sys.exit(main())
