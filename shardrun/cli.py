"""`shardrun run | train | check | submit | status | logs | stop | runs | checkpoints | export | generate |
report | data ...`: the command line."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

from shardrun import config, fs
from shardrun.errors import RedactingStream, UserError, redact

EXIT_USER_ERROR = 2


def _emit(line: str) -> None:
    fs.log(line, file=sys.stdout)


def _add_spec_args(p: argparse.ArgumentParser, *, fresh: bool = False) -> None:
    p.add_argument("spec", help="job spec (YAML)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a spec field, e.g. --set run.max_steps=100 (repeatable)")
    if fresh:
        p.add_argument("--fresh", action="store_true",
                       help="start the run over: an earlier run of this name is moved aside")


def _add_trust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load the checkpoint even if its files would call more than DeepSpeed's own classes "
                        "(only for storage you trust: loading runs what the files name)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardrun", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="train on Ray (RAY_ADDRESS, else a local instance)")
    _add_spec_args(p, fresh=True)
    p.add_argument("--overrides-from", default=None, help=argparse.SUPPRESS)  # submit's secret --set values

    p = sub.add_parser("train", help="train in this process without Ray (alone or under torchrun)")
    _add_spec_args(p, fresh=True)

    p = sub.add_parser("check", help="validate a job spec and print it resolved")
    _add_spec_args(p)

    p = sub.add_parser("submit", help="validate here, then run the job on a Ray cluster through its Jobs API")
    _add_spec_args(p)
    p.add_argument("--address", default=None, help="the Ray dashboard, http://HEAD:8265 (default: RAY_ADDRESS)")
    p.add_argument("--working-dir", default=None,
                   help="the folder sent to the cluster (default: the spec's project folder, the nearest one above "
                        "it with .git, pyproject.toml or setup.py)")
    p.add_argument("--no-wait", action="store_true", help="return once submitted instead of following the logs")
    p.add_argument("--allow-secrets", action="store_true",
                   help="upload the working dir even when it is a home folder or holds credentials (.ssh, ...)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="an environment variable for the job's driver and workers, e.g. NCCL_SOCKET_IFNAME=eth0 "
                        "(repeatable)")
    for name, what in (("status", "a job's state"), ("logs", "a job's logs"),
                       ("stop", "stop a job after a checkpoint")):
        p = sub.add_parser(name, help=f"{what} (by submission id or run name)")
        p.add_argument("run", metavar="JOB_OR_RUN")
        p.add_argument("--address", default=None, help="the Ray dashboard (default: RAY_ADDRESS)")
        if name == "logs":
            p.add_argument("--follow", action="store_true", help="keep printing until the job ends")

    p = sub.add_parser(
        "runs", help="the runs in a storage location: state, step, loss, newest complete checkpoint, age",
        description="The run dirs in STORAGE. state: running (USER@HOST) while a run holds the run dir's lease "
        "(NAME.lease.json); else finished, stopped (SIGTERM), failed: ERROR (from summary.json); without a "
        "summary.json newer than metrics.jsonl: interrupted (for runs without a lease file: running if files "
        "changed in the last 5 minutes); unreadable: WHY. Runs that --fresh moved aside (NAME.replaced-TIME) "
        "are listed too, marked 'moved aside'.")
    p.add_argument("storage", metavar="STORAGE", nargs="?", default=config.CheckpointSpec().storage,
                   help="checkpoint.storage: a path or URI (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the runs as JSON")

    p = sub.add_parser("checkpoints", help="a run's checkpoints: step, size, complete or why not")
    p.add_argument("run", metavar="RUN", help="the run dir, <checkpoint.storage>/<name> (a path, abfs:// or s3://)")

    p = sub.add_parser("export", help="a checkpoint as one safetensors file (ZeRO shards gathered) + config.json")
    p.add_argument("run", metavar="RUN", help="the run dir, <checkpoint.storage>/<name> (a path, abfs:// or s3://)")
    p.add_argument("--out", metavar="DIR", required=True, help="folder for model.safetensors and config.json")
    p.add_argument("--step", type=int, default=None, help="a checkpoint's step (default: the newest complete)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    _add_trust_arg(p)

    p = sub.add_parser("generate", help="sample text from a byte-level GPT run (its newest checkpoint) or export")
    p.add_argument("source", metavar="RUN_OR_EXPORT",
                   help="a run dir (a path, abfs:// or s3://), or a folder written by `shardrun export`")
    p.add_argument("--prompt", default="", help="text to continue")
    p.add_argument("--tokens", type=int, default=200, help="bytes to sample")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    _add_trust_arg(p)

    p = sub.add_parser("report", help="plots (PNG) and an HTML page from a run's metrics.jsonl")
    p.add_argument("run", metavar="RUN", help="the run dir, <checkpoint.storage>/<name>: a path or URI")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="where report.html and its PNGs go (default: RUN/report; ./<name>-report for a URI)")

    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command",
                                                                   required=True)
    p = data.add_parser("prepare-text", help="text files to token Parquet shards (bytes or a tokenizer.json)")
    p.add_argument("sources", nargs="*", help="text files or directories")
    p.add_argument("--python-stdlib", action="store_true",
                   help="use this Python's standard-library sources as the text")
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per training sequence")
    p.add_argument("--max-mb", type=float, default=None, help="read at most this many MB")
    p.add_argument("--tokenizer", metavar="PATH", default=None,
                   help="a Hugging Face tokenizers tokenizer.json (default: one token per byte)")
    # Defaults are prepare_text's (a unit test holds them equal); importing it here would load the
    # data stack for every command.
    p.add_argument("--rows-per-file", type=int, default=4096, metavar="N",
                   help="rows in each Parquet file (default %(default)s)")
    p.add_argument("--row-group-rows", type=int, default=512, metavar="N",
                   help="rows in each row group, the unit ranks read (default %(default)s)")
    p.add_argument("--compression", choices=("none", "snappy", "zstd", "lz4", "gzip"), default="zstd",
                   help="Parquet compression (default %(default)s)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="at most N processes tokenize and write (default: the CPUs); small inputs stay in this one")

    p = data.add_parser("inspect", help="files, rows, row groups, schema, bytes and steps per epoch")
    p.add_argument("paths", nargs="+", metavar="URI", help="Parquet files or directories (path, abfs://, s3://)")
    p.add_argument("--column", default="tokens", help="token column to check (default %(default)s)")
    p.add_argument("--table", action="store_true", help="tabular data: check every column is numeric")
    p.add_argument("--global-batch", type=int, default=None, metavar="N",
                   help="samples per optimizer step, all ranks: print the steps per epoch")
    p.add_argument("--partitions", type=int, default=None, metavar="P",
                   help="data.partitions for the steps per epoch (default 1)")
    return parser


def load_spec(args: argparse.Namespace) -> config.JobSpec:
    """Validate the spec and everything the driver can check before any cluster resource."""
    if getattr(args, "overrides_from", None):
        from shardrun.jobs import overrides_from

        args.overrides = [*args.overrides, *overrides_from(args.overrides_from)]
    spec = config.load(args.spec, args.overrides)
    if spec.model.entrypoint:
        from shardrun.trainer.models import resolve_entrypoint

        # Like `python -m`: the user's own modules in the working directory are importable.
        sys.path.insert(0, os.getcwd())
        resolve_entrypoint(spec.model.entrypoint)
    return spec


def ensure_data(spec: config.JobSpec, *, resume: bool = True) -> dict:
    """Build data.prepare's corpus if it is missing; then index the files (named if bad); when resuming, check
    that the newest complete checkpoint's data position fits them.

    Returns the data index as a plain dict for the workers: file footers are read once per run.
    """
    from shardrun.datasets import build_index
    from shardrun.datasets.inspect import steps_per_epoch, summary
    from shardrun.datasets.prepare import prepare_stdlib

    target = spec.data.paths[0]
    if spec.data.prepare and not Path(target).exists():
        _emit(f"preparing the {spec.data.prepare.source} corpus in {target}")
        files = prepare_stdlib(Path(target), spec.data.seq_len,
                               int(spec.data.prepare.max_mb * 1e6))
        _emit(f"wrote {len(files)} Parquet shards")
    index = build_index(spec.data, emit=_emit)
    vocab = index.vocab_size
    if spec.model.type == "gpt" and vocab and vocab > spec.model.vocab_size:
        raise UserError(f"data.paths: the shards' token ids go up to {vocab - 1} (their tokenizer's vocabulary), "
                        f"but model.vocab_size is {spec.model.vocab_size}; set model.vocab_size: {vocab}")
    if not steps_per_epoch(index, spec.global_batch, spec.partitions, seed=spec.data.seed,
                           window=spec.data.shuffle_window):
        raise UserError(f"data.paths: {index.rows:,} rows make no whole step of a global batch of {spec.global_batch} "
                        f"samples over {spec.partitions} partitions (deepspeed.micro_batch_size x grad_accum_steps x "
                        "workers); add data, or lower the batch or data.partitions")
    _emit(summary(index, spec.global_batch, spec.partitions))
    if resume:
        check_resume(spec, index)
    return index.to_dict()


def check_resume(spec: config.JobSpec, index) -> None:
    """The data, seed and partitions of the checkpoint a run resumes from, checked here rather than once the
    workers have built the model and loaded the checkpoint. The newest complete one is the one resumed from
    (Ray's record never names a newer one); checkpoints from before the manifest held the position are left
    to the workers' own check."""
    from shardrun.checkpoint_format import list_checkpoints
    from shardrun.datasets.stream import check_position

    if not fs.exists(spec.run_dir):
        return
    complete = [c for c in list_checkpoints(spec.run_dir) if c["complete"]]
    if complete and complete[-1].get("data"):
        try:
            check_position(complete[-1]["data"], spec.data, index)
        except UserError as e:
            raise UserError(f"resuming {spec.name} from its checkpoint of step {complete[-1]['step']}: {e}") from None


def cmd_check(args: argparse.Namespace) -> int:
    print(redact(load_spec(args).to_yaml()), end="")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from shardrun.lease import Lease

    spec = load_spec(args)
    with Lease(spec.run_dir, "run", emit=_emit):  # before anything is written; a second run of the name stops here
        return _run(args, spec)


def _run(args: argparse.Namespace, spec: config.JobSpec) -> int:
    _emit(f"job spec, resolved:\n{spec.to_yaml()}")
    data_index = ensure_data(spec, resume=not args.fresh)
    from shardrun.cluster.connect import connect

    # Ray prints its workers' logs here, storage URLs with their SAS signatures among them
    sys.stdout, sys.stderr = RedactingStream(sys.stdout), RedactingStream(sys.stderr)
    started = time.time()
    connect(preload="shardrun.cluster.launch")  # the launcher's imports (Ray Train, torch) ride on ray.init
    from shardrun.cluster.launch import launch

    summary = launch(spec, fresh=args.fresh, emit=_emit, data_index=data_index, started=started)
    _emit(f"summary ({fs.join(spec.run_dir, 'summary.json')}):\n{json.dumps(summary, indent=2)}")
    return stopped_exit(summary.get("stopped"))


def cmd_train(args: argparse.Namespace) -> int:
    spec = load_spec(args)
    if os.environ.get("RANK", "0") != "0":  # rank 0 holds the run dir for the job
        return _train(args, spec, main=False)
    from shardrun.lease import Lease

    with Lease(spec.run_dir, "train", emit=_emit):
        return _train(args, spec, main=True)


def _train(args: argparse.Namespace, spec: config.JobSpec, *, main: bool) -> int:
    data_index = None  # other ranks read the footers themselves once rank 0 has made the data
    if main:
        from shardrun.driver.run_dir import prepare_run_dir

        _emit(f"job spec, resolved:\n{spec.to_yaml()}")
        data_index = ensure_data(spec, resume=not args.fresh)
        prepare_run_dir(spec, fresh=args.fresh, emit=_emit)
    from shardrun.trainer.extensions import choose_accelerator

    choose_accelerator(spec.scaling.use_gpu)  # before DeepSpeed is imported
    from shardrun.driver.local import run_local
    from shardrun.trainer.faults import FaultInjector

    return stopped_exit(run_local(spec, data_index, faults=FaultInjector.from_env()))


def stopped_exit(signal_name: str | None) -> int:
    """0 for a run that ended at max_steps; one stopped on a signal after its checkpoint exits as that signal
    would end a process (SIGINT 130, SIGTERM 143, SIGHUP 129)."""
    from shardrun.driver.stop_signals import EXIT_CODES

    return EXIT_CODES.get(signal_name, 143) if signal_name else 0


def cmd_prepare_text(args: argparse.Namespace) -> int:
    from shardrun.datasets import prepare

    if bool(args.sources) == args.python_stdlib:
        raise UserError("give text files or directories, or --python-stdlib (one of the two)")
    max_bytes = int(args.max_mb * 1e6) if args.max_mb else None
    sources = prepare.stdlib_sources() if args.python_stdlib else args.sources
    started = time.perf_counter()
    files = prepare.prepare_text(sources, Path(args.out), args.seq_len, max_bytes, tokenizer=args.tokenizer,
                                 rows_per_file=args.rows_per_file, row_group_rows=args.row_group_rows,
                                 compression=args.compression, workers=args.workers)
    seconds = time.perf_counter() - started
    done = prepare.summarize(files)
    _emit(f"wrote {done.files} Parquet shards to {args.out}: {done.rows:,} rows, {done.tokens:,} tokens, "
          f"{done.bytes_on_disk / 1e6:,.1f} MB on disk, {seconds:.1f} s")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from shardrun.datasets import build_index
    from shardrun.datasets.inspect import report

    if args.global_batch is not None and args.global_batch < 1:
        raise UserError(f"--global-batch must be at least 1 (got {args.global_batch})")
    partitions = args.partitions or 1
    if args.global_batch and args.global_batch % partitions:
        config.check_partitions(partitions, 1, args.global_batch)
    try:
        spec = (config.DataSpec(paths=args.paths, format="table") if args.table
                else config.DataSpec(paths=args.paths, column=args.column, seq_len=1, on_bad_file="skip"))
    except config.ValidationError as e:
        raise UserError(config.format_errors(e, "shardrun data inspect")) from None
    print(report(build_index(spec), args.global_batch, partitions))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from shardrun import jobs

    return jobs.submit(args.spec, args.overrides, at=args.address, working_dir=args.working_dir,
                       wait=not args.no_wait, emit=_emit, env=args.env, allow_secrets=args.allow_secrets)


def cmd_status(args: argparse.Namespace) -> int:
    from shardrun import jobs

    return jobs.status(args.run, at=args.address)


def cmd_logs(args: argparse.Namespace) -> int:
    from shardrun import jobs

    return jobs.logs(args.run, at=args.address, follow_logs=args.follow)


def cmd_stop(args: argparse.Namespace) -> int:
    from shardrun import jobs

    return jobs.stop(args.run, at=args.address)


def cmd_runs(args: argparse.Namespace) -> int:
    from shardrun import runs

    found = runs.list_runs(args.storage)
    if args.json:
        print(json.dumps(found, indent=2))
    else:
        print(runs.format_table(found) if found else f"{redact(args.storage)}: no runs")
    return 0


def cmd_checkpoints(args: argparse.Namespace) -> int:
    from shardrun.checkpoint_format import list_checkpoints

    found = list_checkpoints(args.run)
    if not found:
        print(f"{args.run}: no checkpoints")
    for c in found:
        state = "complete" if c["complete"] else f"incomplete: {c['why']}"
        print(f"step {c['step']:>8}  {c['bytes'] / 1e6:>10,.1f} MB  {state}  {c['path']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from shardrun.export import export

    done = export(args.run, args.out, step=args.step, dtype=args.dtype, emit=_emit, trust=args.trust_checkpoint)
    _emit(f"exported step {done['step']} ({done['dtype']}, {done['bytes'] / 1e6:,.1f} MB) from {done['source']} "
          f"to {done['out']}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import tempfile

    from shardrun import generate
    from shardrun.export import export

    source = args.source
    with tempfile.TemporaryDirectory() as tmp:
        if not Path(source, "config.json").exists():  # a run dir: export its newest checkpoint first
            export(source, tmp, emit=_emit, trust=args.trust_checkpoint)
            source = tmp
        text = generate.generate(generate.load(source), args.prompt.encode(), max_new_tokens=args.tokens,
                               temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    sys.stdout.write(args.prompt + text.decode("utf-8", errors="replace") + "\n")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from shardrun import report

    print(report.format_summary(report.report(args.run, args.out)))
    return 0


COMMANDS = {"run": cmd_run, "train": cmd_train, "check": cmd_check, "report": cmd_report,
            "runs": cmd_runs, "checkpoints": cmd_checkpoints, "export": cmd_export, "generate": cmd_generate,
            "submit": cmd_submit, "status": cmd_status, "logs": cmd_logs, "stop": cmd_stop}
DATA_COMMANDS = {"prepare-text": cmd_prepare_text, "inspect": cmd_inspect}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = DATA_COMMANDS[args.data_command] if args.command == "data" else COMMANDS[args.command]
    try:
        return handler(args)
    except UserError as e:
        if args.debug:
            traceback.print_exc()
        print(f"shardrun: error: {redact(str(e))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("shardrun: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # training failed: the cause in one line, the rest with --debug
        if args.debug:
            traceback.print_exc()
        print(f"shardrun: {type(e).__name__}: {redact(str(e))}", file=sys.stderr)
        return 1
