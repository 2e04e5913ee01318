"""Runner overhead: shardrun's worker loop against a bare DeepSpeed loop, same model, data and config.

Two loops train the built-in GPT, or with --size llama a transformers Llama of the demo GPT's shape, with the
same DeepSpeed config (shardrun's build_ds_config of one job spec), each in a fresh process, one rank alone and
then 2 gloo ranks under torchrun:
  bare      deepspeed.initialize, then forward / backward / step over micro-batches read from the
            Parquet shards into tensors before training: nothing else
  shardrun  `shardrun train`'s path (shardrun.driver.local.run_local: the worker loop, Parquet streamed
            by shardrun.datasets, Prometheus metrics, metrics.jsonl, the per-step stop/preemption flags,
            checkpoint bookkeeping; the one save comes after the last timed step)
Both are timed the same way, attached to the engine (shardrun's through its worker's "engine ready"
start-up record): a forward pre-hook on the model notes the clock as each step's forward begins (a
window of steps holds everything a loop does between two forwards), and wrappers on the engine's
forward, backward and step add up the time inside DeepSpeed (the rest is the loop's own).
Repetitions alternate the order (bare first, then shardrun first), and the ratio is taken per pair.

The Llama (fp32, SDPA attention, untied embeddings) gets random weights written by save_pretrained into the
bench's temporary folder before any run; shardrun loads it as `model: {hf: {path: FOLDER}}`, the bare loop with
shardrun's models.hf.build from the same folder: the same transformers model in the same CausalLM wrapper, whose
loss is mean_token_loss over its logits.

--tracking logs shardrun's run to an MLflow server the bench starts on loopback (tests/servers.py's MlflowServer:
`mlflow server` from .tools/mlflow, SQLite backend, 1 worker), its job spec with `tracking: {mlflow: {tracking_uri,
experiment, run_name}}`, and run.log_every 1 unless --log-every says otherwise (every step's record goes to the
tracker); the bare loop is unchanged. Each shardrun run says its console lines about tracking ("tracking: ..."),
which the bench shows and checks, and how long the trackers held up the end of the run (Tracking.close):
  mlflow          the server answers throughout: what tracking costs per step (the server shares the machine's
                  cores; its CPU in the timed window is shown)
  mlflow-stalled  the server stops answering (SIGSTOP to its process group, connections left open) before the
                  first timed step, once the run's tracker has opened its MLflow run and sent its parameters, tags
                  and a first step's metrics, and is continued after the run: every timed step's record goes to a
                  server that does not answer. Expected: the same speed, the tracker's warning once, and at the end
                  a line on the records that did not reach it

    python bench/overhead.py                   # demo model, 5 pairs of 100 timed steps, 1 then 2 ranks
    python bench/overhead.py --record          # the same, appended to docs/benchmarks.md
    python bench/overhead.py --profile         # where shardrun's loop spends its time (cProfile; or py-spy)
    python bench/overhead.py --quick           # tiny model, a few steps: checks that it all runs
    python bench/overhead.py --size llama      # the Llama instead of the GPT (--quick: a tiny Llama)
    python bench/overhead.py --tracking mlflow          # shardrun's loop logs every step to a local MLflow server
    python bench/overhead.py --tracking mlflow-stalled  # ... to one that stops answering before the timed steps
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import glob
import importlib.util
import json
import os
import pstats
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path

from common import (
    REPO,
    SEED,
    VOCAB,
    Parser,
    deepspeed_cpu_env,
    gpt,
    in_turns,
    on_ranks,
    on_startup,
    plural,
    positive,
    rank_counts,
    report,
    run_to_end,
    running,
    spread,
    table,
    write_llama,
    write_rank_tokens,
)
from common import SIZES as GPT_SIZES
from gpu import pinned_batches

from shardrun.net import free_port

SECTION = "## Runner overhead"
GOAL = 0.02
SAY = "bench-window: "  # the child's window marks among whatever DeepSpeed prints
VERSIONS = ("torch", "deepspeed", "pyarrow", "prometheus-client")
SHARDRUN_DIR = str(REPO / "shardrun") + os.sep
SHARDRUN_FRAME = re.compile(r"\((?:[^()]*/)?shardrun/([\w/]+)\.py:(\d+)\)$")
"""A py-spy frame of a shardrun module: "func (.../shardrun/trainer/loop.py:123)"."""
MODELS = "trainer/models/"
"""The built-in GPT, and the Llama's wrapper and loss: shardrun's code, but the same in both loops; left out of
the profiles' tables."""
SIZES = {
    **GPT_SIZES,
    # transformers' Llama in the demo GPT's shape (4 x 128, seq 128, micro-batch 16), its MLP about 8/3 of its
    # width as Llama's are, 2 KV heads; and its --quick size
    "llama": {"hf": {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "intermediate_size": 352}, "seq_len": 128, "micro_batch": 16},
    "llama-tiny": {"hf": {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
                          "num_key_value_heads": 1, "intermediate_size": 64}, "seq_len": 32, "micro_batch": 4},
}
"""The built-in GPT's sizes (common.SIZES) and the Llama's (model.hf)."""
QUICK_SIZES = {"demo": "tiny", "llama": "llama-tiny"}
"""The size --quick runs in place of each."""
TRACKING = ("mlflow", "mlflow-stalled")
"""--tracking's variants: an MLflow server that answers, or one that stops answering before the timed steps."""
STALLED = "mlflow-stalled"
SETTLE_S = (0.05, 2, 90.0)
"""The MLflow server is settled once it uses under 0.05 CPU seconds a second, 2 seconds in a row (90 s at most):
after it first answers it spends several seconds of both cores of a 2-core machine on its start (its job runner,
its database), which would slow whichever loop runs first."""
OPEN_WAIT_S = 60.0
"""--tracking mlflow-stalled: how long the child waits, before the timed steps, for the tracker's first metrics to
reach the server (its run opened, its parameters and tags sent)."""
TRACKING_LINE = re.compile(r"\[shardrun\] (tracking: .*)$")
"""shardrun's console lines about tracking (shardrun.driver.tracking's emit: "[shardrun] tracking: ...")."""
WARNINGS = {"failed": re.compile(r"^tracking: \S+ failed \("),
            "behind": re.compile(r"^tracking: \S+ is .* records behind")}
"""The tracker's warnings during the run, each said at most once (shardrun.driver.tracking)."""
UNREACHED = re.compile(r"^tracking: \d+ of the run's records did not reach ")
"""The end-of-run line on what could not be sent."""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    # torchrun keeps an OMP_NUM_THREADS it finds
    env = deepspeed_cpu_env(**({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    env.pop("MLFLOW_TRACKING_URI", None)  # shardrun's loop tracks with --tracking only, and to the bench's server
    with tempfile.TemporaryDirectory(prefix="shardrun-overhead-") as work:
        work = Path(work)
        data = write_rank_tokens(work / "data", SIZES[args.size], max(args.ranks), 2 * total_steps(args))
        params = write_model(args, work)
        with tracking_server(args, work, env) as server:
            if args.profile:
                for world in args.ranks:
                    profile(args, world, data, work, env, server)
                return 0
            rows = summarize(measure(args, data, work, env, server))
    tables = [format_table(rows), *([format_tracking(rows, args)] if args.tracking else [])]
    report(SECTION, args, tables, findings(rows, args), details=[setup(args, params), *tracking_setup(args, rows)],
           versions_of=VERSIONS + (("transformers",) if args.hf_model else ()) + (("mlflow-skinny",) if args.tracking
                                                                                  else ()))
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(__doc__, reps=5, reps_help="pairs of runs (bare and shardrun) per rank count", measures="overhead",
               quick={"reps": 1, "steps": 6, "warmup_steps": 2},
               quick_help="tiny model (the GPT's or the Llama's), 1 pair of 6 timed steps")
    p.add_argument("--steps", type=positive, default=100, help="timed steps per run (default 100)")
    p.add_argument("--warmup-steps", type=positive, default=10, help="steps before the timed window (default 10)")
    p.add_argument("--ranks", type=rank_counts, default=[1, 2], metavar="N[,N...]",
                   help="rank counts, one after the other; 2 or more run under torchrun (default 1,2)")
    p.add_argument("--zero-stage", type=int, choices=range(4), default=2, help="deepspeed.zero_stage (default 2)")
    p.add_argument("--size", choices=SIZES, default="demo",
                   help="model and micro-batch: demo (examples/gpt-stdlib.yaml's GPT), llama (a transformers Llama "
                        "of the demo's shape and micro-batch), or their --quick sizes tiny and llama-tiny "
                        "(default demo)")
    p.add_argument("--log-every", type=positive,
                   help="shardrun's run.log_every (default 25, the demo's; 1 with --tracking, so that every step's "
                        "record goes to the tracker; 3 with --quick)")
    p.add_argument("--tracking", choices=TRACKING,
                   help="shardrun's loop logs to an MLflow server the bench starts on loopback: mlflow (it answers) "
                        "or mlflow-stalled (it stops answering, SIGSTOP, before the first timed step); the bare "
                        "loop is unchanged (default: no tracking)")
    p.add_argument("--threads", type=positive, help="torch threads per rank in both loops (OMP_NUM_THREADS; default: "
                   "torch's own choice, all cores for one rank, 1 per rank under torchrun)")
    p.add_argument("--profile", nargs="?", const="cprofile", choices=("cprofile", "py-spy"),
                   help="instead of the comparison, profile shardrun's timed window and print its costliest "
                        "functions: cProfile (the default: exact calls, main thread) or py-spy (sampling, every "
                        "thread; on 2 cores its own CPU use slows the step several times)")
    p.add_argument("--top", type=positive, default=25, help="functions shown by --profile (default 25)")
    p.add_argument("--child", choices=("bare", "shardrun"), help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--runs", help=argparse.SUPPRESS)
    p.add_argument("--hf-model", help=argparse.SUPPRESS)
    p.add_argument("--profiler", choices=("py-spy", "cprofile"), help=argparse.SUPPRESS)
    p.add_argument("--tracking-uri", help=argparse.SUPPRESS)
    p.add_argument("--server-pid", type=int, help=argparse.SUPPRESS)
    args = p.parse(argv)
    if args.log_every is None:
        args.log_every = 1 if args.tracking else 3 if args.quick else 25
    if args.profile and args.record:
        p.error("--profile runs no comparison; nothing to --record")
    if args.quick:
        args.size = QUICK_SIZES.get(args.size, args.size)
    if "hf" in SIZES[args.size] and importlib.util.find_spec("transformers") is None:
        p.error(f"--size {args.size} is a transformers model: install shardrun's hf extra (pip install -e '.[hf]')")
    if args.tracking and not args.child and importlib.util.find_spec("mlflow") is None:
        p.error("--tracking needs MLflow's client: install shardrun's mlflow extra (pip install -e '.[mlflow]')")
    return args


def write_model(args: argparse.Namespace, work: Path) -> int | None:
    """The Llama's weights, written before any clock into work/llama (args.hf_model, which both loops load); its
    parameter count. Nothing for the GPT, which each loop builds from the seed."""
    s = SIZES[args.size]
    if "hf" not in s:
        return None
    args.hf_model = str(work / "llama")
    return write_llama(work / "llama", VOCAB, max_position_embeddings=s["seq_len"], **s["hf"])


def total_steps(args: argparse.Namespace) -> int:
    """Warm-up, timed, and one more step whose forward closes the window (the final save follows it)."""
    return args.warmup_steps + args.steps + 1


# -- the parent: pairs of fresh processes ----------------------------------------------------------


@contextlib.contextmanager
def tracking_server(args: argparse.Namespace, work: Path, env: dict[str, str]) -> Iterator:
    """With --tracking, an MLflow server on loopback (tests/servers.py's MlflowServer) for the shardrun loop's
    tracker, stopped on the way out whatever happens (an error, Ctrl-C, SIGTERM); None without. Sets
    args.tracking_uri and args.server_pid for the children, keeps loopback out of any proxy in env, and MLflow's
    usage telemetry off in the server and the children (MLflow 3 turns it on by default; the variables
    MlflowServer sets do not turn it off outside pytest, and its thread can crash the server's start)."""
    if not args.tracking:
        yield None
        return
    sys.path.insert(0, str(REPO / "tests"))
    from servers import MlflowServer, ServerError, loopback_no_proxy

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # the server's environment is made from ours
    # SIGTERM unwinds like Ctrl-C, through the finally below
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        for attempt in range(2):
            try:
                server = MlflowServer(work / f"mlflow-{attempt}")
                break
            except ServerError as e:
                if attempt:
                    sys.exit(f"bench: --tracking: {e}")
                print(f"bench: the MLflow server did not start ({str(e).splitlines()[0]}); trying once more",
                      flush=True)
        try:
            args.tracking_uri, args.server_pid = server.uri, server.process.proc.pid
            settled = settle(args.server_pid)
            env.update(NO_PROXY=loopback_no_proxy(env.get("NO_PROXY")), no_proxy=loopback_no_proxy(env.get("no_proxy")),
                       MLFLOW_DISABLE_TELEMETRY=os.environ["MLFLOW_DISABLE_TELEMETRY"])
            paused = ", and it is paused (SIGSTOP) before the first timed step of each shardrun run" \
                if args.tracking == STALLED else ""
            print(f"tracking: {args.tracking}: {server_version()} server at {server.uri} (answering in "
                  f"{server.process.startup_s:.1f} s, idle {settled}); shardrun's loop logs every "
                  f"{plural(args.log_every, 'step')} to it{paused}", flush=True)
            yield server
        finally:
            server.stop()  # continued first if paused
    finally:
        signal.signal(signal.SIGTERM, previous)


def settle(pid: int) -> str:
    """Wait until the server's processes are idle (SETTLE_S); how long that took, for the output."""
    limit, quiet, most = SETTLE_S
    start = time.monotonic()
    last, calm = tree_cpu_seconds(pid), 0
    while calm < quiet and time.monotonic() - start < most:
        time.sleep(1.0)
        now = tree_cpu_seconds(pid)
        calm = calm + 1 if now - last < limit else 0
        last = now
    waited = time.monotonic() - start
    return f"{waited:.0f} s later" if calm >= quiet else f"NOT after {waited:.0f} s (it still uses CPU)"


def server_version() -> str:
    """The MLflow server and its version ("MLflow 3.17.2"): the mlflow distribution in its venv (.tools/mlflow)."""
    import importlib.metadata

    site = sorted(glob.glob(str(REPO / ".tools" / "mlflow" / "lib" / "python*" / "site-packages")))
    found = [d.version for d in importlib.metadata.distributions(path=site) if d.metadata["Name"] == "mlflow"]
    return f"MLflow {found[0]}" if found else "MLflow"


def measure(args: argparse.Namespace, data: str, work: Path, env: dict[str, str], server=None) -> dict[int, list[dict]]:
    """Per rank count, the pairs: {"bare": run, "shardrun": run}, taking turns at going first."""
    results: dict[int, list[dict]] = {}
    print(f"shardrun's loop logs every {plural(args.log_every, 'step')}; tracking: "
          f"{args.tracking or 'off (MLFLOW_TRACKING_URI unset for the children)'}", flush=True)
    for world in args.ranks:
        results[world] = []
        for rep, order in in_turns(["bare", "shardrun"], args.reps):
            pair = {loop: launch(args, loop, world, data, work, env, server) for loop in order}
            results[world].append(pair)
            b, s = pair["bare"]["step_s"], pair["shardrun"]["step_s"]
            print(f"  {plural(world, 'rank')}, pair {rep + 1}/{args.reps} ({order[0]} first): bare "
                  f"{b * 1e3:.2f} ms/step ({pair['bare']['outside_s'] * 1e3:.3f} outside DeepSpeed), shardrun "
                  f"{s * 1e3:.2f} ms/step ({pair['shardrun']['outside_s'] * 1e3:.3f}), ratio {s / b:.4f}; CPU "
                  f"(all threads / main thread) {cpu(pair['bare'])} and {cpu(pair['shardrun'])} ms/step", flush=True)
            if args.tracking:
                print_tracking(args, pair["shardrun"]["tracking"])
    return results


def print_tracking(args: argparse.Namespace, seen: dict) -> None:
    """What one shardrun run said about tracking, and the checks on it."""
    for line in seen["lines"] or ["(no line about tracking)"]:
        print(f"    {line}")
    once = all(seen[k] <= 1 for k in WARNINGS)
    expected = args.tracking == STALLED
    reached = ("said" if seen["unreached"] else "MISSING (expected in the stalled variant)") if expected else \
        ("said: NOT EXPECTED with a server that answers" if seen["unreached"] else "not said (all sent)")
    close = f"{seen['close_s']:.1f} s" if seen["close_s"] is not None else "not measured"
    server = f"{seen['server_cpu_s'] / args.steps * 1e3:.2f} ms/step" if seen["server_cpu_s"] is not None else "-"
    pause = ""
    if expected and not seen["paused"]:
        pause = "; server NOT PAUSED"
    elif expected:
        pause = "; server paused before the timed steps" + ("" if seen["ready"] else
                                                            f" BEFORE the tracker's first metrics reached it (waited "
                                                            f"{OPEN_WAIT_S:.0f} s)")
    print(f"    checks: warnings failed/behind {seen['failed']}/{seen['behind']} "
          f"({'at most once each' if once else 'MORE THAN ONCE'}); end-of-run 'did not reach' line {reached}; "
          f"end-of-run wait for the trackers (Tracking.close) {close}; MLflow server CPU in the window {server}{pause}",
          flush=True)


def cpu(run: dict) -> str:
    return f"{run['cpu_s'] * 1e3:.0f}/{run['main_cpu_s'] * 1e3:.0f}"


def child_command(args: argparse.Namespace, loop: str, world: int, data: str, out: Path, runs: Path,
                  profiler: str | None = None) -> list[str]:
    """The command of one loop's run on world ranks: this script as --child (shardrun's with the tracking server)."""
    script = [str(Path(__file__).resolve()), "--child", loop, "--data", data, "--out", str(out), "--runs", str(runs),
              "--size", args.size, "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps),
              "--zero-stage", str(args.zero_stage), "--log-every", str(args.log_every),
              *(["--hf-model", args.hf_model] if args.hf_model else []),
              *(["--tracking", args.tracking, "--tracking-uri", args.tracking_uri, "--server-pid",
                 str(args.server_pid)] if args.tracking and loop == "shardrun" else [])]
    return on_ranks([*script, "--profiler", profiler] if profiler else script, world)


def launch(args: argparse.Namespace, loop: str, world: int, data: str, work: Path, env: dict[str, str],
           server=None) -> dict:
    """One run in fresh processes; its timed window from rank 0's marks (and, tracking, what it said about it)."""
    out = Path(tempfile.mkstemp(prefix=f"{loop}-", suffix=".json", dir=work)[1])
    runs = Path(tempfile.mkdtemp(prefix="runs-", dir=work))
    try:
        lines = run_to_end(child_command(args, loop, world, data, out, runs), env,
                           f"the {loop} loop on {world} rank(s)")
    finally:
        if server is not None and loop == "shardrun" and args.tracking == STALLED:
            server.resume()  # paused by the child before its timed steps
    if server is not None and loop == "shardrun" and args.tracking == STALLED:
        settle(args.server_pid)  # the requests the client gave up on, answered now: not during the next run
    shutil.rmtree(runs, ignore_errors=True)
    result = json.loads(out.read_text())
    marks = result["marks"]
    w, n = args.warmup_steps, args.steps
    step = (marks[w + n] - marks[w]) / n
    if args.tracking and loop == "shardrun":
        result["tracking"] = tracking_seen(lines, result)
    return {**result, "step_s": step, "outside_s": step - (result["inside"][w + n] - result["inside"][w]) / n,
            "gc_s": (result["gc"][w + n] - result["gc"][w]) / n, "cpu_s": result["cpu"][0] / n,
            "main_cpu_s": result["cpu"][1] / n}


def tracking_seen(lines: list[str], result: dict) -> dict:
    """A shardrun run's lines about tracking, its warnings counted, its end-of-run line, and the child's notes."""
    said = [m[1] for line in lines if (m := TRACKING_LINE.search(line))]
    notes = result.get("tracking") or {}
    return {"lines": said, **{k: sum(bool(w.search(line)) for line in said) for k, w in WARNINGS.items()},
            "unreached": next((line for line in said if UNREACHED.search(line)), None),
            "close_s": notes.get("close_s"), "server_cpu_s": notes.get("server_cpu_s"),
            "paused": notes.get("paused", False), "ready": notes.get("ready", False)}


# -- the child: one loop, one rank -------------------------------------------------------------------


def job_spec(args: argparse.Namespace, data: str, runs: str, world: int) -> dict:
    """The demo's DeepSpeed settings on this size; no checkpoint before the end; metrics on loopback; with
    --tracking (shardrun's loop only), MLflow at the bench's server."""
    s = SIZES[args.size]
    spec = {
        "name": "overhead",
        "model": {"hf": {"path": args.hf_model, "dtype": "fp32", "attn_implementation": "sdpa"}} if "hf" in s
        else {"type": "gpt", **gpt(s)},
        "data": {"paths": [data], "seq_len": s["seq_len"], "seed": SEED},
        "deepspeed": {"zero_stage": args.zero_stage, "precision": "fp32", "micro_batch_size": s["micro_batch"],
                      "grad_accum_steps": 1, "grad_clip": 1.0,
                      "optimizer": {"type": "adamw", "lr": 1e-3, "weight_decay": 0.1},
                      "schedule": {"warmup_steps": 30, "decay": "cosine", "min_lr_ratio": 0.1}},
        "scaling": {"num_workers": world, "use_gpu": False},
        "checkpoint": {"storage": runs, "every_steps": total_steps(args), "keep": 1},
        "metrics": {"enabled": True, "host": "127.0.0.1", "targets_dir": str(Path(runs) / "targets")},
        "failure": {"scheduled_events": "off"},  # no metadata-service watcher, even on an Azure VM
        "run": {"max_steps": total_steps(args), "seed": SEED, "log_every": args.log_every},
    }
    if args.tracking_uri:
        spec["tracking"] = {"mlflow": {"tracking_uri": args.tracking_uri, "experiment": "bench-overhead",
                                       "run_name": f"overhead {args.tracking} {plural(world, 'rank')}"}}
    return spec


class Window:
    """The clock at each step's forward (a forward pre-hook) and the time spent inside DeepSpeed's forward,
    backward and step until then (wrappers on the engine); starts and stops the profiler around the window."""

    def __init__(self, args: argparse.Namespace, rank: int):
        self.marks: list[float] = []
        self.inside: list[float] = []
        """Seconds inside the engine's forward, backward and step before each mark."""
        self.first, self.last = args.warmup_steps + 1, args.warmup_steps + args.steps + 1
        self.before_start: Callable[[], None] | None = None
        """Called before the window's first mark (--tracking mlflow-stalled: the server stops answering)."""
        self.server_pid = args.server_pid if rank == 0 else None
        self.server_cpu: dict[str, float] = {}
        """--tracking: the MLflow server's CPU seconds (all its processes) at the window's start and end."""
        self.profiler = args.profiler if rank == 0 else None
        self.cprofile = None
        if self.profiler == "cprofile":
            self.cprofile = cProfile.Profile()
        self._inside = 0.0
        self._entered = 0.0
        self.cpu: dict[str, tuple[float, float]] = {}
        """(process, main thread) CPU seconds at the window's start and end."""
        self.gc: list[float] = []
        """Seconds in Python's garbage collector before each mark."""
        self._gc = 0.0
        self._gc_started = 0.0
        gc.callbacks.append(self._collecting)

    def _collecting(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started:
            self._gc += time.perf_counter() - self._gc_started

    def attach(self, engine) -> None:
        """Mark each forward of the engine's model (before any pre-hook of DeepSpeed's: ZeRO 3 adds some) and time
        the engine's forward, backward and step (instance attributes: nn.Module.__call__ finds forward)."""
        engine.module.register_forward_pre_hook(self, prepend=True)
        for name in ("forward", "backward", "step"):
            setattr(engine, name, self._timed(getattr(engine, name)))

    def _timed(self, method):
        def timed(*args, **kwargs):
            self._entered = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self._inside += time.perf_counter() - self._entered
                self._entered = 0.0

        return timed

    def __call__(self, module, inputs) -> None:
        n = len(self.marks) + 1
        if n == self.first:
            if self.before_start is not None:
                self.before_start()
            self.edge("start")
        now = time.perf_counter()
        self.marks.append(now)
        self.inside.append(self._inside + (now - self._entered if self._entered else 0.0))
        self.gc.append(self._gc)
        if n == self.last:
            self.edge("end")

    def edge(self, which: str) -> None:
        self.cpu[which] = cpu_seconds()
        if self.server_pid is not None:
            self.server_cpu[which] = tree_cpu_seconds(self.server_pid)
        if self.cprofile is not None:
            self.cprofile.enable() if which == "start" else self.cprofile.disable()
        elif self.profiler == "py-spy":  # the parent attaches py-spy at start and detaches it at end
            print(f"{SAY}{which} {os.getpid()}", flush=True)
            if which == "start":
                time.sleep(1.0)  # py-spy takes a moment to attach; before the window's first mark


def ticks(path: str) -> int:
    """CPU time (user + system) in a /proc stat file, in clock ticks (10 ms)."""
    fields = Path(path).read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime: the stat file's 14th and 15th fields


def cpu_seconds() -> tuple[float, float]:
    """CPU time (user + system) of this process, all threads, and of its main thread: from /proc, 10 ms ticks."""
    hz = os.sysconf("SC_CLK_TCK")
    return ticks("/proc/self/stat") / hz, ticks(f"/proc/self/task/{os.getpid()}/stat") / hz


def tree_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of pid and the processes below it, as they are now (the MLflow server's)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += ticks(f"/proc/{p}/stat")
            for children in glob.glob(f"/proc/{p}/task/*/children"):
                todo.extend(int(c) for c in Path(children).read_text().split())
        except (OSError, ValueError, IndexError):
            continue  # ended between listing and reading
    return total / os.sysconf("SC_CLK_TCK")


def run_child(args: argparse.Namespace) -> int:
    from shardrun.config import parse

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    spec = parse(job_spec(args, args.data, args.runs, world), source="bench/overhead.py")
    window = Window(args, rank)
    extra = (run_bare if args.child == "bare" else run_shardrun)(args, spec, window, rank, world)
    if len(window.marks) != total_steps(args):
        sys.exit(f"{args.child}: {len(window.marks)} forwards, expected {total_steps(args)}")
    if rank == 0:
        if window.cprofile is not None:
            window.cprofile.dump_stats(args.out + ".prof")
        cpu = [end - start for start, end in zip(window.cpu["start"], window.cpu["end"], strict=True)]
        if window.server_cpu:
            extra.setdefault("tracking", {})["server_cpu_s"] = window.server_cpu["end"] - window.server_cpu["start"]
        Path(args.out).write_text(json.dumps({"marks": window.marks, "inside": window.inside, "gc": window.gc,
                                              "cpu": cpu, **extra}))
    return 0


def run_bare(args: argparse.Namespace, spec, window: Window, rank: int, world: int) -> dict:
    """deepspeed.initialize with shardrun's config for this spec; forward, backward, step; nothing else."""
    import deepspeed
    import torch

    from shardrun.trainer.ds_config import build_ds_config
    from shardrun.trainer.models import build

    if world == 1:  # a lone process still needs a (trivial) process group, as in shardrun's engine module
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", LOCAL_RANK="0",
                          WORLD_SIZE="1")
    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    config = build_ds_config(spec.deepspeed, max_steps=spec.run.max_steps, on_gpu=False,
                             grad_accum_steps=spec.grad_accum_for(world))
    torch.manual_seed(spec.run.seed)
    # the Llama as shardrun's restore builds it: ZeRO-3 partitions it as it is made
    with hf_loading(spec, config):
        model = build(spec.model) if spec.model.hf is None else hf_build(spec.model.hf)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    window.attach(engine)
    batches = pinned_batches(args.data, spec.deepspeed.micro_batch_size, torch.device("cpu"))[rank::world]
    for inputs, targets in batches[:total_steps(args)]:
        loss = engine(inputs, targets)
        engine.backward(loss)
        engine.step()
    return {}


def hf_loading(spec, config: dict):
    """transformers' ZeRO-3 loading for a Llama at ZeRO-3, as shardrun's restore enters it; else nothing."""
    if spec.model.hf is None or spec.deepspeed.zero_stage != 3:
        return contextlib.nullcontext()
    from shardrun.trainer.models import hf

    return hf.zero3_loading(config)


def hf_build(hf_spec):
    """The Llama from its folder in shardrun's CausalLM wrapper (forward(inputs, targets) -> mean_token_loss)."""
    from shardrun.trainer.models import hf

    return hf.build(hf_spec, hf_spec.path)


def run_shardrun(args: argparse.Namespace, spec, window: Window, rank: int, world: int) -> dict:
    """run_local, as `shardrun train` calls it, the window attached to the engine its worker loop builds."""
    from shardrun.driver.local import run_local

    on_startup("engine ready", lambda record: window.attach(record.engine))
    notes: dict = {}
    if args.tracking and rank == 0:
        time_close(notes)
        if args.tracking == STALLED:
            window.before_start = lambda: pause_server(args, Path(spec.run_dir), notes)
    run_local(spec)
    if rank != 0:
        return {}
    records = [json.loads(line) for line in Path(spec.run_dir, "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in records if args.warmup_steps < r["step"] <= args.warmup_steps + args.steps]
    wait = statistics.mean(r["data_wait_fraction"] for r in timed) if timed else None
    return {"data_wait_fraction": wait, **({"tracking": notes} if args.tracking else {})}


def time_close(notes: dict) -> None:
    """notes["close_s"]: how long the trackers hold up the end of the run (Tracking.close, after the last step and
    the save; outside the timed window), timed by a wrapper on the class in this process."""
    from shardrun.driver import tracking

    close = tracking.Tracking.close

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return close(self, *args, **kwargs)
        finally:
            notes["close_s"] = time.perf_counter() - start

    tracking.Tracking.close = timed


def pause_server(args: argparse.Namespace, run_dir: Path, notes: dict) -> None:
    """--tracking mlflow-stalled, before the first timed step: once the tracker has sent its run's parameters, tags
    and a first step's metrics (OPEN_WAIT_S at most), the server's process group stops (SIGSTOP): it takes
    connections and answers nothing. The parent continues it after the run."""
    deadline = time.monotonic() + OPEN_WAIT_S
    while not (ready := tracker_caught_up(run_dir / "tracking.json", args.tracking_uri)) \
            and time.monotonic() < deadline:
        time.sleep(0.1)
    os.killpg(args.server_pid, signal.SIGSTOP)
    notes.update(paused=True, ready=ready)


def tracker_caught_up(record: Path, uri: str) -> bool:
    """Whether the tracker's MLflow run (its id in the run dir's tracking.json) has metrics at the server: the
    tracker sends them after the run's parameters and tags."""
    try:
        run_id = json.loads(record.read_text()).get("mlflow", {}).get("run_id")
    except (OSError, ValueError, AttributeError):
        return False
    if not run_id:
        return False
    from mlflow.tracking import MlflowClient

    try:
        return bool(MlflowClient(uri).get_run(run_id).data.metrics)
    except Exception:  # noqa: BLE001 - not there yet, or the server is busy: asked again
        return False


# -- profile --------------------------------------------------------------------------------------------


def profile(args: argparse.Namespace, world: int, data: str, work: Path, env: dict[str, str], server=None) -> None:
    """shardrun's loop once, its timed window under py-spy (sampling, every thread) or cProfile (main thread)."""
    tool = args.profile
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if tool == "py-spy" and not spy:
        sys.exit("bench: py-spy is not installed (pip install py-spy); --profile cprofile needs nothing")
    out = work / f"profile-{world}.json"
    runs = Path(tempfile.mkdtemp(prefix="runs-", dir=work))
    cmd = child_command(args, "shardrun", world, data, out, runs, profiler=tool)
    print(f"profiling shardrun's loop on {world} rank(s) with {tool}: {args.steps} steps after {args.warmup_steps} "
          "warm-up steps", flush=True)
    raw = work / f"py-spy-{world}.txt"
    spying, tail, said = None, [], []
    with running(cmd, env, stderr=subprocess.STDOUT) as (proc, _):
        try:
            for line in proc.stdout:
                if m := TRACKING_LINE.search(line.rstrip("\n")):
                    said.append(m[1])
                if line.startswith(SAY):
                    which, pid = line[len(SAY):].split()
                    if which == "start":
                        spying = subprocess.Popen([spy, "record", "--pid", pid, "--format", "raw", "--output",
                                                   str(raw), "--rate", "100", "--nonblocking", "--threads"],
                                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    elif spying is not None:
                        spying.send_signal(signal.SIGINT)  # py-spy writes what it sampled and exits
                        spying.wait(timeout=60)
                else:
                    tail = (tail + [line])[-40:]
            proc.wait()
        finally:
            if spying is not None and spying.poll() is None:
                spying.kill()
            if server is not None and args.tracking == STALLED:
                server.resume()
    if proc.returncode != 0:
        sys.exit(f"bench: the profiled run failed ({proc.returncode}):\n" + "".join(tail))
    for line in said:
        print(f"  {line}")
    marks = json.loads(out.read_text())["marks"]
    seconds = marks[-1] - marks[args.warmup_steps]
    print(f"window: {seconds:.2f} s, {seconds / args.steps * 1e3:.2f} ms per step under the profiler")
    if tool == "cprofile":
        print_cprofile(Path(str(out) + ".prof"), args.steps, seconds, args.top)
    else:
        print_pyspy(raw, args.steps, seconds, args.top)


def short(file: str, line: int, name: str) -> str:
    return f"{file.split(SHARDRUN_DIR, 1)[-1].replace(os.sep, '.').removesuffix('.py')}:{line} {name}"


def print_cprofile(path: Path, steps: int, seconds: float, top: int) -> None:
    """shardrun's functions by cumulative time in the window (main thread), and what they leave to DeepSpeed."""
    stats = pstats.Stats(str(path)).stats
    ours = {k: v for k, v in stats.items()
            if k[0].startswith(SHARDRUN_DIR) and not k[0].startswith(SHARDRUN_DIR + MODELS)}
    rows = [[short(*key), str(calls), f"{cum / steps * 1e3:.3f}", f"{cum / calls * 1e3:.3f}",
             f"{own / steps * 1e3:.3f}"]
            for key, (_, calls, own, cum, _) in sorted(ours.items(), key=lambda kv: -kv[1][3])[:top]]
    print(table(["function (shardrun/, the model left out)", "calls", "cumulative ms per step", "ms per call",
                 "own ms per step"], rows))
    # Trainer.train began before the profiler: the functions it calls in the window are those without callers
    loop = sum(v[3] for v in ours.values() if not v[4])
    step_key = next((k for k in ours if k[2] == "train_step"), None)
    engine = sum(callers[step_key][3] for k, (*_, callers) in stats.items()
                 if step_key in callers and not k[0].startswith(SHARDRUN_DIR))
    print(f"\nper step: {engine / steps * 1e3:.3f} ms in what train_step calls outside shardrun (DeepSpeed's forward, "
          f"backward, step); {(loop - engine) / steps * 1e3:.3f} ms in the rest of the loop's calls; "
          f"{(seconds - loop) / steps * 1e3:.3f} ms elsewhere (Trainer.train's own lines and the profiler's own "
          "bookkeeping). cProfile slows every Python call and sees the main thread only: the comparison's column "
          "'outside DeepSpeed's calls' measures the loop's own time without a profiler.")


def print_pyspy(raw: Path, steps: int, seconds: float, top: int) -> None:
    """Inclusive samples of shardrun's functions per thread, and the main thread's time outside DeepSpeed's calls."""
    if not raw.exists():
        sys.exit("bench: py-spy wrote nothing (it may lack permission to read the process: ptrace)")
    inclusive: dict[tuple[str, str], int] = defaultdict(int)
    threads: dict[str, int] = defaultdict(int)
    main_total = main_engine = 0
    for line in raw.read_text().splitlines():  # "thread (TID): NAME;func (file:line);... COUNT", outermost first
        stack, _, count = line.rpartition(" ")
        thread, *frames = stack.split(";")
        name, n = thread.partition(": ")[2] or thread, int(count)
        threads[name] += n
        for key in {(name, f"{m[1].replace('/', '.')} {frame.split(' (')[0]}")
                    for frame in frames if (m := SHARDRUN_FRAME.search(frame)) and not m[1].startswith(MODELS)}:
            inclusive[key] += n  # once per sample, whatever the line or the depth
        if name == "MainThread":
            main_total += n
            at = next((i for i, f in enumerate(frames) if f.startswith("Trainer.train_step ")), None)
            if at is not None and at + 1 < len(frames) and not SHARDRUN_FRAME.search(frames[at + 1]):
                main_engine += n
    if not main_total:
        sys.exit("bench: py-spy sampled nothing of the main thread")
    per_sample = seconds / main_total  # the main thread never idles in the window: its samples span it
    rows = [[thread, func, f"{n * per_sample / steps * 1e3:.3f}", f"{n / main_total:.2%}"]
            for (thread, func), n in sorted(inclusive.items(), key=lambda kv: -kv[1])[:top]]
    print(table(["thread", "function (shardrun/, the model left out)", "inclusive ms per step",
                 "share of the window"], rows, align="llr"))
    print("\nsamples per thread (idle ones not sampled): "
          + ", ".join(f"{t} {n}" for t, n in sorted(threads.items(), key=lambda kv: -kv[1])))
    rest = main_total - main_engine
    print(f"main thread: {main_engine / main_total:.2%} of its samples in what train_step calls outside shardrun "
          f"(DeepSpeed's forward, backward, step); {rest / main_total:.2%} ({rest * per_sample / steps * 1e3:.3f} ms "
          "per step) elsewhere: the loop's own work")


# -- results -------------------------------------------------------------------------------------------


def summarize(results: dict[int, list[dict]]) -> list[dict]:
    """Per rank count: both loops' step times, the ratios of the pairs, and the medians of the rest."""
    rows = []
    for world, pairs in results.items():
        row = {"world": world, "pairs": len(pairs)}
        for loop in ("bare", "shardrun"):
            row[loop] = [p[loop]["step_s"] for p in pairs]
            row[f"{loop}_outside"] = statistics.median(p[loop]["outside_s"] for p in pairs)
            row[f"{loop}_gc"] = statistics.median(p[loop]["gc_s"] for p in pairs)
            row[f"{loop}_cpu"] = statistics.median(p[loop]["cpu_s"] for p in pairs)
        row["ratios"] = [s / b for s, b in zip(row["shardrun"], row["bare"], strict=True)]
        row["ratio"] = statistics.median(row["ratios"])
        waits = [p["shardrun"]["data_wait_fraction"] for p in pairs
                 if p["shardrun"].get("data_wait_fraction") is not None]
        row["data_wait"] = statistics.median(waits) if waits else None
        row["tracking"] = [p["shardrun"]["tracking"] for p in pairs if "tracking" in p["shardrun"]]
        rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    def both(key: str, digits: int) -> str:
        return f"{r[f'bare_{key}'] * 1e3:.{digits}f}, {r[f'shardrun_{key}'] * 1e3:.{digits}f}"

    header = ["ranks", "bare step (ms)", "min - max", "shardrun step (ms)", "min - max",
              "shardrun / bare (median of pairs)", "pairs min - max",
              "outside DeepSpeed's calls (ms/step): bare, shardrun", "garbage collection (ms/step): bare, shardrun",
              "rank 0's CPU, all threads (ms/step): bare, shardrun", "shardrun data wait"]
    body = []
    for r in rows:
        wait = f"{r['data_wait']:.2%}" if r["data_wait"] is not None else "-"
        body.append([str(r["world"]), *spread(r["bare"], 2, 1e-3), *spread(r["shardrun"], 2, 1e-3),
                     *spread(r["ratios"], 4), both("outside", 3), both("gc", 3), both("cpu", 1), wait])
    return table(header, body, align="r")


def format_tracking(rows: list[dict], args: argparse.Namespace) -> str:
    """--tracking: per rank count, what the shardrun runs said about tracking and how long it held up their end."""
    header = ["ranks", "shardrun runs", "warnings per run, most (failed, behind)",
              "end-of-run 'did not reach' line (runs)", "end-of-run wait for the trackers (s): median, max",
              "MLflow server CPU in the window (ms/step), median"]
    body = []
    for r in rows:
        seen = r["tracking"]
        closes = [t["close_s"] for t in seen if t["close_s"] is not None]
        server = [t["server_cpu_s"] for t in seen if t["server_cpu_s"] is not None]
        body.append([str(r["world"]), str(len(seen)),
                     f"{max(t['failed'] for t in seen)}, {max(t['behind'] for t in seen)}",
                     f"{sum(bool(t['unreached']) for t in seen)} of {len(seen)}",
                     f"{statistics.median(closes):.1f}, {max(closes):.1f}" if closes else "-",
                     f"{statistics.median(server) / args.steps * 1e3:.2f}" if server else "-"])
    return table(header, body, align="r")


def findings(rows: list[dict], args: argparse.Namespace) -> list[str]:
    """The issue's goal, checked per rank count: shardrun's step at most 2% longer than the bare loop's; with
    --tracking, the tracker's warnings said at most once, and (stalled) the end-of-run line on what was not sent."""
    out = []
    for r in rows:
        verdict = "meets" if r["ratio"] - 1 <= GOAL else "misses"
        out.append(f"{plural(r['world'], 'rank')}: shardrun / bare = {r['ratio']:.4f} "
                   f"({r['ratio'] - 1:+.2%} per step): {verdict} the goal of {GOAL:.0%}"
                   + (f" with tracking {args.tracking}, logging every {plural(args.log_every, 'step')}"
                      if args.tracking else ""))
        if args.tracking:
            seen = r["tracking"]
            once = all(t[k] <= 1 for t in seen for k in WARNINGS)
            said = sum(bool(t["unreached"]) for t in seen)
            expected = len(seen) if args.tracking == STALLED else 0
            verdict = "as expected" if said == expected else f"NOT AS EXPECTED: {expected}"
            paused = "" if args.tracking != STALLED or all(t["paused"] for t in seen) else \
                "; the server was NOT paused in every run"
            out.append(f"{plural(r['world'], 'rank')}, tracking: the tracker's warnings said at most once per run in "
                       f"{'every run' if once else 'NOT every run'}; the end-of-run line on records that did not "
                       f"reach MLflow in {said} of {len(seen)} runs ({verdict}){paused}")
    return out


def setup(args: argparse.Namespace, params: int | None) -> str:
    """The record's line on what ran."""
    s = SIZES[args.size]
    if "hf" in s:
        h = s["hf"]
        model = (f"transformers Llama {h['num_hidden_layers']} x {h['hidden_size']}, {h['num_attention_heads']} "
                 f"heads ({h['num_key_value_heads']} KV), MLP {h['intermediate_size']}, vocab {VOCAB}, untied, "
                 f"{params / 1e6:.2f}M parameters, SDPA attention, random weights written by save_pretrained; both "
                 "loops load it with shardrun's models.hf.build")
    else:
        model = f"GPT {s['n_layer']} x {s['n_embd']}, {s['n_head']} heads"
    return (f"Setup: {model}, seq {s['seq_len']}, micro-batch "
            f"{s['micro_batch']} per rank, fp32, ZeRO {args.zero_stage}, gloo; {args.warmup_steps} warm-up steps, "
            f"{args.steps} timed; log every {args.log_every}; torch threads per rank: "
            f"{args.threads or 'default (all cores for 1 rank, 1 each under torchrun)'}; {args.reps} pairs per rank "
            "count, medians")


def tracking_setup(args: argparse.Namespace, rows: list[dict]) -> list[str]:
    """The record's lines on tracking, with --tracking: how it ran, and what the last shardrun run said about it."""
    if not args.tracking:
        return []
    last = rows[-1]["tracking"][-1]["lines"] if rows and rows[-1]["tracking"] else []
    said = "; ".join(f"`{line}`" for line in last) or "none"
    how = ("it answers throughout" if args.tracking != STALLED else
           "paused (SIGSTOP, its connections left open) before the first timed step of each shardrun run, once the "
           "run's tracker had sent its MLflow run's parameters, tags and a first step's metrics, and continued after "
           "the run: every timed step's record went to a server that did not answer")
    return [f"Tracking: {args.tracking}: shardrun's loop logs every {plural(args.log_every, 'step')} to MLflow "
            f"(`tracking.mlflow`) at an {server_version()} server on loopback on the same machine "
            f"(tests/servers.py's MlflowServer: 1 worker, SQLite backend; MLflow's usage telemetry off); {how}. "
            "The bare loop tracks nothing. The end-of-run wait for the trackers (Tracking.close, at most 30 s) comes "
            "after the timed window",
            f"The last shardrun run's lines about tracking ({plural(rows[-1]['world'], 'rank')}): {said}"]


if __name__ == "__main__":
    sys.exit(main())
