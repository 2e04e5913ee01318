"""Start-up: seconds from the command to the first training step, 2 workers on this machine, three ways.

  torchrun     `torchrun --nproc-per-node 2 bare_train.py`: a bare DeepSpeed script (written by the bench)
  TorchTrainer a plain Ray Train TorchTrainer running the same script's function (a local ray.init)
  shardrun     `shardrun run job.yaml`: the CLI, a local Ray, Ray Train V2, shardrun's worker loop
All three train the built-in GPT with the DeepSpeed config shardrun builds for the job (ZeRO-2, fp32,
gloo) on the same Parquet shards. The clock starts when the bench starts the command and stops when
rank 0's second forward begins: a forward pre-hook on the model, the same in all three, so the first
step's optimizer update and whatever the loop does after it count. The bare script and shardrun's
workers also note when the model is built, DeepSpeed is up, the data is open and the first forward
begins (shardrun's from its worker loop's start-up log records); the driver's lines (spec, data
index, Ray up) are timed as they arrive.

    python bench/startup.py                    # 3 repetitions of each way, medians and phases
    python bench/startup.py --record           # the same, appended to docs/benchmarks.md
    python bench/startup.py --quick            # tiny model, one repetition: checks that it all runs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml
from common import (
    REPO,
    SIZES,
    Parser,
    deepspeed_cpu_env,
    fresh_ray_env,
    gpt,
    in_turns,
    on_ranks,
    report,
    running,
    spread,
    table,
    write_rank_tokens,
)

from shardrun.config import parse
from shardrun.trainer.ds_config import build_ds_config

SECTION = "## Start-up"
WAYS = ("torchrun", "ray", "shardrun")
NAMES = {"torchrun": "torchrun", "ray": "TorchTrainer", "shardrun": "shardrun run"}
WORKERS = 2
STEPS = 3
RUN_TIMEOUT_S = 300
VERSIONS = ("torch", "deepspeed", "ray", "pyarrow")
IMPORTS = {
    "python -c pass": None,
    "torch": "torch",
    "deepspeed (with torch)": "deepspeed",
    "ray.train.torch (a TorchTrainer driver)": "ray.train.torch",
    "shardrun.cli (the CLI up to the spec)": "shardrun.cli",
    "shardrun.cluster.launch (shardrun's driver, then)": "shardrun.cluster.launch",
    "shardrun.cluster.worker (a shardrun worker's train_fn)": "shardrun.cluster.worker",
}
"""Import times measured apart, each in a fresh process: what the phases below contain."""

# (label, {way: (from mark, to mark)}): a way that lacks a phase leaves it out; "" is the command's start
PHASES = [
    ("driver or launcher: Python, imports, spec", {"torchrun": ("", "script start"), "ray": ("", "driver imports"),
                                                   "shardrun": ("", "spec")}),
    ("driver: data index (file footers)", {"shardrun": ("spec", "data index")}),
    ("driver: Ray up (shardrun: importing its launcher meanwhile, in a thread)",
     {"ray": ("driver imports", "ray up"), "shardrun": ("data index", "ray up")}),
    ("worker group up (Ray Train: controller, placement group, actors, torch process group)",
     {"ray": ("ray up", "worker start")}),
    ("worker imports (torch, deepspeed)", {"torchrun": ("script start", "imports"),
                                           "ray": ("worker start", "imports")}),
    ("process group (deepspeed.init_distributed)", {"torchrun": ("imports", "process group"),
                                                    "ray": ("imports", "process group")}),
    ("shardrun: worker group up, imports, process group, metrics endpoints, checkpoint lookup",
     {"shardrun": ("ray up", "model")}),
    ("model built", {"torchrun": ("process group", "model"), "ray": ("process group", "model")}),
    ("DeepSpeed init (deepspeed.initialize)", {w: ("model", "deepspeed init") for w in WAYS}),
    ("data open", {w: ("deepspeed init", "data open") for w in WAYS}),
    ("first batch, to the first forward", {w: ("data open", "first forward") for w in WAYS}),
    ("first step (forward, backward, step, then the loop's own work)", {w: ("first forward", "first step")
                                                                         for w in WAYS}),
]

# -- what the bench writes into its directory: the same for every way --------------------------------

MARKS_PY = '''"""Timestamps for bench/startup.py: one JSON line per mark, in $SHARDRUN_BENCH_MARKS/<pid>.jsonl."""
import json
import os
import time


def mark(name, rank=None):
    rank = os.environ.get("RANK", "driver") if rank is None else rank
    with open(os.path.join(os.environ["SHARDRUN_BENCH_MARKS"], f"{os.getpid()}.jsonl"), "a") as f:
        f.write(json.dumps({"name": name, "time": time.time(), "rank": str(rank)}) + "\\n")


def hook(model):
    """Mark the first forward and the second (the first step is then done): a forward pre-hook."""
    calls = []

    def pre_hook(module, inputs):
        calls.append(1)
        if len(calls) <= 2:
            mark("first forward" if len(calls) == 1 else "first step")

    model.register_forward_pre_hook(pre_hook)
'''

BARE_TRAIN_PY = '''"""A bare DeepSpeed training script: torchrun runs it; a plain Ray TorchTrainer calls train()."""
import marks

marks.mark("script start")
import json
import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
import deepspeed
import pyarrow.parquet as pq
import torch

marks.mark("imports")
from gpt import GPT, GPTConfig


def train(job):
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    marks.mark("process group")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    torch.manual_seed(0)
    model = GPT(GPTConfig(**job["model"]))
    marks.hook(model)
    marks.mark("model")
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=job["ds_config"])
    marks.mark("deepspeed init")
    column = pq.read_table(job["data"], columns=["tokens"])["tokens"].combine_chunks()
    rows = torch.from_numpy(column.values.to_numpy().astype("int64").reshape(len(column), -1))
    mb = job["micro_batch"]
    batches = [rows[i * mb:(i + 1) * mb] for i in range(rank, job["steps"] * world, world)]
    marks.mark("data open")
    for batch in batches:
        loss = engine(batch[:, :-1], batch[:, 1:])
        engine.backward(loss)
        engine.step()


if __name__ == "__main__":
    with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "job.json")) as f:
        train(json.load(f))
'''

RAY_DRIVER_PY = '''"""A plain Ray Train TorchTrainer that runs bare_train.train on 2 CPU workers (gloo)."""
import marks

marks.mark("driver start")
import json
import logging
import os
import sys

import ray
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

marks.mark("driver imports")


def train_loop(job):
    import marks

    marks.mark("worker start")
    import bare_train

    bare_train.train(job)


if __name__ == "__main__":
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "job.json")) as f:
        job = json.load(f)
    ray.init(address="local", logging_level=logging.WARNING)  # as shardrun's driver starts a local Ray
    marks.mark("ray up")
    trainer = TorchTrainer(
        train_loop, train_loop_config=job, torch_config=TorchConfig(backend="gloo"),
        scaling_config=ScalingConfig(num_workers=job["workers"], use_gpu=False, resources_per_worker={"CPU": 1},
                                     placement_strategy="PACK"),
        run_config=RunConfig(name="bare", storage_path=sys.argv[1]),
    )
    trainer.fit()
'''

SHARDRUN_MODEL_PY = '''"""shardrun's built-in GPT through a model entrypoint, so that its worker marks its phases."""
import logging

import marks

PHASES = {"engine ready": "deepspeed init", "data open": "data open"}


class StartupMarks(logging.Handler):
    """Marks the worker loop's start-up records: DeepSpeed up (and the latest checkpoint loaded: none here), then
    the data open."""

    def emit(self, record):
        if record.getMessage() in PHASES:
            marks.mark(PHASES[record.getMessage()])


HANDLER = StartupMarks()


def build(**config):
    marks.mark("model")
    from shardrun.trainer.models.gpt import GPT, GPTConfig

    model = GPT(GPTConfig(**config))
    marks.hook(model)
    logger = logging.getLogger("shardrun.trainer.startup")
    logger.setLevel(logging.INFO)  # shardrun leaves it unset: the root's WARNING would drop its records
    logger.addHandler(HANDLER)  # once, however often the model is built
    return model
'''


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="shardrun-startup-") as work:
        work = Path(work)
        prepare(work, SIZES[args.size])
        env = bench_env(work)
        results = {w: [] for w in args.ways}
        for rep, order in in_turns(args.ways, args.reps):
            for way in order:
                results[way].append(RUNNERS[way](work, env, rep))
                print(f"  rep {rep + 1}/{args.reps} {NAMES[way]:13s} first step after "
                      f"{results[way][-1]['first step']:.2f} s", flush=True)
        imports = measure_imports(env, args.reps, quick=args.quick)
    report(SECTION, args, format_tables(results, imports), findings(results), details=[setup(args)],
           versions_of=VERSIONS)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(__doc__, reps=3, reps_help="repetitions of each way", quick={"size": "tiny", "reps": 1},
               quick_help="tiny model, one repetition", measures="start-up")
    p.add_argument("--size", choices=SIZES, default="demo", help="model and micro-batch (default demo, "
                   "examples/gpt-stdlib.yaml's)")
    p.add_argument("--only", help=f"comma list of ways (default all: {','.join(WAYS)})")
    args = p.parse(argv)
    args.ways = list(WAYS)
    if args.only:
        args.ways = [w.strip() for w in args.only.split(",") if w.strip()]
        unknown = [w for w in args.ways if w not in WAYS]
        if unknown or not args.ways:
            p.error(f"--only {args.only}: unknown way {', '.join(unknown)} (ways: {', '.join(WAYS)})")
    return args


def prepare(work: Path, size: dict) -> None:
    """Data, the model's source, the scripts, and the job every way runs (as job.json and job.yaml)."""
    data = write_rank_tokens(work / "data", size, WORKERS, 4 * STEPS)
    shutil.copy(REPO / "shardrun" / "trainer" / "models" / "gpt.py", work / "gpt.py")
    for name, text in (("marks.py", MARKS_PY), ("bare_train.py", BARE_TRAIN_PY), ("ray_train.py", RAY_DRIVER_PY),
                       ("shardrun_model.py", SHARDRUN_MODEL_PY)):
        (work / name).write_text(text)
    model = gpt(size)
    spec = {
        "name": "startup",
        "model": {"entrypoint": "shardrun_model:build", "args": model},
        "data": {"paths": [data], "seq_len": size["seq_len"], "seed": 0},
        "deepspeed": {"zero_stage": 2, "precision": "fp32", "micro_batch_size": size["micro_batch"],
                      "optimizer": {"type": "adamw", "lr": 1e-3, "weight_decay": 0.1},
                      "schedule": {"warmup_steps": 1, "decay": "constant"}},
        "scaling": {"num_workers": WORKERS, "use_gpu": False, "cpus_per_worker": 1},
        "checkpoint": {"storage": str(work / "runs"), "every_steps": STEPS, "keep": 1},
        "metrics": {"enabled": True, "host": "127.0.0.1", "targets_dir": str(work / "targets")},
        "failure": {"scheduled_events": "off"},
        "run": {"max_steps": STEPS, "seed": 0},
    }
    resolved = parse(spec, source="bench/startup.py")
    ds_config = build_ds_config(resolved.deepspeed, max_steps=STEPS, on_gpu=False,
                                grad_accum_steps=resolved.grad_accum_for(WORKERS))
    job = {"model": model, "ds_config": ds_config, "data": data, "micro_batch": size["micro_batch"], "steps": STEPS,
           "workers": WORKERS}
    (work / "job.json").write_text(json.dumps(job))
    (work / "job.yaml").write_text(yaml.safe_dump(spec))


def bench_env(work: Path) -> dict[str, str]:
    """One environment for every way: the scripts importable, DeepSpeed on CPU with its compiled comm op ready
    (its build is not start-up), and a fresh local Ray."""
    return fresh_ray_env(deepspeed_cpu_env(
        PYTHONPATH=os.pathsep.join(filter(None, [str(work), os.environ.get("PYTHONPATH")])), PYTHONUNBUFFERED="1"))


# -- running one way --------------------------------------------------------------------------------------


def timed_run(cmd: list[str], env: dict, work: Path, what: str) -> tuple[float, list[tuple[float, str]], dict]:
    """Run cmd until rank 0 marks its first step, then end it (the rest is not timed); its start time, its output
    lines with their arrival times, and the marks it wrote."""
    marks_dir = Path(tempfile.mkdtemp(prefix="marks-", dir=work))
    env = {**env, "SHARDRUN_BENCH_MARKS": str(marks_dir)}
    lines: list[tuple[float, str]] = []
    start = time.time()
    with running(cmd, env, RUN_TIMEOUT_S, stderr=subprocess.STDOUT, cwd=work) as (proc, cut):
        reader = threading.Thread(target=lambda: lines.extend((time.time(), line) for line in proc.stdout),
                                  daemon=True)
        reader.start()
        marks: dict[str, float] = {}
        while "first step" not in marks and proc.poll() is None and not cut.is_set():
            time.sleep(0.1)
            marks = read_marks(marks_dir)
        time.sleep(0.5)  # the driver's line of step 1 (shardrun's progress is polled every second)
    reader.join(timeout=10)
    marks = read_marks(marks_dir)
    if "first step" not in marks:
        why = "timed out" if cut.is_set() else f"exit {proc.returncode}"
        sys.exit(f"bench: {what} ended before its first step ({why}):\n" + "".join(line for _, line in lines[-40:]))
    return start, lines, marks


def read_marks(marks_dir: Path) -> dict[str, float]:
    """The first time of each mark on rank 0 (or the driver)."""
    out: dict[str, float] = {}
    for path in marks_dir.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            m = json.loads(line)
            if m["rank"] in ("0", "driver"):
                out[m["name"]] = min(out.get(m["name"], m["time"]), m["time"])
    return out


def relative(start: float, marks: dict[str, float]) -> dict[str, float]:
    return {name: t - start for name, t in marks.items()}


def run_torchrun(work: Path, env: dict, rep: int) -> dict:
    start, _, marks = timed_run(on_ranks([str(work / "bare_train.py")], WORKERS), env, work,
                                "torchrun with the bare script")
    return relative(start, marks)


def run_ray(work: Path, env: dict, rep: int) -> dict:
    storage = work / f"ray-results-{rep}"
    start, _, marks = timed_run([sys.executable, str(work / "ray_train.py"), str(storage)], env, work,
                                "the plain TorchTrainer")
    return relative(start, marks)


DRIVER_LINES = {"spec": "[shardrun] startup: ", "data index": "[shardrun] data: ",
                "ray up": "[shardrun] connecting to ", "driver saw step 1": "[shardrun] step      1/"}
"""shardrun's own driver lines, timed as they arrive (each is printed and flushed when its phase is done)."""


def run_shardrun(work: Path, env: dict, rep: int) -> dict:
    cmd = [sys.executable, "-m", "shardrun", "run", str(work / "job.yaml"),
           "--set", f"checkpoint.storage={work / f'runs-{rep}'}"]
    start, lines, marks = timed_run(cmd, env, work, "shardrun run")
    for name, prefix in DRIVER_LINES.items():
        seen = [t for t, line in lines if line.startswith(prefix)]
        if seen:
            marks[name] = seen[0]
    return relative(start, marks)


RUNNERS = {"torchrun": run_torchrun, "ray": run_ray, "shardrun": run_shardrun}


def measure_imports(env: dict, reps: int, *, quick: bool = False) -> dict[str, list[float]]:
    """Seconds to import each module in a fresh Python (after the interpreter's own start); --quick: the light ones."""
    out = {}
    for label, module in IMPORTS.items():
        if quick and module not in (None, "shardrun.cli"):
            continue
        code = ("import time; t = time.perf_counter()" + (f"; import {module}" if module else "")
                + "; print(time.perf_counter() - t)")
        if module is None:  # the interpreter's start itself, from outside
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-c", "pass"], env=env, check=True)
                times.append(time.perf_counter() - t0)
        else:
            times = [float(subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                                          text=True).stdout.split()[-1]) for _ in range(reps)]
        out[label] = times
    return out


# -- results --------------------------------------------------------------------------------------------


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f}"


def format_tables(results: dict[str, list[dict]], imports: dict[str, list[float]]) -> list[str]:
    """The ways' times to the first step, their phases, and the import times."""
    ways = list(results)
    ray = statistics.median(r["first step"] for r in results["ray"]) if results.get("ray") else None
    totals = []
    for way in ways:
        firsts = [r["first step"] for r in results[way]]
        totals.append([NAMES[way], *spread(firsts), f"{statistics.median(firsts) / ray:.2f}" if ray else "-"])

    phases = []
    for label, spans in PHASES:
        cells = []
        for way in ways:
            span = spans.get(way)
            runs = [r for r in results[way] if span and (not span[0] or span[0] in r) and span[1] in r]
            cells.append(med([r[span[1]] - (r[span[0]] if span[0] else 0.0) for r in runs]) if runs else "")
        if any(cells):
            phases.append([label, *cells])
    phases.append(["**command to first step**", *(med([r["first step"] for r in results[w]]) for w in ways)])
    if "shardrun" in results and all("driver saw step 1" in r for r in results["shardrun"]):
        late = [r["driver saw step 1"] - r["first step"] for r in results["shardrun"]]
        phases.append(["shardrun's driver prints step 1 this much later (progress is polled every 1 s)",
                       *(med(late) if w == "shardrun" else "" for w in ways)])

    return [table(["way", "command to first step (s), median", "min - max", "vs TorchTrainer"], totals),
            table(["phase (s, medians)", *(NAMES[w] for w in ways)], phases),
            table(["import, in a fresh Python (s)", "median", "min - max"],
                  [[label, *spread(times)] for label, times in imports.items()])]


def findings(results: dict[str, list[dict]]) -> list[str]:
    """The issue's goal: shardrun no slower than a plain TorchTrainer; and how far from torchrun."""
    first = {w: statistics.median(r["first step"] for r in rs) for w, rs in results.items()}
    out = []
    if "shardrun" in first and "ray" in first:
        diff = first["shardrun"] - first["ray"]
        verdict = "meets" if diff <= 0 else "misses"
        out.append(f"shardrun run - TorchTrainer = {diff:+.2f} s to the first step: {verdict} the goal "
                   "(no slower than a plain TorchTrainer)")
    if "shardrun" in first and "torchrun" in first:
        out.append(f"shardrun run - torchrun = {first['shardrun'] - first['torchrun']:+.2f} s to the first step")
    return out


def setup(args: argparse.Namespace) -> str:
    """The record's line on what ran."""
    s = SIZES[args.size]
    return (f"Setup: {WORKERS} CPU workers (gloo), GPT {s['n_layer']} x {s['n_embd']}, seq {s['seq_len']}, "
            f"micro-batch {s['micro_batch']}, ZeRO-2 fp32, {STEPS} steps; medians of {args.reps} repetitions, the "
            "ways taking turns")


if __name__ == "__main__":
    sys.exit(main())
