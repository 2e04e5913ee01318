"""What the benchmarks share: their common flags, repetitions and summaries, markdown tables, child processes,
DeepSpeed's CPU environment, synthetic tokens, a Llama with random weights, the hook into shardrun's worker
start-up, and the record each run appends to docs/benchmarks.md.

Nothing here imports shardrun at the top: bench/gpu.py imports this module on a bare GPU machine before it has
installed what shardrun needs."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import glob
import importlib.metadata
import json
import logging
import os
import platform
import secrets
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "benchmarks.md"
START_LOAD = os.getloadavg()
"""The load average as the bench starts (every bench imports this module first): its record names it."""
CHILD_TIMEOUT_S = 900
SEED = 0
VOCAB = 256
SIZES = {
    # examples/gpt-stdlib.yaml's model and micro-batch: what `make demo` trains on a CPU
    "demo": {"n_layer": 4, "n_head": 4, "n_embd": 128, "seq_len": 128, "micro_batch": 16},
    "tiny": {"n_layer": 2, "n_head": 2, "n_embd": 32, "seq_len": 32, "micro_batch": 4},
}
"""The CPU benches' GPT sizes (bench/overhead.py, bench/startup.py), with a vocabulary of VOCAB."""


# -- flags ------------------------------------------------------------------------------------------


class Parser(argparse.ArgumentParser):
    """The flags every bench means the same by: --reps, --quick (a tiny run that only checks that it all runs,
    never recorded) and --record; the script's docstring's first line as the description."""

    def __init__(self, doc: str, *, reps: int | None = None, reps_help: str = "repetitions",
                 quick: dict | None = None, quick_help: str = "", measures: str = "", quick_aliases=()):
        super().__init__(description=doc.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter)
        self.quick, self.measures = quick, measures
        if reps is not None:
            self.add_argument("--reps", type=positive, default=reps, help=f"{reps_help} (default {reps})")
        if quick is not None:
            self.add_argument("--quick", *quick_aliases, dest="quick", action="store_true",
                              help=f"{quick_help}: checks that it all runs")
        self.add_argument("--record", action="store_true", help=f"append the results to {DOC.relative_to(REPO)}")

    def parse(self, argv: list[str] | None) -> argparse.Namespace:
        """parse_args, with --quick's settings in place of the flags it overrides."""
        args = self.parse_args(argv)
        if self.quick is not None and args.quick:
            if args.record:
                self.error(f"--quick numbers say nothing about {self.measures}; run without --quick to --record")
            vars(args).update(self.quick)
        return args


def positive(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {n}")
    return n


def numbers(what: str, low: int, high: int | None = None) -> Callable[[str], list[int]]:
    """An argparse type: comma-separated whole numbers from low to high; what says which, on an error."""
    def parse(text: str) -> list[int]:
        try:
            out = [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            out = []
        if not out or any(x < low or (high is not None and x > high) for x in out):
            raise argparse.ArgumentTypeError(f"{text!r}: {what}")
        return out

    return parse


rank_counts = numbers("rank counts such as 1 or 1,2", 1)
zero_stages = numbers("ZeRO stages are 0 to 3, e.g. 0 or 0,1", 0, 3)


# -- repetitions and results ------------------------------------------------------------------------


def in_turns(ways: list[str], reps: int) -> Iterator[tuple[int, list[str]]]:
    """Each repetition and the order of its ways: each goes first in turn, so that a busy spell on a shared
    machine hits them alike."""
    for rep in range(reps):
        k = rep % len(ways)
        yield rep, ways[k:] + ways[:k]


def spread(xs: list[float], digits: int = 2, unit: float = 1.0) -> list[str]:
    """Two table cells of xs counted in unit: their median, and their min - max."""
    median, low, high = (x / unit for x in (statistics.median(xs), min(xs), max(xs)))
    return [f"{median:.{digits}f}", f"{low:.{digits}f} - {high:.{digits}f}"]


def table(header: list[str], rows: list[list[str]], align: str = "lr") -> str:
    """A markdown table; align has an l (left) or r (right) per column, its last letter for the columns after."""
    align = align.ljust(len(header), align[-1])
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if a == "l" else "---:" for a in align) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(row) + " |" for row in rows)])


def plural(n: int, word: str) -> str:
    """n and word, plural unless n is 1: "1 rank", "2 ranks"."""
    return f"{n} {word}{'s' if n != 1 else ''}"


def report(section: str, args: argparse.Namespace, tables: list[str], found: list[str], *, details: list[str],
           versions_of: tuple[str, ...]) -> None:
    """Print the tables and findings; with --record, append them to section of docs/benchmarks.md."""
    print("\n" + "\n\n".join(tables))
    for line in found:
        print(line)
    if args.record:
        now = datetime.datetime.now(datetime.timezone.utc)
        append_entry(section, date=f"{now:%Y-%m-%d %H:%M}", revision=git_revision(), command=command(),
                     machine=f"{machine()}; load average {START_LOAD[0]:.1f} at the start, "
                             f"{os.getloadavg()[0]:.1f} at the end",
                     versions=versions(versions_of), details=details, tables=tables, found=found)


# -- records ----------------------------------------------------------------------------------------


def append_entry(section: str, *, date: str, revision: str, command: str, machine: str, versions: str,
                 details: list[str], tables: list[str], found: list[str], card: str | None = None) -> None:
    """Append a run to section: the lines every record starts with (date, revision, command, the card if any,
    machine, versions), the bench's own details, its tables and its findings."""
    head = [f"### {date} UTC, shardrun {revision}", "", f"- Command: `{command}`",
            *([f"- Card: {card}"] if card else []), f"- Machine: {machine}", f"- Versions: {versions}",
            *[f"- {d}" for d in details]]
    blocks = [*tables, *(["\n".join(f"{line}." for line in found)] if found else [])]
    append_record(section, "\n\n".join(["\n".join(head), *blocks]) + "\n")
    print(f"\nrecorded in {DOC.relative_to(REPO)}")


def append_record(section: str, entry: str) -> None:
    """Add entry at the end of `section` of docs/benchmarks.md (records are never edited)."""
    text = DOC.read_text()
    if section not in text:
        text = text.rstrip("\n") + f"\n\n{section}\n"
    start = text.index(section)
    nxt = text.find("\n## ", start + len(section))
    end = len(text) if nxt < 0 else nxt + 1
    before = text[:end].rstrip("\n") + "\n\n"
    DOC.write_text(before + entry + ("\n" + text[end:] if nxt >= 0 else ""))


def command() -> str:
    """This bench's command line, as run from the repository root."""
    return shlex.join(["python", f"bench/{Path(sys.argv[0]).name}", *sys.argv[1:]])


def machine() -> str:
    """This machine's CPU, cores, memory and kernel, for a record."""
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or "unknown CPU")
    mem_kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal:"))
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores, {mem_kb / 2**20:.0f} GiB RAM, "
            f"{platform.system()} {platform.release()}")


def versions(names) -> str:
    """Python's version and each named distribution's, for a record."""
    return ", ".join([f"Python {platform.python_version()}",
                      *(f"{name} {installed(name) or 'not installed'}" for name in names)])


def installed(distribution: str) -> str | None:
    """The installed version of a distribution, or None."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_revision() -> str:
    """This checkout's short revision, -dirty with uncommitted changes to tracked files."""
    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()

    try:
        rev = git("rev-parse", "--short", "HEAD")
        return rev + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "(no git revision)"


# -- child processes ----------------------------------------------------------------------------------


def on_ranks(script: list[str], world: int) -> list[str]:
    """The command that runs script on world ranks: a plain process for one, torchrun on loopback for more."""
    from shardrun.net import free_port

    if world == 1:
        return [sys.executable, *script]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={world}", "--master-addr=127.0.0.1",
            f"--master-port={free_port()}", *script]


@contextlib.contextmanager
def running(cmd: list[str], env: dict[str, str], timeout: float | None = CHILD_TIMEOUT_S,
            **popen) -> Iterator[tuple[subprocess.Popen, threading.Event]]:
    """cmd in a session of its own, its stdout a text pipe unless popen says otherwise, and an event set if it
    timed out. SIGKILLed with all it started (torchrun's ranks, Ray's processes, nvcc) then or on leaving."""
    proc = subprocess.Popen(cmd, **{"stdout": subprocess.PIPE, **popen}, text=True, env=env, start_new_session=True)
    cut = threading.Event()
    watchdog = threading.Timer(timeout, lambda: (cut.set(), kill_group(proc))) if timeout is not None else None
    if watchdog is not None:
        watchdog.start()
    try:
        yield proc, cut
    finally:
        if watchdog is not None:
            watchdog.cancel()
        kill_group(proc)
        proc.wait()


def run_to_end(cmd: list[str], env: dict[str, str], what: str) -> list[str]:
    """Run cmd to its end with its output (stdout and stderr) set aside: its lines; exit with their tail if it fails
    or times out."""
    with tempfile.TemporaryFile("w+") as log:
        with running(cmd, env, stdout=log, stderr=subprocess.STDOUT) as (proc, cut):
            proc.wait()
        log.seek(0)
        lines = log.read().splitlines()
    if proc.returncode != 0:
        sys.exit(f"bench: {what} failed ({'timed out' if cut.is_set() else proc.returncode}):\n"
                 + "\n".join(lines[-40:]))
    return lines


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the session proc leads (started with start_new_session), whatever is left of it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def deepspeed_cpu_env(**extra: str) -> dict[str, str]:
    """This environment plus extra for children that run DeepSpeed on the CPU: its CPU accelerator, and its comm
    op from the runner's build folder, built with this environment's ninja (two ninja versions take each other's
    build for a stale one), and built now if missing: a build takes minutes and is not what a bench measures."""
    from shardrun.trainer import extensions

    env = dict(os.environ, DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="",
               TORCH_EXTENSIONS_DIR=str(extensions.default_dir()),
               PATH=extensions.path_with_our_ninja(os.environ.get("PATH")) or "", **extra)
    if not any(Path(env["TORCH_EXTENSIONS_DIR"]).glob("*/*.so")):
        print(f"compiling DeepSpeed's CPU comm op into {env['TORCH_EXTENSIONS_DIR']} (once, a few minutes) ...",
              flush=True)
        code = "from deepspeed.comm.torch import build_shm_op; build_shm_op()"
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"bench: DeepSpeed's CPU comm op did not build:\n{(done.stdout + done.stderr)[-3000:]}")
    return env


def fresh_ray_env(env: dict[str, str]) -> dict[str, str]:
    """env for a fresh local Ray only (never one a RAY_ADDRESS or `ray start` points at). Ray turns token auth on
    for a new local cluster and would write ~/.ray/auth_token if missing; a token of our own keeps auth on and
    writes nothing."""
    env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}
    return {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}


# -- what the children train --------------------------------------------------------------------------


def write_tokens(out: Path, size: dict, steps: int) -> str:
    """Token shards for steps + 1 micro-batches (no epoch ends mid-run): skewed ids, a loss that falls."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from shardrun.datasets.prepare import META_SEQ_LEN, META_VOCAB_SIZE

    rows, row_len, vocab = (steps + 1) * size["micro_batch"], size["seq_len"] + 1, size["vocab_size"]
    rng = np.random.default_rng(SEED)
    # Zipf-like unigram frequencies: the model learns them in a few steps, so the loss falls from
    # ln(vocab) even in a short run, and a broken loop shows
    p = 1.0 / np.arange(1, vocab + 1) ** 1.1
    ids = rng.choice(vocab, size=rows * row_len, p=p / p.sum()).astype(np.int32)
    column = pa.FixedSizeListArray.from_arrays(pa.array(ids, type=pa.int32()), row_len)
    meta = {META_VOCAB_SIZE: str(vocab).encode(), META_SEQ_LEN: str(size["seq_len"]).encode()}
    out.mkdir(parents=True)
    pq.write_table(pa.table({"tokens": column}).replace_schema_metadata(meta), out / "part-00000.parquet",
                   row_group_size=256)
    return str(out)


def write_rank_tokens(out: Path, size: dict, world: int, steps: int) -> str:
    """Token shards of a SIZES size for world ranks: steps global batches, in 16 or more row groups of 256 rows,
    so that every rank's partitions hold a whole run and no epoch ends inside it."""
    global_batch = size["micro_batch"] * world
    return write_tokens(out, {**size, "micro_batch": global_batch, "vocab_size": VOCAB},
                        max(steps, -(-16 * 256 // global_batch)))


def gpt(size: dict, vocab: int = VOCAB) -> dict:
    """The built-in GPT's model settings for a size."""
    return {"n_layer": size["n_layer"], "n_head": size["n_head"], "n_embd": size["n_embd"],
            "block_size": size["seq_len"], "vocab_size": vocab}


def status_kb() -> dict[str, int]:
    """/proc/self/status's memory lines, in kB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("Vm", "Rss")):
            key, value = line.split(":", 1)
            out[key] = int(value.split()[0])
    return out


def write_llama(folder: Path, vocab: int, **config) -> int:
    """A transformers Llama of config (LlamaConfig's fields; untied embeddings unless config ties them) with
    random weights (seed SEED), fp32, written by save_pretrained into folder as a pretrained model is; its
    parameter count."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **{"tie_word_embeddings": False, **config}))
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def on_startup(message: str, action: Callable[[logging.LogRecord], None]) -> None:
    """Call action with the record of this message when shardrun's worker loop, in this process, logs it:
    "engine ready" (DeepSpeed is up and the latest checkpoint loaded; record.engine is the engine) or "data
    open" (the first step follows)."""
    class Hook(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage() == message:
                action(record)

    logger = logging.getLogger("shardrun.trainer.startup")
    logger.setLevel(logging.INFO)  # shardrun leaves it unset: the root's WARNING would drop its records
    logger.addHandler(Hook())


SAY = "bench-child: "
"""Marks a bench child's lines to its parent among whatever its libraries print."""
MEMORY_FIELDS = ("Pss_Anon:", "Pss_Shmem:")
SAMPLE_SECONDS = 0.02  # memory sampling period


def measured_child(cmd: list[str], env: dict[str, str], what: str) -> tuple[dict, float, float]:
    """Run a bench child that says `ready` (imports done), waits for `go` on stdin, works and says its result as
    JSON (SAY marks both): its result, the seconds to ready, and the peak growth of its memory (MB, its
    processes and theirs) while it worked. Exits with the child's stderr if it fails."""
    with tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        with running(cmd, env, stdin=subprocess.PIPE, stderr=err) as (proc, _):
            if heard(proc) is None:
                fail(what, proc, err)
            start_s = time.perf_counter() - started
            with memory_sampler(proc.pid) as memory:
                proc.stdin.write("go\n")
                proc.stdin.flush()
                line = heard(proc)
            proc.stdin.close()
            if proc.wait() != 0 or line is None:
                fail(what, proc, err)
    return json.loads(line), start_s, memory["peak_mb"]


def heard(proc: subprocess.Popen) -> str | None:
    """The child's next message (None if it ended first)."""
    for line in proc.stdout:
        if line.startswith(SAY):
            return line[len(SAY):]
    return None


def fail(what: str, proc: subprocess.Popen, err) -> None:
    """Exit with the tail of the child's stderr, once it has ended."""
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    err.seek(0)
    tail = "".join(err.readlines()[-30:])
    sys.exit(f"bench: {what} failed (exit {proc.returncode}):\n{tail}")


@contextlib.contextmanager
def memory_sampler(pid: int) -> Iterator[dict]:
    """Peak growth (MB) of the memory held by pid and every process below it (Ray's workers too)."""
    result = {"peak_mb": 0.0}
    base = tree_pss_kb(pid)
    done = threading.Event()

    def sample():
        peak = base
        while not done.is_set():
            peak = max(peak, tree_pss_kb(pid))
            done.wait(SAMPLE_SECONDS)
        result["peak_mb"] = (peak - base) / 1024

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        done.set()
        thread.join()


def tree_pss_kb(pid: int) -> int:
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                total += sum(int(line.split()[1]) for line in f if line.startswith(MEMORY_FIELDS))
            for children in glob.glob(f"/proc/{p}/task/*/children"):
                with open(children) as f:
                    todo.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            continue  # the process ended between listing and reading
    return total
