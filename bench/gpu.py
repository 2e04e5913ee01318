"""GPU training benchmark: shardrun's worker loop against a bare PyTorch loop, tokens/s and MFU.

One process per measurement, one after another on one GPU:
  peak      the card's bf16 matmul rate (square products, CUDA events), beside its datasheet figure
  bare      the built-in GPT trained by plain PyTorch: bf16 weights, fp32 master copies, torch's AdamW
            (fused on CUDA), gradient clipping. Its batches are the shards' rows read into memory before
            the clock as contiguous int64 tensors, pinned, and copied to the GPU (non_blocking)
  shardrun  the same GPT trained by shardrun's worker loop without Ray (`shardrun train`'s path:
            shardrun.driver.local.run_local, DeepSpeed bf16, the Parquet shards streamed by
            shardrun.datasets), once per --zero-stage and --optimizers:
              torch      deepspeed.optimizer.implementation=torch (the default, and this bench's unless
                         asked): torch.optim.AdamW (fused on CUDA) inside DeepSpeed; compiles nothing
              deepspeed  DeepSpeed's FusedAdam, only with --optimizers torch,deepspeed (or deepspeed), and
                         only where it can be built: prebuilt in DeepSpeed, or nvcc found. It is built in a
                         process of its own before any of its rows (its seconds printed and counted against
                         --deadline, never inside a timed window); otherwise its rows are skipped, the reason
                         in one line of the output and in the JSON. On a CPU they are always skipped
Both loops train the same model from the same seed on the same synthetic token shards, and are
timed over the same kind of window: after --warmup-steps, from one device sync to the next, with
checkpoint saves (shardrun saves once, after the last timed step) left out. Each row also has its
optimizer step's device time (CUDA events around it, no extra sync) and its peak device memory
(torch.cuda.max_memory_allocated, reset as the timed window starts). Both loops step the same torch
AdamW on fp32 master weights, so what shardrun's optimizer step costs beyond the bare loop's is
DeepSpeed's own (its bf16 optimizer wrapper, ZeRO's bookkeeping), not shardrun's loop. With ZeRO
stages 0 and 1 both run, a second table sets them side by side (bf16 at ZeRO 0 goes through
DeepSpeed's FP16 optimizer wrapper, at ZeRO 1 through ZeRO's) and one line says which is faster.
`--compile on` compiles the model in both loops: the bare loop's model.compile(), shardrun's spec field
model.compile (DeepSpeed's engine.compile(), which calls it).

    python bench/gpu.py                                  # GPT-2 small (124M), bf16, on this GPU
    python bench/gpu.py --compile both --record          # eager and torch.compile; into docs/benchmarks.md
    python bench/gpu.py --size tiny --steps 6 --warmup-steps 2   # CPU check that it all runs

On a lent GPU machine (PyTorch, no network; bench/gpu_bundle.sh fills .gpu-wheels here first),
one call of the device tool's `run`, with carry [".gpu-wheels"] and timeout_s 450 (--deadline
stops starting measurements at 400 s, so the table always comes back; the default --optimizers
torch needs no compiler):

    set -o pipefail; nvidia-smi; PYTHONUNBUFFERED=1 python3 bench/gpu.py --wheels .gpu-wheels
    --zero-stage 0,1 --compile both --deadline 400 --out $OUT/gpu.json 2>&1 | tee $OUT/gpu.log

With FusedAdam as well, the same call with `--optimizers torch,deepspeed --compile off` in place of
`--compile both` (its build, a minute or two where nvcc is there, takes the compiled rows' time);
then, here: `python bench/gpu.py --record-from <files_at>/gpu.json` appends its record.

A Hugging Face model instead of the built-in GPT: `--size llama-1b`, a transformers Llama of 0.89B
parameters (16 layers x 2048, 16 heads, 8 KV heads, MLP 5632, vocabulary 32000, 2048 positions; seq
2048, micro-batch 8). A child process first creates it with random weights on the device (seed 0) and
writes it with save_pretrained (bf16 safetensors) into the bench's temporary folder, before any clock;
both loops then load it with from_pretrained (bf16, SDPA attention): the bare loop through shardrun's
models.hf.build and .to(device), shardrun's as `model: {hf: {path: FOLDER, dtype: bf16}}`, and the
report adds each row's load times (from_pretrained; then to the device, or to DeepSpeed's engine
ready). It does not fit the 450 s beside the GPT rows: its own call of the device tool's `run`, with
carry [".gpu-wheels"] and timeout_s 450 (the image's transformers and accelerate serve; shardrun's
one checkpoint after the last step, about 12 GB at ZeRO 1, counts against --deadline):

    set -o pipefail; nvidia-smi; PYTHONUNBUFFERED=1 python3 bench/gpu.py --wheels .gpu-wheels
    --size llama-1b --zero-stage 1 --deadline 400 --out $OUT/gpu-llama.json 2>&1 | tee $OUT/gpu-llama.log

`--size llama-tiny` is its CPU check (seconds): `python bench/gpu.py --size llama-tiny --steps 6
--warmup-steps 2`.

Memory levers, on shardrun's rows only (the bare loop keeps every activation and trains every weight):
`--activation-checkpointing off|on|both|N[,...]` (model.activation_checkpointing: every layer, or every
N-th, recomputed in the backward) and `--lora off|on|both|R[,...]` (model.lora: adapters of rank R, alpha
2R, on every linear layer but the head, the base weights frozen; --size llama-* only; on is rank 16). Each
combination is a row of its own, per ZeRO stage, optimizer and compile setting, the row without levers
first. Rows with levers are not set against the bare loop (they do other work); a second table, "Levers",
sets each against shardrun's row without levers: its trained parameters, tokens/s and what it loses, peak
device memory over the timed steps (torch.cuda.max_memory_allocated) and what it saves, and its first
step's attention forwards, one per layer and two where checkpointing recomputes the layer (eager rows
only). A row that asked for checkpointing and recomputed nothing says so in a finding, with how many of
its modules were in eval mode, where transformers never checkpoints. The levers of llama-1b on an H100,
one call of the device tool's `run`, with carry [".gpu-wheels"] and timeout_s 450 (7 processes: the
model's writing, peak, bare, and shardrun at ZeRO 1 with none, checkpointing, LoRA r16 and both; the
full fine-tuning rows' checkpoints, about 12 GB each, count against --deadline, the LoRA rows' hold the
adapters alone; peft is in the image):

    set -o pipefail; nvidia-smi; PYTHONUNBUFFERED=1 python3 bench/gpu.py --wheels .gpu-wheels
    --size llama-1b --zero-stage 1 --activation-checkpointing both --lora both --steps 30
    --deadline 400 --out $OUT/gpu-levers.json 2>&1 | tee $OUT/gpu-levers.log

Its CPU check (a minute): `python bench/gpu.py --size llama-tiny --steps 6 --warmup-steps 2
--activation-checkpointing both --lora both`.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if importlib.util.find_spec("shardrun") is None:  # a copied working tree, shardrun not installed
    sys.path.insert(0, str(REPO))

from common import (  # noqa: E402
    SEED,
    Parser,
    append_entry,
    command,
    deepspeed_cpu_env,
    git_revision,
    gpt,
    installed,
    machine,
    on_startup,
    positive,
    running,
    table,
    versions,
    write_tokens,
    zero_stages,
)

SECTION = "## GPU training"
SIZES = {
    # GPT-2 small with the vocabulary padded to a multiple of 128 (nanoGPT's 50304)
    "gpt2-small": {"n_layer": 12, "n_head": 12, "n_embd": 768, "vocab_size": 50304, "seq_len": 1024,
                   "micro_batch": 32, "lr": 6e-4},
    "tiny": {"n_layer": 2, "n_head": 2, "n_embd": 64, "vocab_size": 512, "seq_len": 64,
             "micro_batch": 4, "lr": 3e-3},
    # transformers' Llama (model.hf), random weights written by save_pretrained before any clock: about 1B
    # (0.89B with untied embeddings), and its CPU check
    "llama-1b": {"hf": {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 16,
                        "num_key_value_heads": 8, "intermediate_size": 5632, "max_position_embeddings": 2048},
                 "vocab_size": 32000, "seq_len": 2048, "micro_batch": 8, "lr": 3e-4},
    "llama-tiny": {"hf": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                          "num_key_value_heads": 1, "intermediate_size": 128, "max_position_embeddings": 64},
                   "vocab_size": 512, "seq_len": 64, "micro_batch": 4, "lr": 3e-3},
}
CPU_SIZES = ("tiny", "llama-tiny")
"""Sizes that only check that it all runs: never recorded."""
PEAK_SIZES = {"cuda": (4096, 8192, 16384), "cpu": (256, 512)}
GOAL_MFU = 0.45
GOAL_RATIO = 0.97
GRAD_CLIP = 1.0  # shardrun's default deepspeed.grad_clip
IMPORTS = {"deepspeed": "deepspeed", "pydantic": "pydantic", "yaml": "pyyaml", "pyarrow": "pyarrow",
           "prometheus_client": "prometheus-client", "numpy": "numpy"}
"""Module -> distribution: what shardrun's worker loop imports beyond torch (no Ray)."""
VERSIONS = ("torch", "deepspeed", "pyarrow", "numpy", "pydantic")
SAY = "bench-result: "  # marks a child's result line among whatever DeepSpeed prints
OPTIMIZERS = {"torch": "torch AdamW", "deepspeed": "FusedAdam"}
"""deepspeed.optimizer.implementation -> the name a row shows."""
GIB = 2**30
LORA_RANK = 16
"""--lora on's rank."""
CHILD_KINDS = ("peak", "bare", "shardrun", "fused-adam", "hf-model")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.record_from:
        record(json.loads(Path(args.record_from).read_text()), local=False)
        return 0
    if args.child:
        print(SAY + json.dumps(CHILDREN[args.child](args)), flush=True)
        return 0
    started = time.monotonic()
    if args.wheels:
        install_missing(args.wheels)
    result = run_all(args, started)
    print_report(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.out}")
    if args.record:
        record(result, local=True)
    return 0 if all("error" not in r for r in [result["peak"], *result["runs"]]) else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(__doc__)
    p.add_argument("--size", choices=SIZES, default="gpt2-small",
                   help="model: the built-in GPT (gpt2-small, tiny) or transformers' Llama with random weights "
                        "written first (llama-1b, llama-tiny; see above); default gpt2-small")
    p.add_argument("--steps", type=positive, default=50, help="timed optimizer steps per loop (default 50)")
    p.add_argument("--warmup-steps", type=positive, default=10, help="untimed steps first (default 10)")
    p.add_argument("--micro-batch", type=positive, help="sequences per step (default: the size's, 32 for gpt2-small)")
    p.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda if there is one, else cpu")
    p.add_argument("--compile", choices=("off", "on", "both"), default="off",
                   help="torch.compile the model in both loops (shardrun's model.compile: DeepSpeed's "
                        "engine.compile()): off, on, or both one after the other (default off)")
    p.add_argument("--activation-checkpointing", type=lever("every how many layers", 1),
                   default=[0], metavar="off|on|both|N[,...]",
                   help="shardrun's model.activation_checkpointing, a row each: off, on (every layer), N (every "
                        "N-th), or both (off and on); e.g. off,1,2 (default off; the bare loop never checkpoints)")
    p.add_argument("--lora", type=lever("LoRA ranks", LORA_RANK), default=[0], metavar="off|on|both|R[,...]",
                   help=f"shardrun's model.lora (--size llama-* only), a row each: off (full fine-tuning), R (rank R, "
                        f"alpha 2R, all-linear), on (rank {LORA_RANK}), or both (off and on) (default off)")
    p.add_argument("--zero-stage", type=zero_stages, default=[0], metavar="N[,N...]",
                   help="shardrun's deepspeed.zero_stage, or several to run one after the other "
                        "(default 0: one GPU shards nothing)")
    p.add_argument("--optimizers", type=optimizers, default=["torch"], metavar="IMPL[,IMPL]",
                   help="shardrun's deepspeed.optimizer.implementation, or both one after the other: torch "
                        "(torch's fused AdamW inside DeepSpeed, compiles nothing) and/or deepspeed (DeepSpeed's "
                        "FusedAdam, built before its rows where nvcc or a prebuilt op is found, else skipped; "
                        "default torch)")
    p.add_argument("--ds-config", default="{}",
                   help="JSON merged into shardrun's deepspeed.config (not its optimizer: --optimizers chooses "
                        "that), e.g. '{\"zero_optimization\": {\"contiguous_gradients\": false}}'")
    p.add_argument("--wheels", type=Path,
                   help="install what shardrun's worker loop needs and this Python lacks from this folder "
                        "of wheels (pip --no-index), before anything imports it")
    p.add_argument("--deadline", type=float,
                   help="seconds from the start after which no measurement runs on and the table is printed")
    p.add_argument("--out", type=Path, help="write every number to this JSON file")
    p.add_argument("--record-from", type=Path, metavar="FILE.json",
                   help="append the record of a run made elsewhere (its --out file) and exit")
    p.add_argument("--child", choices=CHILD_KINDS, help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--hf-model", help=argparse.SUPPRESS)
    args = p.parse(argv)
    if args.record_from or args.child:
        return args
    if args.record and args.size in CPU_SIZES:
        p.error(f"--size {args.size} numbers say nothing about speed; record a real size")
    if "hf" in SIZES[args.size] and importlib.util.find_spec("transformers") is None:
        p.error(f"--size {args.size} is a transformers model: install shardrun's hf extra (transformers, "
                "accelerate)")
    try:
        ds_config = json.loads(args.ds_config)
    except ValueError as e:
        p.error(f"--ds-config is not JSON: {e}")
    if not isinstance(ds_config, dict):
        p.error("--ds-config must be a JSON object")
    if "optimizer" in ds_config:  # every row runs the implementation it names, nothing else
        p.error("--ds-config may not set DeepSpeed's optimizer: --optimizers torch,deepspeed chooses it")
    if any(args.lora) and "hf" not in SIZES[args.size]:
        p.error(f"--lora adapts a pretrained transformers model: --size {args.size} is the built-in GPT (use "
                "llama-1b or llama-tiny)")
    if any(args.lora) and importlib.util.find_spec("peft") is None:
        p.error("--lora needs peft: install shardrun's lora extra")
    return args


def lever(what: str, on: int):
    """An argparse type: comma-separated settings of a lever, each once: off (0), on (`on`), both (off and on),
    or a whole number of at least 1; what says which numbers, on an error."""
    def parse(text: str) -> list[int]:
        out: list[int] = []
        for x in (x.strip() for x in text.split(",") if x.strip()):
            if x in ("off", "on", "both"):
                out += {"off": [0], "on": [on], "both": [0, on]}[x]
            elif x.isdigit() and int(x) >= 1:
                out.append(int(x))
            else:
                raise argparse.ArgumentTypeError(f"{text!r}: off, on, both, or {what} (at least 1), e.g. off,on")
        return list(dict.fromkeys(out))

    return parse


def optimizers(text: str) -> list[str]:
    """An argparse type: comma-separated deepspeed.optimizer.implementation values, each once."""
    out = list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    if not out or any(x not in OPTIMIZERS for x in out):
        raise argparse.ArgumentTypeError(f"{text!r}: implementations are torch and deepspeed, e.g. torch,deepspeed")
    return out


# -- setting up a bare machine --------------------------------------------------------------------


def install_missing(wheels: Path) -> None:
    """pip-install, from a folder of wheels only, the worker loop's dependencies this Python lacks."""
    missing = missing_requirements()
    if not missing:
        print(f"wheels: nothing to install, {', '.join(IMPORTS.values())} are here", flush=True)
        return
    # The folder holds what the GPU image lacks (bench/gpu_bundle.sh): take each wheel whose
    # distribution is absent or older, without pip's resolver (which would also judge torch's own
    # needs against an index that is not there)
    take = [w for w in sorted(wheels.glob("*.whl")) if needs_wheel(w)]
    print(f"wheels: {', '.join(missing)} missing; installing {', '.join(w.name for w in take)}", flush=True)
    pip = [sys.executable, "-m", "pip", "install", "--isolated", "--quiet", "--no-index", "--no-deps",
           "--no-compile", "--disable-pip-version-check"]
    if subprocess.run([*pip, *map(str, take)]).returncode != 0:
        # an environment we may not write to: the wheels into a directory of our own, ahead of
        # site-packages for this process and its children
        site = Path(tempfile.mkdtemp(prefix="shardrun-gpu-site-"))
        print(f"wheels: installing them into {site} instead", flush=True)
        subprocess.run([*pip, "--target", str(site), *map(str, take)], check=True)
        sys.path.insert(0, str(site))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    importlib.invalidate_caches()
    still = missing_requirements()
    if still:
        sys.exit(f"bench: {', '.join(still)} still missing after installing from {wheels}; "
                 "run bench/gpu_bundle.sh to fill it")


def needs_wheel(wheel: Path) -> bool:
    """Whether this Python lacks the wheel's distribution or has an older version of it."""
    from packaging.utils import parse_wheel_filename
    from packaging.version import Version

    name, version, *_ = parse_wheel_filename(wheel.name)
    have = installed(name)
    return have is None or Version(have) < version


def missing_requirements() -> list[str]:
    """IMPORTS' distributions that are absent or outside pyproject.toml's ranges, as requirements."""
    from packaging.requirements import Requirement

    wanted = {Requirement(r).name.lower(): r for r in project_dependencies()}
    missing = []
    for module, dist in IMPORTS.items():
        req = Requirement(wanted.get(dist, dist))
        have = installed(dist)
        if importlib.util.find_spec(module) is None or have is None or have not in req.specifier:
            missing.append(str(req))
    return missing


def project_dependencies() -> list[str]:
    """pyproject.toml's [project] dependencies, the ranges shardrun is tested with."""
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


# -- the parent: data, then one child per measurement ----------------------------------------------


def run_all(args: argparse.Namespace, started: float) -> dict:
    """Peak, then bare and shardrun (eager and/or compiled, each ZeRO stage and optimizer), each in a fresh
    process; every number."""
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    size = dict(SIZES[args.size], micro_batch=args.micro_batch or SIZES[args.size]["micro_batch"])
    compiles = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "revision": git_revision(), "command": command(),
        "machine": machine(), "versions": versions(VERSIONS), "device": device, "size": args.size,
        "model": size, "steps": args.steps, "warmup_steps": args.warmup_steps, "window": window(args),
        "zero_stages": args.zero_stage, "optimizers": args.optimizers, "ds_config": json.loads(args.ds_config),
        "activation_checkpointing": args.activation_checkpointing, "lora": args.lora,
        "fused_adam": {"requested": "deepspeed" in args.optimizers}, "runs": [],
    }
    with tempfile.TemporaryDirectory(prefix="shardrun-gpu-bench-") as work:
        data = write_tokens(Path(work) / "data", size, args.warmup_steps + args.steps)
        if "hf" in size:  # the Llama's weights, written before any clock; every later child loads them
            args.hf_model = str(Path(work) / "llama")
            result["hf_model"] = child(args, "hf-model", device, data, started)
            if "error" in result["hf_model"]:
                result["peak"] = {"error": f"not run: the model was not written ({result['hf_model']['error']})"}
                summarize(result)
                return result
        result["peak"] = child(args, "peak", device, data, started)
        for compiled in compiles:  # eager first: its numbers matter most if --deadline cuts the rest short
            result["runs"].append(child(args, "bare", device, data, started, compiled=compiled))
            for optimizer in args.optimizers:  # torch first: the default, and it compiles nothing
                for stage in args.zero_stage:
                    for levers in lever_rows(args):  # none first: what the others are set against
                        what = {"loop": "shardrun", "compile": compiled, "zero_stage": stage, "optimizer": optimizer,
                                **levers}
                        if optimizer == "deepspeed":
                            if "ready" not in result["fused_adam"]:  # once, before the first FusedAdam row
                                result["fused_adam"].update(prepare_fused_adam(args, device, data, started))
                            if not result["fused_adam"]["ready"]:
                                result["runs"].append({**what, "skipped": result["fused_adam"]["reason"]})
                                continue
                        result["runs"].append(child(args, "shardrun", device, data, started, compiled=compiled,
                                                    stage=stage, optimizer=optimizer, levers=levers))
    summarize(result)
    return result


def lever_rows(args: argparse.Namespace) -> list[dict]:
    """The levers of each shardrun row, in order: every LoRA setting (full fine-tuning first), each with every
    activation checkpointing setting (off first, where asked)."""
    return [{"activation_checkpointing": every, "lora": rank} for rank in args.lora
            for every in args.activation_checkpointing]


def levers_of(r: dict) -> tuple[int, int]:
    """A row's levers: (every how many layers it checkpoints, its LoRA rank), 0 for off (also in JSON written
    before the levers were)."""
    return r.get("activation_checkpointing") or 0, r.get("lora") or 0


def lever_name(r: dict) -> str:
    """A row's levers in words: none, checkpointing, checkpointing every 2, LoRA r16, LoRA r16 + checkpointing."""
    every, rank = levers_of(r)
    parts = ([f"LoRA r{rank}"] if rank else []) + (
        ["checkpointing" + (f" every {every}" if every > 1 else "")] if every else [])
    return " + ".join(parts) or "none"


def prepare_fused_adam(args: argparse.Namespace, device: str, data: str, started: float) -> dict:
    """Whether DeepSpeed's FusedAdam can run here, built (or loaded) now in a process of its own, before any
    row's clock: {"ready": True, "how": ..., "build_s": ...} or {"ready": False, "reason": ...}, said in one line."""
    if device != "cuda":
        out = {"ready": False, "reason": "no GPU: DeepSpeed's FusedAdam is a CUDA op (on a CPU "
               "implementation=deepspeed builds CPU Adam with a C++ compiler, which this GPU benchmark leaves out)"}
    else:
        out = child(args, "fused-adam", device, data, started)
        if "error" in out:
            out = {"ready": False, "reason": f"its build did not finish ({out['error']}; its output is above)"}
        out = {k: v for k, v in out.items() if k not in ("loop", "compile", "zero_stage")}
    if out["ready"]:
        print(f"FusedAdam: ready in {out['build_s']:.0f} s, {out['how']}; built before any clock, "
              f"not in a timed window", flush=True)
    else:
        print(f"FusedAdam rows skipped: {out['reason']}", flush=True)
    return out


def window(args: argparse.Namespace) -> int:
    """Steps between device syncs in both loops: warm-up and timed steps are whole windows."""
    return math.gcd(args.warmup_steps, args.steps)


def row_name(kind: str, compiled: bool = False, stage: int | None = None, optimizer: str | None = None,
             levers: dict | None = None) -> str:
    if kind == "fused-adam":
        return "DeepSpeed FusedAdam: build before the clock"
    if kind == "hf-model":
        return "Llama: random weights on the device, written by save_pretrained before any clock"
    opt = f" {OPTIMIZERS[optimizer]}" if kind == "shardrun" and optimizer else ""
    on = f", {lever_name(levers)}" if levers and any(levers_of(levers)) else ""
    return f"{kind}{f' ZeRO {stage}' if stage is not None else ''}{opt}{' compiled' if compiled else ''}{on}"


def child(args: argparse.Namespace, kind: str, device: str, data: str, started: float, *,
          compiled: bool = False, stage: int | None = None, optimizer: str = "torch",
          levers: dict | None = None) -> dict:
    """One measurement in a fresh process (its own CUDA context and allocator); its result or its error."""
    every, rank = levers_of(levers or {})
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--data", data, "--device", device,
           "--size", args.size, "--steps", str(args.steps), "--warmup-steps", str(args.warmup_steps),
           "--zero-stage", str(stage or 0), "--ds-config", args.ds_config, "--compile", "on" if compiled else "off",
           "--optimizers", optimizer, "--activation-checkpointing", str(every or "off"), "--lora", str(rank or "off")]
    if args.micro_batch:
        cmd += ["--micro-batch", str(args.micro_batch)]
    if args.hf_model:
        cmd += ["--hf-model", args.hf_model]
    what = {"loop": kind, "compile": compiled, "zero_stage": stage}
    if kind in ("bare", "shardrun"):
        what.update(optimizer=optimizer, activation_checkpointing=every, lora=rank)
    name = row_name(kind, compiled, stage, optimizer, levers)
    left = None if args.deadline is None else args.deadline - (time.monotonic() - started)
    if left is not None and left < 10:
        print(f"bench: no time left for {name} (--deadline {args.deadline:g})")
        return {**what, "error": "skipped: --deadline reached"}
    print(f"\n== {name} ==", flush=True)
    # on the CPU, GPUs hidden: shardrun's engine module picks DeepSpeed's CPU accelerator
    env = deepspeed_cpu_env() if device == "cpu" else dict(os.environ)
    # at the deadline the child goes together with what it started (nvcc, ninja)
    line = None
    with running(cmd, env, left, stderr=subprocess.STDOUT) as (proc, cut):
        for out in proc.stdout:  # the child's output passes through as it comes
            if out.startswith(SAY):
                line = out[len(SAY):]
            else:
                sys.stdout.write(out)
        proc.wait()
    if proc.returncode != 0 or line is None:
        return {**what, "error": "cut off at --deadline" if cut.is_set() else f"exit code {proc.returncode}"}
    return {**what, **json.loads(line)}


# -- children ----------------------------------------------------------------------------------------


def measure_peak(args: argparse.Namespace) -> dict:
    """Best bf16 matmul rate over a few square sizes (median of timed repetitions after warm-up)."""
    import torch

    device = torch.device(args.device)
    rates = {}
    for n in PEAK_SIZES[device.type]:
        a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))  # never zeros
        c = torch.empty(n, n, device=device, dtype=torch.bfloat16)
        inner = max(1, int(1e13 / (2 * n**3))) if device.type == "cuda" else 2  # about 10 ms a repetition

        def products(a=a, b=b, c=c, inner=inner):
            for _ in range(inner):
                torch.mm(a, b, out=c)

        # 3 warm-up repetitions (clocks up, cuBLAS's choice made), then the median of 7
        times = [seconds(products, device) / inner for _ in range(3 + 7)][3:]
        rates[n] = 2 * n**3 / statistics.median(times)
    return {"device": describe_device(device), "matmul_flops": rates, "peak_flops": max(rates.values())}


def seconds(fn, device) -> float:
    """Time of fn's device work: CUDA events on a GPU, the host clock on a CPU."""
    import torch

    if device.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def describe_device(device) -> dict:
    import torch

    from shardrun.metrics.flops import device_peak

    if device.type != "cuda":
        return {"name": platform.processor() or "CPU", "datasheet_flops": None}
    props = torch.cuda.get_device_properties(device)
    return {"name": props.name, "sms": props.multi_processor_count, "memory_gib": props.total_memory / 2**30,
            "capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda, "driver": driver_version(),
            "datasheet_flops": device_peak(props.name, "bf16")}


def driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out[0] if out else None


def build_fused_adam(args: argparse.Namespace) -> dict:
    """Child: whether DeepSpeed's FusedAdam is prebuilt or can be built here (nvcc where DeepSpeed looks for it,
    ninja, DeepSpeed's compatibility check), and if so load it now, building it into the torch extensions
    folder that the FusedAdam rows' processes then load it from without building."""
    import shutil

    import torch.utils.cpp_extension as cpp
    from deepspeed.accelerator import get_accelerator
    from deepspeed.git_version_info import accelerator_name, installed_ops
    from deepspeed.ops.op_builder import FusedAdamBuilder

    prebuilt = bool(installed_ops.get("fused_adam")) and accelerator_name == get_accelerator()._name
    # DeepSpeed runs CUDA_HOME/bin/nvcc (torch's CUDA_HOME: $CUDA_HOME, else nvcc on PATH, else /usr/local/cuda)
    nvcc = os.path.join(cpp.CUDA_HOME, "bin", "nvcc") if cpp.CUDA_HOME else None
    nvcc = nvcc if nvcc and os.access(nvcc, os.X_OK) else None
    compatible = None
    if not prebuilt and nvcc:
        try:
            compatible = bool(FusedAdamBuilder().is_compatible(verbose=False))
        except Exception:  # DeepSpeed's own probe raises where it cannot run nvcc
            compatible = False
    plan = fused_adam_plan(prebuilt=prebuilt, nvcc=nvcc, on_path=shutil.which("nvcc"), compatible=compatible,
                           ninja=cpp.is_ninja_available())
    if not plan["ready"]:
        return plan
    t0 = time.monotonic()
    try:
        FusedAdamBuilder().load(verbose=False)
    except Exception as e:  # noqa: BLE001 - any failure is the row's reason to be skipped
        last = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        return {"ready": False, "reason": f"its build failed after {time.monotonic() - t0:.0f} s: {last[:300]}"}
    return {**plan, "build_s": time.monotonic() - t0}


def fused_adam_plan(*, prebuilt: bool, nvcc: str | None, on_path: str | None, compatible: bool | None,
                    ninja: bool) -> dict:
    """Whether FusedAdam can be loaded or built from what build_fused_adam found: ready and how, or the reason
    (one line) why its rows are skipped."""
    if prebuilt:
        return {"ready": True, "how": "prebuilt in this DeepSpeed (DS_BUILD_FUSED_ADAM=1), nothing to compile"}
    if not nvcc:
        where = f"nvcc on PATH ({on_path}) is not under torch's CUDA_HOME" if on_path else "no nvcc on PATH"
        return {"ready": False, "reason": f"cannot be built here: {where}, none in CUDA_HOME, and this DeepSpeed "
                "has no prebuilt fused_adam (DS_BUILD_FUSED_ADAM=1 at its install)"}
    if not compatible:
        return {"ready": False, "reason": f"cannot be built here: DeepSpeed finds its fused_adam op incompatible "
                f"with this torch and {nvcc}"}
    if not ninja:
        return {"ready": False, "reason": "cannot be built here: no ninja, which DeepSpeed's op build needs"}
    return {"ready": True, "how": f"built with {nvcc}"}


def model_spec(args: argparse.Namespace):
    from shardrun.config import ModelSpec

    return ModelSpec(**model_fields(args))


def model_fields(args: argparse.Namespace) -> dict:
    """The spec's model section: the built-in GPT at this size, or the Llama written into args.hf_model, loaded in
    bf16 with torch's SDPA attention."""
    size = SIZES[args.size]
    if "hf" in size:
        return {"hf": {"path": args.hf_model, "dtype": "bf16", "attn_implementation": "sdpa"}}
    return {"type": "gpt", **gpt(size, size["vocab_size"])}


def lever_fields(args: argparse.Namespace) -> dict:
    """The spec's model fields for a shardrun row's compile setting and levers (its child gets one of each)."""
    every, rank = args.activation_checkpointing[0], args.lora[0]
    return {"compile": args.compile == "on", "activation_checkpointing": True if every == 1 else every,
            **({"lora": lora_fields(rank)} if rank else {})}


def lora_fields(rank: int) -> dict:
    """model.lora at this rank: alpha twice the rank, no dropout, every linear layer but the head."""
    return {"r": rank, "alpha": 2.0 * rank, "dropout": 0.0, "target_modules": "all-linear"}


def write_hf_model(args: argparse.Namespace) -> dict:
    """Child: the size's Llama with random weights (seed SEED), made on the device in bf16 and written by
    save_pretrained into args.hf_model."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    size = SIZES[args.size]
    t0 = time.monotonic()
    config = LlamaConfig(vocab_size=size["vocab_size"], tie_word_embeddings=False, **size["hf"])
    torch.manual_seed(SEED)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    made = time.monotonic() - t0
    model.save_pretrained(args.hf_model)
    weights = sum(f.stat().st_size for f in Path(args.hf_model).glob("*.safetensors"))
    return {"params": params, "bytes": weights, "make_s": made, "write_s": time.monotonic() - t0 - made}


def build_model(args: argparse.Namespace):
    """The bare loop's model, seeded as shardrun's Trainer seeds it: the built-in GPT, or the Llama loaded by
    shardrun's models.hf.build (from_pretrained) with the seconds it took."""
    import torch

    from shardrun.trainer import models

    torch.manual_seed(SEED)  # the weights shardrun's Trainer builds
    spec = model_spec(args)
    if spec.hf is None:
        return models.build(spec), None
    import transformers.models.llama.modeling_llama  # noqa: F401 - imported before the clock, as in shardrun's row

    from shardrun.trainer.models import hf

    t0 = time.monotonic()
    model = hf.build(spec.hf, args.hf_model)
    return model, time.monotonic() - t0


def param_count(model) -> int:
    """Every parameter, embeddings too (ZeRO-3's partitioned ones whole)."""
    return sum(int(getattr(p, "ds_numel", 0) or p.numel()) for p in model.parameters())


def run_bare(args: argparse.Namespace) -> dict:
    """The GPT in plain PyTorch, in DeepSpeed's bf16 recipe: bf16 weights and grads, fp32 master weights."""
    import torch

    from shardrun.metrics import flops

    device, size = torch.device(args.device), SIZES[args.size]
    mb = args.micro_batch or size["micro_batch"]
    model, from_pretrained_s = build_model(args)
    flops_per_token = flops.flops_per_token(model, size["seq_len"])
    t0 = time.monotonic()
    model.to(device=device, dtype=torch.bfloat16)
    if device.type == "cuda":
        torch.cuda.synchronize()
    load = {} if from_pretrained_s is None else {"load": {"from_pretrained_s": from_pretrained_s,
                                                          "to_device_s": time.monotonic() - t0}}
    if args.compile == "on":
        model.compile()  # what DeepSpeed's engine.compile() does to its module
    params = list(model.parameters())
    master = [p.detach().float() for p in params]
    for m in master:
        m.grad = torch.zeros_like(m)
    opt = torch.optim.AdamW(master, lr=size["lr"], betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1,
                            fused=device.type == "cuda")
    # shardrun's schedule in this job: DeepSpeed's WarmupLR over its shortest warm-up (2 steps: lr 0,
    # half, full), then constant
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s / 2))
    batches = pinned_batches(args.data, mb, device)
    clock = StepClock(device, skip=args.warmup_steps)

    def step(batch) -> torch.Tensor:
        inputs, targets = (t.to(device, non_blocking=True) for t in batch)
        loss = model(inputs, targets)
        loss.backward()
        clock.start()  # what DeepSpeed's engine.step() does: grads to the masters, clip, step, back, zero
        with torch.no_grad():
            torch._foreach_copy_([m.grad for m in master], [p.grad for p in params])
            torch.nn.utils.clip_grad_norm_(master, GRAD_CLIP, foreach=True)
            opt.step()
            sched.step()
            torch._foreach_copy_(params, master)
        model.zero_grad(set_to_none=True)
        clock.stop()
        return loss.detach().float()

    memory = DeviceMemory(device)
    windows = timed_windows(step, batches, args, device, mb * size["seq_len"], on_timed=memory.reset)
    return {"flops_per_token": flops_per_token, "params": param_count(model),
            "windows": windows, "optimizer_ms": clock.ms(), "peak_memory_bytes": memory.peak(),
            **describe_optimizer(opt), **load}


class StepClock:
    """The device time of one part of each step after the first `skip` (the warm-up), without a host sync: CUDA
    events on a GPU (a part that waits on the host shows as the GPU's idle time), the host clock on a CPU."""

    def __init__(self, device, *, skip: int):
        self.cuda, self.skip, self.calls, self.spans, self.begun = device.type == "cuda", skip, 0, [], None

    def start(self) -> None:
        import torch

        self.calls += 1
        self.begun = None
        if self.calls > self.skip:
            self.begun = torch.cuda.Event(enable_timing=True) if self.cuda else time.perf_counter()
            if self.cuda:
                self.begun.record()

    def stop(self) -> None:
        import torch

        if self.begun is None:
            return
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.spans.append((self.begun, end))
        else:
            self.spans.append(time.perf_counter() - self.begun)
        self.begun = None

    def ms(self) -> float | None:
        """Mean milliseconds of the timed steps' part (waits for the device)."""
        if not self.spans:
            return None
        if self.cuda:
            self.spans[-1][1].synchronize()
            return statistics.fmean(a.elapsed_time(b) for a, b in self.spans)
        return 1e3 * statistics.fmean(self.spans)


class DeviceMemory:
    """Peak allocated CUDA memory from reset() on; None on a CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def reset(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int | None:
        if not self.cuda:
            return None
        import torch

        return torch.cuda.max_memory_allocated()


def describe_optimizer(optimizer, wrapper=None) -> dict:
    """The optimizer that updates the fp32 weights, whether torch's is fused, and DeepSpeed's wrapper around it."""
    kind = type(optimizer)
    return {"optimizer_class": f"{kind.__module__}.{kind.__qualname__}",
            "fused": getattr(optimizer, "defaults", {}).get("fused"),
            "wrapper": None if wrapper is None or wrapper is optimizer else type(wrapper).__name__}


def pinned_batches(data: str, mb: int, device) -> list:
    """The shards' rows in order as (inputs, targets) int64 micro-batches (as shardrun's stream gives them),
    pinned when the GPU reads them."""
    import pyarrow.parquet as pq
    import torch

    col = pq.read_table(data, columns=["tokens"])["tokens"].combine_chunks()
    rows = torch.from_numpy(col.values.to_numpy().astype("int64").reshape(len(col), col.type.list_size))
    out = []
    for i in range(len(rows) // mb):
        batch = rows[i * mb:(i + 1) * mb]
        pair = (batch[:, :-1].contiguous(), batch[:, 1:].contiguous())
        out.append(tuple(t.pin_memory() for t in pair) if device.type == "cuda" else pair)
    return out


def timed_windows(step, batches: list, args: argparse.Namespace, device, tokens_per_step: int,
                  on_timed=lambda: None) -> list[dict]:
    """Run warm-up + timed steps; per window (a device sync at its end, like shardrun's log step) its time.
    on_timed is called at the sync that starts the timed steps."""
    import torch

    w, total = window(args), args.warmup_steps + args.steps
    windows, loss_sum, last = [], torch.zeros((), device=device), 0
    t0 = time.perf_counter()
    for step_no in range(1, total + 1):
        loss_sum += step(batches[step_no - 1])
        if step_no == 1 or step_no % w == 0:  # where shardrun's loop logs (log_every = w)
            n = step_no - last
            loss = (loss_sum / n).item()  # waits for the device
            windows.append({"step": step_no, "steps": n, "seconds": time.perf_counter() - t0,
                            "tokens": n * tokens_per_step, "loss": loss})
            loss_sum.zero_()
            last = step_no
            if step_no == args.warmup_steps:
                on_timed()
            t0 = time.perf_counter()
    return windows


def run_shardrun(args: argparse.Namespace) -> dict:
    """shardrun's worker loop without Ray (run_local, as `shardrun train` does), read back from metrics.jsonl."""
    import torch

    from shardrun.config import parse
    from shardrun.driver.local import run_local
    from shardrun.metrics import flops
    from shardrun.trainer import models

    size = SIZES[args.size]
    mb = args.micro_batch or size["micro_batch"]
    device = torch.device(args.device)
    seen: dict = {}
    on_startup("engine ready", lambda record: instrument(record.engine, args, device, seen))
    if "hf" in size:
        time_hf_load(seen)
    with tempfile.TemporaryDirectory(prefix="shardrun-gpu-run-") as runs:
        spec = parse(job_spec(args, size, mb, runs, use_gpu=device.type == "cuda"), source="bench/gpu.py")
        run_local(spec)
        records = [json.loads(line) for line in Path(spec.run_dir, "metrics.jsonl").read_text().splitlines()]
    if "clock" not in seen or "mismatch" in seen:
        raise RuntimeError(seen.get("mismatch", "shardrun's worker never logged \"engine ready\""))
    if "hf" in size:  # counted on the engine's module as it was ready (ZeRO 0-2: whole on this rank)
        per_token, params = seen["flops_per_token"], seen["params"]
    else:
        with torch.device("meta"):
            model = models.build(model_spec(args))
        per_token, params = flops.flops_per_token(model, size["seq_len"]), model.num_params(non_embedding=False)
    windows, prev = [], {"step": 0, "tokens": 0}
    for r in records:
        n = r["step"] - prev["step"]
        windows.append({"step": r["step"], "steps": n, "seconds": r["step_time"] * n,
                        "tokens": r["tokens"] - prev["tokens"], "loss": r["loss"],
                        "data_wait_fraction": r["data_wait_fraction"]})
        prev = r
    out = {"windows": windows, "flops_per_token": per_token, "params": params, "optimizer_ms": seen["clock"].ms(),
           "peak_memory_bytes": seen.get("peak_memory_bytes"), "trained_params": seen["trained_params"],
           **{k: seen[k] for k in ("attention_forwards", "layers", "eval_modules") if k in seen},
           **seen["optimizer"]}
    if "hf" in size:
        out["load"] = {k: seen[k] for k in ("from_pretrained_s", "to_engine_ready_s")}
    return out


def time_hf_load(seen: dict) -> None:
    """Time the Llama's load in shardrun's worker: its from_pretrained (models.hf.build), and from asking for its
    folder to "engine ready" (from_pretrained, then deepspeed.initialize moving it to the device), in seen."""
    import transformers.models.llama.modeling_llama  # noqa: F401 - imported before the clock, as in the bare row

    from shardrun.trainer.models import hf

    folder, build = hf.local_folder, hf.build

    def local_folder(*a, **kw):
        seen.setdefault("t_folder", time.monotonic())
        return folder(*a, **kw)

    def timed_build(*a, **kw):
        t0 = time.monotonic()
        model = build(*a, **kw)
        seen.setdefault("from_pretrained_s", time.monotonic() - t0)
        return model

    hf.local_folder, hf.build = local_folder, timed_build  # restore._build calls them through the module


def instrument(engine, args: argparse.Namespace, device, seen: dict) -> None:
    """At "engine ready": check that DeepSpeed runs the optimizer this row asks for and compiled the model as asked
    (model.compile), count the trained parameters, and wrap engine.step() (the optimizer step, once a step) in a
    StepClock; peak memory from the last warm-up step's end to the last step's; the first step's attention
    forwards (eager rows)."""
    import torch

    from shardrun.metrics import flops

    if "t_folder" in seen:  # a Hugging Face model: its load ends here
        seen["to_engine_ready_s"] = time.monotonic() - seen["t_folder"]
        seen["flops_per_token"] = flops.flops_per_token(engine.module, SIZES[args.size]["seq_len"])
        seen["params"] = param_count(engine.module)
    seen["optimizer"] = describe_optimizer(engine.basic_optimizer, engine.optimizer)
    wanted, built = args.optimizers[0], type(engine.basic_optimizer)
    if not (built.__name__ == "FusedAdam" if wanted == "deepspeed" else issubclass(built, torch.optim.AdamW)):
        # said after the run: an exception here, in a logging handler, would be the worker's failure
        seen["mismatch"] = f"implementation={wanted}, yet DeepSpeed built {seen['optimizer']['optimizer_class']}"
    if bool(getattr(engine, "is_compiled", False)) != (args.compile == "on"):  # model.compile, as asked
        seen["mismatch"] = f"model.compile={args.compile == 'on'}, yet engine.is_compiled is {engine.is_compiled}"
    seen["trained_params"] = sum(int(getattr(p, "ds_numel", 0) or p.numel())
                                 for p in engine.module.parameters() if p.requires_grad)
    clock, memory = StepClock(device, skip=args.warmup_steps), DeviceMemory(device)
    seen["clock"], total, step, calls = clock, args.warmup_steps + args.steps, engine.step, 0
    # not in a compiled module: hooks added and then removed would make torch.compile compile it twice more
    counter = AttentionCounter(engine.module) if args.compile == "off" else None

    def timed_step(*a, **kw):
        nonlocal calls
        if calls == 0 and counter is not None:  # the first forward and backward have run
            seen.update(counter.done(engine.module))
        clock.start()
        out = step(*a, **kw)
        clock.stop()
        calls += 1
        if calls == args.warmup_steps:
            memory.reset()
        elif calls == total:  # before the checkpoint save
            seen["peak_memory_bytes"] = memory.peak()
        return out

    engine.step = timed_step


class AttentionCounter:
    """Counts the attention modules' forwards until done(): one per layer in a forward and backward, two where
    activation checkpointing recomputes the layer in the backward."""

    def __init__(self, module):
        self.forwards = 0
        self.hooks = [m.register_forward_hook(self.count) for m in module.modules()
                      if type(m).__name__.endswith("Attention")]

    def count(self, *_) -> None:
        self.forwards += 1

    def done(self, module) -> dict:
        """The count, the layers, and how many modules were in eval mode (transformers checkpoints only in
        training mode); the hooks removed."""
        for hook in self.hooks:
            hook.remove()
        return {"attention_forwards": self.forwards, "layers": len(self.hooks),
                "eval_modules": sum(not m.training for m in module.modules())}


def job_spec(args: argparse.Namespace, size: dict, mb: int, runs: str, *, use_gpu: bool) -> dict:
    """The bench's job: the model at this size, bf16, one worker; no checkpoint until after the last step."""
    total = args.warmup_steps + args.steps
    return {
        "name": "gpu-bench",
        "model": {**model_fields(args), **lever_fields(args)},
        "data": {"paths": [args.data], "seq_len": size["seq_len"], "seed": SEED},
        "deepspeed": {"zero_stage": args.zero_stage[0], "precision": "bf16", "micro_batch_size": mb,
                      "grad_clip": GRAD_CLIP,
                      # the implementation always named: torch unless the row is DeepSpeed's FusedAdam's
                      "optimizer": {"type": "adamw", "lr": size["lr"], "betas": [0.9, 0.95], "eps": 1e-8,
                                    "weight_decay": 0.1, "implementation": args.optimizers[0]},
                      "schedule": {"warmup_steps": 1, "decay": "constant"},
                      "config": json.loads(args.ds_config)},
        "scaling": {"num_workers": 1, "use_gpu": use_gpu},
        "checkpoint": {"storage": runs, "every_steps": total, "keep": 1},
        "metrics": {"enabled": True, "host": "127.0.0.1", "targets_dir": str(Path(runs) / "targets")},
        "run": {"max_steps": total, "seed": SEED, "log_every": window(args)},
    }


CHILDREN = {"peak": measure_peak, "bare": run_bare, "shardrun": run_shardrun, "fused-adam": build_fused_adam,
            "hf-model": write_hf_model}


# -- results -----------------------------------------------------------------------------------------


def measured(r: dict) -> bool:
    """Whether a row has numbers: it neither failed nor was skipped."""
    return "error" not in r and "skipped" not in r


def summarize(result: dict) -> None:
    """Timed tokens/s, MFU against the datasheet and the measured peak, shardrun / bare, the optimizer step
    against the bare loop's, ZeRO 0 against ZeRO 1; in place."""
    peak = result["peak"]
    datasheet, measured_peak = peak.get("device", {}).get("datasheet_flops"), peak.get("peak_flops")
    for r in result["runs"]:
        if not measured(r):
            continue
        r.update(timing(r["windows"], result["warmup_steps"]))
        achieved = r["tokens_per_s"] * r["flops_per_token"]
        r["mfu_datasheet"] = achieved / datasheet if datasheet else None
        r["mfu_measured"] = achieved / measured_peak if measured_peak else None
    bare = {r["compile"]: r for r in result["runs"] if r["loop"] == "bare" and measured(r)}
    for r in result["runs"]:  # the bare loop has no levers: only rows without any are set against it
        if r["loop"] == "shardrun" and measured(r) and r["compile"] in bare and not any(levers_of(r)):
            b = bare[r["compile"]]
            r["vs_bare"] = r["tokens_per_s"] / b["tokens_per_s"]
            if r.get("optimizer_ms") is not None and b.get("optimizer_ms") is not None:
                r["optimizer_ms_vs_bare"] = r["optimizer_ms"] - b["optimizer_ms"]
    compare_levers(result)
    result["zero_comparison"] = compare_zero(result)
    result["zero_conclusion"] = zero_conclusion(result["zero_comparison"], result["device"])
    result["findings"] = findings(result)


def compare_levers(result: dict) -> None:
    """Each shardrun row with levers against the row without any of the same ZeRO stage, optimizer and compile
    setting: its tokens/s over that row's, and the peak memory it saves (GiB; None without CUDA); in place."""
    plain = {(r["compile"], r["optimizer"], r["zero_stage"]): r for r in result["runs"]
             if r["loop"] == "shardrun" and measured(r) and not any(levers_of(r))}
    for r in result["runs"]:
        base = plain.get((r["compile"], r["optimizer"], r["zero_stage"]))
        if r["loop"] != "shardrun" or not measured(r) or not any(levers_of(r)) or base is None:
            continue
        saved = None
        if r.get("peak_memory_bytes") is not None and base.get("peak_memory_bytes") is not None:
            saved = base["peak_memory_bytes"] - r["peak_memory_bytes"]
        ratio = None if saved is None else r["peak_memory_bytes"] / base["peak_memory_bytes"]
        r["vs_no_levers"] = {"tokens_per_s": r["tokens_per_s"] / base["tokens_per_s"], "memory_saved_bytes": saved,
                             "memory_ratio": ratio}


ZERO_FIELDS = ("tokens_per_s", "mfu_datasheet", "mfu_measured", "step_ms", "optimizer_ms", "peak_memory_bytes",
               "wrapper")


def compare_zero(result: dict) -> list[dict]:
    """shardrun at ZeRO 0 and at ZeRO 1 side by side, for each compile setting and optimizer that ran both."""
    by: dict = {}
    for r in result["runs"]:
        if r["loop"] == "shardrun" and measured(r):
            by.setdefault((r["compile"], r["optimizer"], levers_of(r)), {})[r["zero_stage"]] = r
    out = []
    for (compiled, optimizer, _), stages in by.items():
        if 0 in stages and 1 in stages:
            z0, z1 = stages[0], stages[1]
            out.append({"compile": compiled, "optimizer": optimizer, "levers": lever_name(z0),
                        "zero0": {k: z0.get(k) for k in ZERO_FIELDS}, "zero1": {k: z1.get(k) for k in ZERO_FIELDS},
                        "zero1_vs_zero0": z1["tokens_per_s"] / z0["tokens_per_s"]})
    return out


def zero_conclusion(comparisons: list[dict], device: str = "cuda") -> str | None:
    """One line: which of ZeRO 0 and ZeRO 1 is faster for bf16 on one GPU, over every pair that ran both."""
    if not comparisons:
        return None
    ratios = [c["zero1_vs_zero0"] for c in comparisons]
    pairs = ", ".join(f"{'compiled' if c['compile'] else 'eager'} {OPTIMIZERS[c['optimizer']]}"
                      f"{levers_words(c.get('levers'))} {c['zero1_vs_zero0']:.3f}" for c in comparisons)
    where = "one GPU" if device == "cuda" else "the CPU"
    head = f"ZeRO 0 vs ZeRO 1 (bf16, {where}; ZeRO 1 / ZeRO 0 tokens/s: {pairs}): "
    if all(x > 1.01 for x in ratios):
        return head + "ZeRO 1 is faster, use ZeRO 1"
    if all(x < 0.99 for x in ratios):
        return head + "ZeRO 0 is faster, use ZeRO 0"
    if all(0.99 <= x <= 1.01 for x in ratios):
        return head + "within 1% of each other, neither is faster"
    return head + "neither is faster in every pair"


def levers_words(name: str | None) -> str:
    """ ", with LoRA r16" for a comparison's levers; nothing for none."""
    return f", with {name}" if name and name != "none" else ""


def timing(windows: list[dict], warmup_steps: int) -> dict:
    """A loop's numbers over the windows that start after the warm-up steps."""
    timed = [w for w in windows if w["step"] - w["steps"] >= warmup_steps]
    seconds = sum(w["seconds"] for w in timed)
    rates = [w["tokens"] / w["seconds"] for w in timed]
    out = {"tokens": sum(w["tokens"] for w in windows), "timed_tokens": sum(w["tokens"] for w in timed),
           "timed_steps": sum(w["steps"] for w in timed),
           "window_tokens_per_s": {"min": min(rates), "median": statistics.median(rates), "max": max(rates)},
           "first_loss": windows[0]["loss"], "last_loss": windows[-1]["loss"]}
    out["tokens_per_s"] = out["timed_tokens"] / seconds
    out["step_ms"] = 1e3 * seconds / out["timed_steps"]
    if all("data_wait_fraction" in w for w in timed):  # shardrun's: time spent waiting for batches
        out["data_wait_fraction"] = sum(w["data_wait_fraction"] * w["seconds"] for w in timed) / seconds
    return out


def how(r: dict) -> str:
    return (f"ZeRO {r['zero_stage']}, {'compiled' if r['compile'] else 'eager'}, {OPTIMIZERS[r['optimizer']]}"
            f"{levers_words(lever_name(r))}")


def findings(result: dict) -> list[str]:
    """The issue's goals, checked: MFU at least 45% (datasheet peak), shardrun within 3% of the bare loop; the
    optimizer step's cost beyond the bare loop's; ZeRO 0 against ZeRO 1."""
    out = []
    for r in result["runs"]:
        if r["loop"] != "shardrun" or not measured(r):
            continue
        if any(levers_of(r)):
            out += lever_findings(r)
            continue
        if r["mfu_datasheet"] is not None:
            verdict = "meets" if r["mfu_datasheet"] >= GOAL_MFU else "misses"
            out.append(f"shardrun ({how(r)}) MFU = {r['mfu_datasheet']:.1%} of the datasheet peak: {verdict} "
                       f"the goal of {GOAL_MFU:.0%}")
        if "vs_bare" in r:
            verdict = "meets" if r["vs_bare"] >= GOAL_RATIO else "misses"
            out.append(f"shardrun / bare ({how(r)}) = {r['vs_bare']:.3f}: {verdict} the goal of "
                       f"{GOAL_RATIO:.2f} (within 3%)")
        if "optimizer_ms_vs_bare" in r:
            out.append(f"optimizer step, shardrun ({how(r)}): {r['optimizer_ms']:.2f} ms, the bare loop's "
                       f"{r['optimizer_ms'] - r['optimizer_ms_vs_bare']:.2f} ms ({r['optimizer_ms_vs_bare']:+.2f} ms): "
                       f"a difference that is DeepSpeed's own ({r.get('wrapper') or 'its engine'}, ZeRO's "
                       "bookkeeping), not shardrun's loop")
    if result.get("zero_conclusion"):
        out.append(result["zero_conclusion"])
    return out


def lever_findings(r: dict) -> list[str]:
    """A row with levers: the memory it saved and the tokens/s it lost against the same row without levers, and
    whether activation checkpointing, if asked for, recomputed anything."""
    out = []
    every, _ = levers_of(r)
    if every and r.get("attention_forwards") is not None and r["attention_forwards"] <= r["layers"]:
        out.append(f"shardrun ({how(r)}): no layer was recomputed ({r['attention_forwards']} attention "
                   f"forwards in the first step for {r['layers']} layers; {r['eval_modules']} modules in eval "
                   "mode, where transformers does not checkpoint): the row ran without activation checkpointing")
    v = r.get("vs_no_levers")
    if v is None:
        return out
    memory = "peak memory not measured (no CUDA)" if v["memory_saved_bytes"] is None else (
        f"{'saves' if v['memory_saved_bytes'] >= 0 else 'adds'} {abs(v['memory_saved_bytes']) / GIB:.2f} GiB of "
        f"peak memory ({v['memory_ratio'] - 1:+.0%})")
    out.append(f"shardrun ({how(r)}) against the same row without levers: {memory}, tokens/s "
               f"{v['tokens_per_s'] - 1:+.1%}")
    return out


def format_peak(result: dict) -> str:
    peak = result["peak"]
    if "error" in peak:
        return f"bf16 matmul peak: not measured ({peak['error']})"
    rates = ", ".join(f"{n}^3 {f / 1e12:.3g}" for n, f in peak["matmul_flops"].items())
    sheet = peak["device"].get("datasheet_flops")
    sheet = f"; datasheet {sheet / 1e12:.0f} TFLOP/s" if sheet else "; no datasheet figure for this device"
    return f"bf16 matmul peak: measured {peak['peak_flops'] / 1e12:.3g} TFLOP/s ({rates}){sheet}"


def pct(x) -> str:
    return f"{x:.1%}" if x is not None else "-"


def gib(x) -> str:
    return f"{x / GIB:.2f}" if x is not None else "-"


def ms(x) -> str:
    return f"{x:.2f}" if x is not None else "-"


def optimizer_cell(r: dict) -> str:
    """The optimizer a row ran: its class (fused or not), in DeepSpeed's wrapper if any."""
    if "optimizer_class" not in r:
        return OPTIMIZERS.get(r.get("optimizer"), "-")
    name = r["optimizer_class"].rsplit(".", 1)[-1] + (" (fused)" if r.get("fused") else "")
    return name + (f" in {r['wrapper']}" if r.get("wrapper") else "")


def format_table(result: dict) -> str:
    rows = []
    for r in result["runs"]:
        head = [r["loop"], "-" if r["zero_stage"] is None else str(r["zero_stage"]), optimizer_cell(r),
                "yes" if r["compile"] else "no"]
        if not measured(r):
            why = r["error"] if "error" in r else "skipped (see below)"
            rows.append([*head, why, *[""] * 9, lever_name(r)])
            continue
        w = r["window_tokens_per_s"]
        rows.append([*head, f"{r['tokens_per_s']:,.0f}", f"{w['min']:,.0f} - {w['max']:,.0f}", f"{r['step_ms']:.1f}",
                     ms(r.get("optimizer_ms")), pct(r.get("data_wait_fraction")), pct(r["mfu_datasheet"]),
                     pct(r["mfu_measured"]), gib(r.get("peak_memory_bytes")),
                     f"{r['vs_bare']:.3f}" if "vs_bare" in r else "-", f"{r['first_loss']:.2f} → {r['last_loss']:.2f}",
                     lever_name(r)])
    return table(["loop", "ZeRO", "optimizer", "compile", "tokens/s", "windows min - max", "step (ms)",
                  "optimizer step (ms)", "data wait", "MFU (datasheet)", "MFU (measured peak)", "peak memory (GiB)",
                  "vs bare", "loss first → last", "levers"], rows, align="lrllrrrrrrrrrrl")


def format_levers_table(result: dict) -> str | None:
    """shardrun's rows side by side per ZeRO stage, optimizer and compile setting, when any has levers: peak memory
    and what each lever saves, tokens/s and what it loses, against the row without levers."""
    rows = [r for r in result["runs"] if r["loop"] == "shardrun" and measured(r)]
    if not any(any(levers_of(r)) for r in rows):
        return None
    body = []
    for r in rows:
        v = r.get("vs_no_levers")
        saved = v and v["memory_saved_bytes"]
        counted = "-" if r.get("attention_forwards") is None else f"{r['attention_forwards']} ({r['layers']} layers)"
        body.append([str(r["zero_stage"]), OPTIMIZERS[r["optimizer"]], "yes" if r["compile"] else "no", lever_name(r),
                     trained_cell(r), f"{r['tokens_per_s']:,.0f}",
                     f"{v['tokens_per_s'] - 1:+.1%}" if v else "-", f"{r['step_ms']:.1f}",
                     gib(r.get("peak_memory_bytes")), "-" if saved is None else f"{saved / GIB:.2f}",
                     f"{v['memory_ratio'] - 1:+.0%}" if v and v["memory_ratio"] is not None else "-",
                     pct(r["mfu_datasheet"] if r["mfu_datasheet"] is not None else r["mfu_measured"]), counted])
    mfu = "MFU (datasheet)" if result["peak"].get("device", {}).get("datasheet_flops") else "MFU (measured peak)"
    return table(["ZeRO", "optimizer", "compile", "levers", "trained parameters", "tokens/s", "tokens/s vs no levers",
                  "step (ms)", "peak memory (GiB)", "memory saved (GiB)", "peak memory vs no levers", mfu,
                  "attention forwards in the first step"], body, align="lllllr")


def trained_cell(r: dict) -> str:
    if r.get("trained_params") is None:
        return "-"
    return f"{r['trained_params'] / 1e6:.3g}M ({r['trained_params'] / r['params']:.1%})"


def format_zero_table(result: dict) -> str | None:
    """ZeRO 0 and ZeRO 1 side by side, a row per compile setting and optimizer that ran both."""
    comparisons = result.get("zero_comparison") or []
    if not comparisons:
        return None
    sheet = result["peak"].get("device", {}).get("datasheet_flops")
    mfu_key, mfu_name = ("mfu_datasheet", "MFU (datasheet)") if sheet else ("mfu_measured", "MFU (measured peak)")
    rows = []
    for c in comparisons:
        z0, z1 = c["zero0"], c["zero1"]
        rows.append(["yes" if c["compile"] else "no", OPTIMIZERS[c["optimizer"]],
                     f"{z0['tokens_per_s']:,.0f}", f"{z1['tokens_per_s']:,.0f}", f"{c['zero1_vs_zero0']:.3f}",
                     pct(z0[mfu_key]), pct(z1[mfu_key]), f"{z0['step_ms']:.1f}", f"{z1['step_ms']:.1f}",
                     ms(z0["optimizer_ms"]), ms(z1["optimizer_ms"]), gib(z0["peak_memory_bytes"]),
                     gib(z1["peak_memory_bytes"]), z0["wrapper"] or "-", z1["wrapper"] or "-", c.get("levers", "none")])
    return table(["compile", "optimizer", "tokens/s ZeRO 0", "tokens/s ZeRO 1", "ZeRO 1 / ZeRO 0",
                  f"{mfu_name} ZeRO 0", f"{mfu_name} ZeRO 1", "step (ms) ZeRO 0", "step (ms) ZeRO 1",
                  "optimizer step (ms) ZeRO 0", "optimizer step (ms) ZeRO 1", "peak memory (GiB) ZeRO 0",
                  "peak memory (GiB) ZeRO 1", "wrapper ZeRO 0", "wrapper ZeRO 1", "levers"], rows,
                 align="llrrrrrrrrrrrlll")


def describe_setup(result: dict) -> str:
    m = result["model"]
    ran = next((r for r in result["runs"] if measured(r)), None)
    counts = f"; {ran['params'] / 1e6:.3g}M parameters, {ran['flops_per_token'] / 1e6:.3g} MFLOPs/token" if ran else ""
    config = f", config {json.dumps(result['ds_config'])}" if result["ds_config"] else ""
    if "hf" in m:
        h = m["hf"]
        model = (f"transformers Llama {result['size']} ({h['num_hidden_layers']} layers x {h['hidden_size']}, "
                 f"{h['num_attention_heads']} heads, {h['num_key_value_heads']} KV heads, "
                 f"MLP {h['intermediate_size']}, "
                 f"vocab {m['vocab_size']}, seq {m['seq_len']}{counts}; random weights written by save_pretrained "
                 "in bf16 before any clock, loaded by from_pretrained in bf16 with SDPA attention)")
    else:
        model = (f"GPT {result['size']} ({m['n_layer']} layers x {m['n_embd']}, {m['n_head']} heads, vocab "
                 f"{m['vocab_size']}, seq {m['seq_len']}{counts})")
    return (f"{model}, micro-batch {m['micro_batch']}, bf16; shardrun on DeepSpeed{config}{levers_setup(result)}; "
            f"{result['warmup_steps']} warm-up steps, {result['steps']} timed, a device sync every {result['window']}")


def levers_setup(result: dict) -> str:
    """The setup's words on the levers shardrun's rows ran with, if any."""
    every = [n for n in result.get("activation_checkpointing", [0]) if n]
    ranks = [n for n in result.get("lora", [0]) if n]
    parts = ([f"model.activation_checkpointing {' and '.join('true' if n == 1 else f'every {n}' for n in every)}"]
             if every else []) + ([f"model.lora rank {' and '.join(map(str, ranks))} (alpha twice the rank, "
                                   "all-linear, no dropout)"] if ranks else [])
    return f"; levers on shardrun's rows: {', '.join(parts)}" if parts else ""


def format_load_table(result: dict) -> str | None:
    """A Hugging Face model's load, per row: from_pretrained, then to the device (bare) or on to DeepSpeed's
    engine ready (shardrun: from asking for the folder, so from_pretrained is inside it)."""
    rows = []
    for r in result["runs"]:
        if measured(r) and "load" in r:
            load = r["load"]
            rows.append([r["loop"], "-" if r["zero_stage"] is None else str(r["zero_stage"]),
                         "yes" if r["compile"] else "no", f"{load['from_pretrained_s']:.2f}",
                         ms(load.get("to_device_s")), ms(load.get("to_engine_ready_s")), lever_name(r)])
    if not rows:
        return None
    return table(["loop", "ZeRO", "compile", "from_pretrained (s)", "then .to(device) (s)",
                  "from_pretrained to engine ready (s)", "levers"], rows, align="llrrrrl")


def hf_model_line(result: dict) -> str | None:
    w = result.get("hf_model")
    if not w:
        return None
    if "error" in w:
        return f"model: not written ({w['error']})"
    where = "GPU" if result["device"] == "cuda" else "CPU"
    return (f"model: {w['params'] / 1e6:,.1f}M parameters with random weights, made on the {where} in "
            f"{w['make_s']:.1f} s and written by save_pretrained ({w['bytes'] / 1e9:.2f} GB of safetensors) in "
            f"{w['write_s']:.1f} s, before any clock")


def describe_optimizers(result: dict) -> str:
    """The optimizer line: what each loop steps, and that the optimizer step's extra cost is DeepSpeed's."""
    fused = " (fused)" if result["device"] == "cuda" else ""
    ways = {"torch": f"implementation=torch: torch.optim.AdamW{fused} inside DeepSpeed, compiles nothing",
            "deepspeed": "implementation=deepspeed: DeepSpeed's FusedAdam"}
    fa = result.get("fused_adam", {})
    if fa.get("ready"):
        ways["deepspeed"] += f", {fa['how']} in {fa['build_s']:.0f} s before any clock"
    elif "reason" in fa:
        ways["deepspeed"] += ", skipped"
    return (f"optimizers: bare loop torch.optim.AdamW{fused} on fp32 master weights; shardrun "
            f"{'; '.join(ways[o] for o in result['optimizers'])}. Both step fp32 master weights, so what "
            "shardrun's optimizer step takes beyond the bare loop's is DeepSpeed's own cost (its bf16 optimizer "
            "wrapper, ZeRO's bookkeeping), not shardrun's loop")


def fused_adam_line(result: dict) -> str | None:
    fa = result.get("fused_adam", {})
    return f"FusedAdam (implementation=deepspeed) rows skipped: {fa['reason']}" if "reason" in fa else None


def describe_card(result: dict) -> str:
    d = result["peak"].get("device", {})
    if "sms" not in d:
        return d.get("name", result["device"])
    return (f"{d['name']} ({d['sms']} SMs, {d['memory_gib']:.0f} GiB, compute {d['capability']}), "
            f"CUDA {d['cuda']}, driver {d['driver'] or 'unknown'}")


def print_report(result: dict) -> None:
    print(f"\ncard: {describe_card(result)}")
    print(f"setup: {describe_setup(result)}")
    print(describe_optimizers(result))
    print(format_peak(result))
    if hf_model_line(result):
        print(hf_model_line(result))
    print()
    print(format_table(result))
    if format_levers_table(result):
        print("\nLevers (shardrun's rows against the row without levers):\n")
        print(format_levers_table(result))
    if format_load_table(result):
        print("\nModel load:\n")
        print(format_load_table(result))
    if fused_adam_line(result):
        print(fused_adam_line(result))
    zero = format_zero_table(result)
    if zero:
        print("\nZeRO 0 vs ZeRO 1:\n")
        print(zero)
    print()
    for line in result["findings"]:
        print(line)


def record(result: dict, *, local: bool) -> None:
    """Append a run (made here, or elsewhere and read from its JSON) under the GPU section of the doc."""
    revision = result["revision"]
    if not local and revision.startswith("("):  # a working-tree copy without git: this checkout's
        revision = f"{git_revision()} (working tree copied to the GPU machine)"
    optimizers = describe_optimizers(result)
    details = [f"Setup: {describe_setup(result)}", optimizers[:1].upper() + optimizers[1:], format_peak(result)]
    if hf_model_line(result):
        details.append(hf_model_line(result)[:1].upper() + hf_model_line(result)[1:])
    if fused_adam_line(result):
        details.append(fused_adam_line(result))
    append_entry(SECTION, date=result["date"], revision=revision, command=result["command"],
                 card=describe_card(result), machine=result["machine"], versions=result["versions"],
                 details=details,
                 tables=[t for t in (format_table(result), format_levers_table(result), format_load_table(result),
                                     format_zero_table(result)) if t],
                 found=result["findings"])


if __name__ == "__main__":
    sys.exit(main())
