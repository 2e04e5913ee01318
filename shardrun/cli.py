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
from shardrun.errors import UserError, redact

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


def _add_verbose_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verbose", action="store_true",
                   help="print the resolved spec, and Ray's, DeepSpeed's and the workers' own log lines, which are "
                        "kept off the console otherwise")


def _add_trust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="load the checkpoint even if its files would call more than DeepSpeed's own classes "
                        "(only for storage you trust: loading runs what the files name)")


RUN_HELP = ("a run name, looked up under --storage (the NAME column of `shardrun runs`), or a run dir, "
            "<checkpoint.storage>/<name> (a path, abfs:// or s3://)")


def _add_tracking_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--no-tracking", action="store_true",
                   help=f"do not upload {what} to the run's experiment trackers (default: it goes to the MLflow and "
                   "W&B runs the run's tracking.json names, as artifacts)")


def _add_run_args(p: argparse.ArgumentParser, *, metavar: str = "RUN", help: str = RUN_HELP) -> None:  # noqa: A002
    p.add_argument("run", metavar=metavar, help=help)
    p.add_argument("--storage", metavar="DIR", default=config.CheckpointSpec().storage,
                   help="where a run name is looked up: checkpoint.storage, a path or URI (default: %(default)s)")


def version() -> str:
    """`shardrun <version>`: the installed package's, else shardrun.__version__."""
    from importlib import metadata

    import shardrun

    try:
        number = metadata.version("shardrun")
    except metadata.PackageNotFoundError:
        number = getattr(shardrun, "__version__", "unknown")
    return f"shardrun {number}"


class _Version(argparse.Action):
    """--version, looked up only when asked for."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardrun", description=__doc__)
    parser.add_argument("--version", action=_Version, help="print shardrun's version and exit")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="train on Ray (RAY_ADDRESS, else a local instance)")
    _add_spec_args(p, fresh=True)
    _add_verbose_arg(p)
    p.add_argument("--overrides-from", default=None, help=argparse.SUPPRESS)  # submit's secret --set values

    p = sub.add_parser("train", help="train in this process without Ray (alone or under torchrun)")
    _add_spec_args(p, fresh=True)
    _add_verbose_arg(p)

    p = sub.add_parser("check", help="run every check `run` makes before Ray (spec, model entrypoint, data, "
                                     "resume), then print the spec resolved",
                       description="The checks `run` makes before it starts or contacts Ray: the spec, the model "
                       "entrypoint's import, data.paths and every file's footer (data.prepare's corpus is not "
                       "built here), the data against the spec (seq_len, vocabulary, steps per epoch) and the "
                       "checkpoint a run would resume from. Their lines go to stderr, the resolved spec (secrets "
                       "masked) to stdout; a failed check exits 2 with the message `run` gives.")
    _add_spec_args(p)
    p.add_argument("--fresh", action="store_true",
                   help="check as for `run --fresh`: leave out the check of the checkpoint a run would resume from")

    p = sub.add_parser("submit", help="validate here, then run the job on a Ray cluster through its Jobs API")
    _add_spec_args(p)
    p.add_argument("--address", default=None, help="the Ray dashboard, http://HEAD:8265 (default: RAY_ADDRESS)")
    p.add_argument("--working-dir", default=None,
                   help="the folder sent to the cluster (default: the spec's project folder, the nearest one above "
                        "it with .git, pyproject.toml or setup.py)")
    p.add_argument("--no-wait", action="store_true", help="return once submitted instead of following the logs")
    _add_verbose_arg(p)
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
        "are listed too, marked 'moved aside'. A NAME is what `report`, `checkpoints`, `export` and `generate` "
        "take for RUN (with --storage STORAGE where it is not the default).")
    p.add_argument("storage", metavar="STORAGE", nargs="?", default=config.CheckpointSpec().storage,
                   help="checkpoint.storage: a path or URI (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the runs as JSON")
    p.add_argument("--prune-replaced", action="store_true",
                   help="delete the run dirs that --fresh moved aside (NAME.replaced-TIME) but the newest --keep of "
                        "each name, and print what was removed (local storage only)")
    p.add_argument("--keep", type=int, default=None, metavar="N",
                   help="with --prune-replaced: moved-aside run dirs kept per name, newest first (default 3)")

    p = sub.add_parser("checkpoints", help="a run's checkpoints: step, size, complete or why not")
    _add_run_args(p)

    p = sub.add_parser("export", help="a checkpoint as one safetensors file (ZeRO shards gathered) + config.json, "
                       "or as a Hugging Face transformers folder (--format hf)")
    _add_run_args(p)
    p.add_argument("--out", metavar="DIR", required=True,
                   help="folder for model.safetensors and config.json (--format hf: a from_pretrained folder)")
    p.add_argument("--step", type=int, default=None, help="a checkpoint's step (default: the newest complete)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    p.add_argument("--format", dest="fmt", choices=["shardrun", "hf"], default="shardrun",
                   help="shardrun (default; what `generate` reads) or hf: a folder that transformers' "
                   "AutoModelForCausalLM.from_pretrained loads (the built-in GPT as GPT-2, a model.hf run as its "
                   "own model, tokenizer files copied)")
    p.add_argument("--merge", action="store_true",
                   help="--format hf of a model.lora run: the base model with the adapters merged into its weights "
                   "(default: the adapters alone, in peft's format)")
    p.add_argument("--max-shard-size", default=None, metavar="SIZE",
                   help="--format hf: the largest weights file, e.g. 500MB (default 5GB); above it the weights are "
                   "sharded, with an index")
    _add_tracking_arg(p, "the exported folder")
    _add_trust_arg(p)
    _add_verbose_arg(p)

    p = sub.add_parser("eval", help="a checkpoint's loss on held-out data (the run's eval section, or --paths); "
                       "under torchrun, on its ranks")
    _add_run_args(p)
    p.add_argument("--step", type=int, default=None, help="a checkpoint's step (default: the newest complete)")
    p.add_argument("--paths", nargs="+", metavar="PATH", default=None,
                   help="held-out Parquet files or folders in the run's data format (default: the run's eval.paths)")
    p.add_argument("--max-batches", type=int, default=None, metavar="N",
                   help="micro-batches evaluated (default: the run's eval.max_batches, else 50)")
    p.add_argument("--json", action="store_true", help="the result as one JSON object")
    _add_trust_arg(p)
    _add_verbose_arg(p)

    p = sub.add_parser("generate", help="sample text from a byte-level GPT run (its newest checkpoint) or export")
    _add_run_args(p, metavar="RUN_OR_EXPORT", help=f"{RUN_HELP}, or a folder written by `shardrun export`")
    p.add_argument("--prompt", default="", help="text to continue (default: none)")
    p.add_argument("--tokens", type=int, default=200, help="bytes to sample (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="below 1 sharper, above 1 more random (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=50,
                   help="sample among the k likeliest bytes, 0 for all (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    _add_trust_arg(p)
    _add_verbose_arg(p)

    p = sub.add_parser("report", help="plots (PNG) and an HTML page from a run's metrics.jsonl")
    _add_run_args(p)
    p.add_argument("--out", metavar="DIR", default=None,
                   help="where report.html and its PNGs go (default: RUN/report; ./<name>-report for a URI)")
    _add_tracking_arg(p, "the report")

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
    text_parser = p

    p = data.add_parser("prepare", help="text, prompt/completion or chat records to loss-masked token shards (a "
                                        "Hugging Face tokenizer)")
    p.add_argument("sources", nargs="+", metavar="INPUT",
                   help="text files (one document each), JSONL (.jsonl, .jsonl.gz), Parquet, or folders of them")
    p.add_argument("--out", required=True, help="output directory (must not exist)")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per training sequence (rows hold one more)")
    p.add_argument("--tokenizer", required=True, metavar="TOKENIZER",
                   help="a Hugging Face tokenizer folder (special tokens and chat template come with it) or a "
                        "tokenizer.json")
    p.add_argument("--format", choices=("text", "prompt-completion", "chat"), default="text",
                   help="text: every token in the loss; prompt-completion: the completion only; chat: the "
                        "assistant's turns only (default %(default)s)")
    p.add_argument("--text-field", default="text", help="JSONL key or Parquet column of a text document "
                                                        "(default %(default)s)")
    p.add_argument("--prompt-field", default="prompt", help="key of the prompt (default %(default)s)")
    p.add_argument("--completion-field", default="completion", help="key of the completion (default %(default)s)")
    p.add_argument("--messages-field", default="messages",
                   help="key of a chat's list of {role, content} messages (default %(default)s)")
    p.add_argument("--no-pack", dest="pack", action="store_false",
                   help="one document per row, padded (default: documents packed into rows, with position_ids)")
    p.add_argument("--on-bad-record", choices=("fail", "skip"), default="fail",
                   help="a record that is not valid JSON, misses a field, has an empty completion or no assistant "
                        "turn: fail names it; skip leaves it out, counted (default %(default)s)")
    p.add_argument("--held-out", type=float, default=None, metavar="SHARE",
                   help="put about this share of the documents (above 0, at most 0.5; chosen by a hash of each "
                        "document's tokens, so duplicates stay together) in --held-out-dir, for the spec's "
                        "eval.paths (default: none)")
    p.add_argument("--held-out-dir", default=None, metavar="DIR",
                   help="output directory of the held-out documents (must not exist; default: --out's name with "
                        "-eval after it, e.g. data/train-eval)")
    prepare_parser = p
    # Defaults are prepare_text's (a unit test holds them equal); importing it here would load the
    # data stack for every command.
    for p in (text_parser, prepare_parser):
        p.add_argument("--rows-per-file", type=int, default=4096, metavar="N",
                       help="rows in each Parquet file (default %(default)s)")
        p.add_argument("--row-group-rows", type=int, default=512, metavar="N",
                       help="rows in each row group, the unit ranks read (default %(default)s)")
        p.add_argument("--compression", choices=("none", "snappy", "zstd", "lz4", "gzip"), default="zstd",
                       help="Parquet compression (default %(default)s)")
        p.add_argument("--workers", type=int, default=None, metavar="N",
                       help="at most N processes tokenize and write (default: the CPUs); small inputs stay in "
                            "this one")

    p = data.add_parser("inspect", help="files, rows, row groups, schema, bytes and steps per epoch")
    p.add_argument("paths", nargs="+", metavar="URI", help="Parquet files or directories (path, abfs://, s3://)")
    p.add_argument("--column", default="tokens", help="token column to check (default %(default)s)")
    p.add_argument("--table", action="store_true", help="tabular data: check every column is numeric")
    p.add_argument("--global-batch", type=int, default=None, metavar="N",
                   help="samples per optimizer step, all ranks: print the steps per epoch")
    p.add_argument("--partitions", type=int, default=None, metavar="P",
                   help="data.partitions for the steps per epoch (default: a run's, scaling.num_workers, "
                        f"{config.default_partitions()} unless a spec sets it; give the run's data.partitions or "
                        "num_workers)")
    return parser


def load_spec(args: argparse.Namespace) -> config.JobSpec:
    """Validate the spec and everything the driver can check before any cluster resource."""
    if getattr(args, "overrides_from", None):
        from shardrun.jobs import overrides_from

        args.overrides = [*args.overrides, *overrides_from(args.overrides_from)]
    spec = config.load(args.spec, args.overrides)
    if spec.model.entrypoint:
        from shardrun.trainer.models import check_checkpointing_hook, resolve_entrypoint

        # Like `python -m`: the user's own modules in the working directory are importable.
        sys.path.insert(0, os.getcwd())
        resolve_entrypoint(spec.model.entrypoint)
        check_checkpointing_hook(spec.model)
    if spec.model.compile and not spec.scaling.use_gpu and not os.environ.get("RAY_ADDRESS"):
        check_compiler()
    from shardrun.driver import trackers

    trackers.check(spec)
    return spec


def check_compiler() -> None:
    """model.compile on a local CPU run: inductor writes C++ and builds it with the machine's compiler."""
    import shutil

    if not any(shutil.which(name) for name in ("c++", "g++", "clang++")):
        raise UserError("model.compile on CPU needs a C++ compiler (torch.compile's inductor builds C++ kernels), and "
                        "this machine has none on PATH (c++, g++, clang++): install one (apt install g++), or set "
                        "model.compile: false")


def ensure_data(spec: config.JobSpec, *, resume: bool = True, prepare: bool = True, emit=None) -> dict:
    """The spec's warnings; build data.prepare's corpus if it is missing (unless not `prepare`: `check`); then
    index the files (named if bad), take data.seq_len from them when unset (set on `spec`, before the workers get
    it) and check the spec again with it; when resuming, check that the newest complete checkpoint's data
    position fits them. Lines go to `emit` (default: stdout).

    Returns the data index as a plain dict for the workers: file footers are read once per run ({} when `check`
    leaves data.prepare's corpus to the run).
    """
    from shardrun.datasets import build_index
    from shardrun.datasets.inspect import steps_per_epoch, summary

    emit = emit or _emit
    for warning in spec.warnings():
        emit(f"warning: {warning}")
    target = spec.data.paths[0]
    if spec.data.prepare and not Path(target).exists():
        if not prepare:
            emit(f"data.paths: {target} does not exist yet: `shardrun run` prepares the "
                 f"{spec.data.prepare.source} corpus there (data.prepare), so the data checks wait for the run")
            return {}
        from shardrun.datasets.prepare import prepare_stdlib, shard_count

        emit(f"preparing the {spec.data.prepare.source} corpus in {target}")
        files = prepare_stdlib(Path(target), spec.data.seq_len,
                               int(spec.data.prepare.max_mb * 1e6))
        emit(f"wrote {shard_count(len(files))}")
    taken = spec.data.format == "tokens" and spec.data.seq_len is None
    index = build_index(spec.data, emit=emit)  # sets an unset data.seq_len from the files
    if taken:
        config.revalidate(spec, "data.paths (data.seq_len unset, taken from the files)")
    vocab = index.vocab_size
    if spec.model.type == "gpt" and vocab and vocab > spec.model.vocab_size:
        raise UserError(f"data.paths: the shards' token ids go up to {vocab - 1} (their tokenizer's vocabulary), "
                        f"but model.vocab_size is {spec.model.vocab_size}; set model.vocab_size: {vocab}")
    from shardrun.driver import model_check

    shape = model_check.check_hf_model(spec, index, emit) if spec.model.hf is not None else \
        model_check.gpt_shape(spec.model) if spec.model.type == "gpt" else None
    if shape is not None:  # an entrypoint model's shape is its own
        model_check.check_memory(spec, shape, index, emit)
    if not steps_per_epoch(index, spec.global_batch, spec.partitions, seed=spec.data.seed,
                           window=spec.data.shuffle_window):
        raise UserError(f"data.paths: {index.rows:,} rows make no whole step of a global batch of {spec.global_batch} "
                        f"samples over {spec.partitions} partitions (deepspeed.micro_batch_size x grad_accum_steps x "
                        "workers); add data, or lower the batch or data.partitions")
    emit(summary(index, spec.global_batch, spec.partitions, seq_len_from_files=spec.data.seq_len if taken else None))
    if spec.eval is not None:
        held = build_index(spec.eval_data())
        rows = min(held.rows, spec.eval.max_batches * spec.deepspeed.micro_batch_size)
        when = f"every {spec.eval.every_steps} steps" if spec.eval.every_steps else ""
        when += (" and " if when else "") + "after the last step" if spec.eval.at_end else ""
        emit(f"eval: the first {rows:,} of {held.rows:,} held-out rows in {', '.join(spec.eval.paths)}, "
             f"{when or 'never (eval.every_steps unset, eval.at_end false)'}")
    if resume:
        check_resume(spec, index)
    return index.to_dict()


def check_resume(spec: config.JobSpec, index) -> None:
    """The data, seed and partitions of the checkpoint a run resumes from, checked here rather than once the
    workers have built the model and loaded the checkpoint. The newest complete one is the one resumed from
    (Ray's record never names a newer one); checkpoints from before the manifest held the position are left
    to the workers' own check."""
    from shardrun.checkpoint_format import base_model_mismatch, list_checkpoints
    from shardrun.datasets.stream import check_position

    if not fs.exists(spec.run_dir):
        return
    complete = [c for c in list_checkpoints(spec.run_dir) if c["complete"]]
    if complete:
        why = base_model_mismatch(complete[-1].get("base_model"), spec.model.adapter_base, complete[-1]["step"])
        if why:
            raise UserError(f"resuming {spec.name}: {why}")
    if complete and complete[-1].get("data"):
        try:
            check_position(complete[-1]["data"], spec.data, index)
        except UserError as e:
            raise UserError(f"resuming {spec.name} from its checkpoint of step {complete[-1]['step']}: {e}") from None


def cmd_check(args: argparse.Namespace) -> int:
    """Every check `run` makes before Ray, its lines on stderr; the resolved spec on stdout (also when a data
    check fails: data.seq_len taken from the files included once known)."""
    spec = load_spec(args)
    try:
        ensure_data(spec, resume=not args.fresh, prepare=False, emit=fs.log)
    finally:
        print(redact(spec.to_yaml()), end="", flush=True)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from shardrun.lease import Lease

    spec = load_spec(args)
    with Lease(spec.run_dir, "run", emit=_emit):  # before anything is written; a second run of the name stops here
        return _run(args, spec)


def _run(args: argparse.Namespace, spec: config.JobSpec) -> int:
    _start_banner(args, spec)
    data_index = ensure_data(spec, resume=not args.fresh)
    from shardrun.cluster.connect import connect

    started = time.time()
    connect(preload="shardrun.cluster.launch")  # the launcher's imports (Ray Train, torch) ride on ray.init
    from shardrun.cluster.launch import launch

    summary = launch(spec, fresh=args.fresh, emit=_emit, data_index=data_index, started=started)
    _end(spec, summary)
    return stopped_exit(summary.get("stopped"))


def _start_banner(args: argparse.Namespace, spec: config.JobSpec) -> None:
    """The console's filter in place, then the run in one line (the whole spec with --verbose)."""
    from shardrun.driver import noise
    from shardrun.driver.run_log import banner

    global _FILTERS
    # Ray prints its workers' and DeepSpeed's logs here (storage URLs with their SAS signatures among them)
    _FILTERS = noise.install(verbose=args.verbose)
    _emit(banner(spec))
    if args.verbose:
        _emit(f"job spec, resolved:\n{redact(spec.to_yaml())}")


def _end(spec: config.JobSpec, summary: dict) -> None:
    """The run's last lines: how it ended, and what the console was spared."""
    from shardrun.driver import noise
    from shardrun.driver.run_log import summary_line

    _emit(summary_line(summary, spec.run_dir))
    kept_out = noise.hidden_line(_FILTERS)
    if kept_out:
        _emit(kept_out)


_FILTERS: tuple = ()
"""The console's filters, once a run installed them (shardrun.driver.noise)."""


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

        _start_banner(args, spec)
        data_index = ensure_data(spec, resume=not args.fresh)
        prepare_run_dir(spec, fresh=args.fresh, emit=_emit)
    else:
        from shardrun.driver import noise

        noise.install(verbose=args.verbose)  # DeepSpeed's routine lines, on every rank
    from shardrun.trainer.extensions import choose_accelerator

    choose_accelerator(spec.scaling.use_gpu)  # before DeepSpeed is imported
    from shardrun.driver.local import run_local
    from shardrun.trainer.faults import FaultInjector

    stopped = run_local(spec, data_index, faults=FaultInjector.from_env())
    if main:
        from shardrun.driver import noise

        kept_out = noise.hidden_line(_FILTERS)
        if kept_out:
            _emit(kept_out)
    return stopped_exit(stopped)


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
    _emit(f"wrote {prepare.shard_count(done.files)} to {args.out}: {done.rows:,} rows, {done.tokens:,} tokens, "
          f"{done.bytes_on_disk / 1e6:,.1f} MB on disk, {seconds:.1f} s")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from shardrun.datasets import finetune

    fmt = finetune.RecordFormat(kind=args.format, text_field=args.text_field, prompt_field=args.prompt_field,
                                completion_field=args.completion_field, messages_field=args.messages_field)
    started = time.perf_counter()
    done = finetune.prepare_documents(args.sources, Path(args.out), args.seq_len, args.tokenizer, fmt=fmt,
                                      pack_rows=args.pack, on_bad_record=args.on_bad_record,
                                      rows_per_file=args.rows_per_file, row_group_rows=args.row_group_rows,
                                      compression=args.compression, workers=args.workers,
                                      held_out=args.held_out, held_out_dir=args.held_out_dir)
    for line in done.bad_lines():
        fs.log(line)
    _emit(done.line(args.out, time.perf_counter() - started))
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from shardrun.datasets import build_index
    from shardrun.datasets.inspect import report

    if args.global_batch is not None and args.global_batch < 1:
        raise UserError(f"--global-batch must be at least 1 (got {args.global_batch})")
    partitions = args.partitions or config.default_partitions()  # a run's default, as its steps per epoch count
    if args.global_batch and args.global_batch % partitions:
        try:
            config.check_partitions(partitions, 1, args.global_batch)
        except UserError as e:
            if args.partitions:
                raise
            raise UserError(f"{e} ({partitions} partitions is the default, a run's with the default "
                            "scaling.num_workers; give the run's with --partitions P)") from None
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
                       wait=not args.no_wait, emit=_emit, env=args.env, allow_secrets=args.allow_secrets,
                       verbose=args.verbose)


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

    if args.keep is not None and not args.prune_replaced:
        raise UserError("--keep goes with --prune-replaced")
    if args.prune_replaced:
        keep = runs.KEEP_REPLACED if args.keep is None else args.keep
        removed = runs.prune_replaced(args.storage, keep)
        for path in removed:
            print(f"removed {path}")
        if not removed:
            print(f"{args.storage}: no moved-aside run dirs beyond the newest {keep} of each name")
        return 0
    found = runs.list_runs(args.storage)
    if args.json:
        print(json.dumps(found, indent=2))
    else:
        print(runs.format_table(found) if found else f"{redact(args.storage)}: no runs")
    return 0


def cmd_checkpoints(args: argparse.Namespace) -> int:
    from shardrun.checkpoint_format import list_checkpoints
    from shardrun.runs import resolve_run_dir

    run = resolve_run_dir(args.run, args.storage)
    found = list_checkpoints(run)
    if not found:
        print(f"{redact(run)}: no checkpoints")
    for c in found:
        state = "complete" if c["complete"] else f"incomplete: {c['why']}"
        held_out = f"  eval loss {c['eval_loss']:.4f}" if c.get("eval_loss") is not None else ""
        print(f"step {c['step']:>8}  {c['bytes'] / 1e6:>10,.1f} MB  {state}{held_out}  {c['path']}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from shardrun.driver import trackers
    from shardrun.driver.noise import library_output_to_stderr
    from shardrun.export import export
    from shardrun.runs import resolve_run_dir

    run_dir = resolve_run_dir(args.run, args.storage)
    with library_output_to_stderr(verbose=args.verbose):
        done = export(run_dir, args.out, step=args.step, dtype=args.dtype,
                      fmt=args.fmt, max_shard_size=args.max_shard_size, emit=_emit, trust=args.trust_checkpoint,
                      merge=args.merge)
    as_hf = {"adapters": ", LoRA adapters in peft's format", "merged": ", Hugging Face format, adapters merged"}.get(
        done.get("lora"), ", Hugging Face format" if done["format"] == "hf" else "")
    size = f"{done['bytes'] / 1e6:,.1f} MB" if done["bytes"] >= 100_000 else f"{done['bytes'] / 1e3:,.1f} kB"
    _emit(f"exported step {done['step']} ({done['dtype']}{as_hf}, {size}) from "
          f"{done['source']} to {redact(done['out'])}")
    if not args.no_tracking:
        trackers.attach(run_dir, done["out"], f"exports/{os.path.basename(os.path.abspath(done['out']))}", _emit)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import tempfile

    from shardrun import generate
    from shardrun.driver.noise import library_output_to_stderr
    from shardrun.export import export, model_spec
    from shardrun.runs import resolve_run_dir

    source = resolve_run_dir(args.run, args.storage)  # an export folder here is a path: it stays as it is
    # the sampled text is all that goes to stdout (`generate ... > out.txt`); our lines and DeepSpeed's to stderr
    with tempfile.TemporaryDirectory() as tmp, library_output_to_stderr(verbose=args.verbose):
        if not any(Path(source, name).exists() for name in ("config.json", generate.ADAPTER_CONFIG)):
            model = model_spec(source, "hf")  # a run dir: its newest checkpoint exported first
            if model.hf is not None and model.hf.classifies:
                raise UserError(generate.NOT_GENERATIVE.format(what=f"{source} trains a sequence classifier"))
            # a model.hf run exports as transformers reads it; a LoRA run with its adapters merged in
            export(source, tmp, emit=fs.log, trust=args.trust_checkpoint,
                   fmt="hf" if model.hf is not None else "shardrun", merge=model.lora is not None)
            source = tmp
        sampling = dict(max_new_tokens=args.tokens, temperature=args.temperature, top_k=args.top_k, seed=args.seed)
        if generate.is_hf_folder(source):
            text = generate.generate_hf(source, args.prompt, **sampling)
        else:
            text = generate.generate(generate.load(source), args.prompt.encode(), **sampling).decode(
                "utf-8", errors="replace")
    sys.stdout.write(args.prompt + text + "\n")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from shardrun.checkpoint_format import pick
    from shardrun.driver.noise import library_output_to_stderr
    from shardrun.driver.run_log import eval_line
    from shardrun.export import check_pickles, local_folder
    from shardrun.runs import resolve_run_dir

    run_dir = resolve_run_dir(args.run, args.storage)
    spec = run_spec(run_dir)
    paths = args.paths or (spec.eval.paths if spec.eval else None)
    if not paths:
        raise UserError(f"{redact(run_dir)}'s spec has no eval section: give the held-out data with --paths")
    if args.max_batches is not None and args.max_batches < 1:
        raise UserError(f"--max-batches is at least 1 (got {args.max_batches})")
    batches = args.max_batches or (spec.eval.max_batches if spec.eval else None)
    spec.eval = config.EvalSpec(paths=paths, **({"max_batches": batches} if batches else {}))
    chosen = pick(run_dir, args.step)
    main = os.environ.get("RANK", "0") == "0"
    with library_output_to_stderr(verbose=args.verbose), local_folder(run_dir, chosen, fs.log) as folder:
        if not args.trust_checkpoint:
            check_pickles(folder)
        from shardrun.trainer.extensions import choose_accelerator

        choose_accelerator(spec.scaling.use_gpu)  # before DeepSpeed is imported
        from shardrun.trainer.evaluate import evaluate_checkpoint
        from shardrun.trainer.topology import Topology

        result = evaluate_checkpoint(spec, folder, Topology.from_env(spec.scaling.use_gpu))
    if main:
        line = f"{spec.name}: {eval_line(result, byte_level=spec.model.byte_level)}"
        print(json.dumps(result) if args.json else line)
    return 0


def run_spec(run_dir: str) -> config.JobSpec:
    """The resolved spec a run dir holds (job.yaml), validated."""
    from shardrun.export import job_yaml

    raw, where = job_yaml(run_dir)
    return config.parse(raw, source=where)


def cmd_report(args: argparse.Namespace) -> int:
    from shardrun import report
    from shardrun.runs import resolve_run_dir

    run_dir = resolve_run_dir(args.run, args.storage)
    made = report.report(run_dir, args.out)
    print(report.format_summary(made))
    if not args.no_tracking:
        from shardrun.driver import trackers

        trackers.attach(run_dir, os.path.dirname(made["report"]), "report", _emit)
    return 0


COMMANDS = {"run": cmd_run, "train": cmd_train, "check": cmd_check, "report": cmd_report, "eval": cmd_eval,
            "runs": cmd_runs, "checkpoints": cmd_checkpoints, "export": cmd_export, "generate": cmd_generate,
            "submit": cmd_submit, "status": cmd_status, "logs": cmd_logs, "stop": cmd_stop}
DATA_COMMANDS = {"prepare-text": cmd_prepare_text, "prepare": cmd_prepare, "inspect": cmd_inspect}


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
