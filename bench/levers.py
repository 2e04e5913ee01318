"""Memory levers on a CPU: peak memory and step time of activation checkpointing and LoRA against full fine-tuning.

A transformers Llama with random weights (8 layers x 512, 8 heads, 2 KV heads, MLP 1408, vocabulary 8192, untied
embeddings: 30.9M parameters, fp32) is written once by save_pretrained into a temporary folder, with token shards
of ids below its vocabulary. Then each configuration trains it in a fresh process of its own, one rank (gloo,
DS_ACCELERATOR=cpu), through the engine shardrun's worker loop builds: shardrun.trainer.restore with no checkpoint
to load, `model: {hf: {path: FOLDER}}`, ZeRO 2 (shardrun's default, and a stage where deepspeed.offload.optimizer
applies), fp32, torch's AdamW inside DeepSpeed, micro-batch 4 x 512 tokens. The shards' rows are fed as the loop
feeds them: loss = engine(inputs, targets); engine.backward(loss); engine.step(). The configurations:
  full                 every weight trained
  full + checkpointing model.activation_checkpointing: true (every decoder layer recomputed in the backward)
  LoRA                 model.lora: {r: 16, alpha: 32, target_modules: all-linear}: adapters on every linear
                       layer but the head, the base weights frozen
  LoRA + checkpointing both
  full + offload       deepspeed.offload.optimizer: cpu (ZeRO-Offload). On a CPU there is nowhere else to put
                       the optimizer state: this row measures what DeepSpeed's offload path costs, not a saving

transformers checkpoints a layer only in training mode (it asks self.training), and from_pretrained leaves a model
in eval mode; shardrun's restore puts it in training mode since 8b8ac96 (before, model.hf runs never
checkpointed). The bench records how many modules restore returned in eval mode and calls engine.train() before the
first step all the same, as a training loop must. Each row counts its attention forwards in its first step: one
per layer, two where the layer is recomputed in the backward.

Each configuration runs twice, in two fresh processes, because glibc's malloc serves one purpose or the other:
  memory   glibc's mmap threshold fixed at 128 KiB (MALLOC_MMAP_THRESHOLD_): every tensor of 128 KiB or more
           is a mapping of its own, given back to the kernel as it is freed, so the resident set follows the
           live tensors. Left to itself, glibc raises the threshold at the first big free, and later tensors
           come from its heap, which keeps what they free: RSS then counts the heap's high-water mark and
           fragmentation, which differ from one configuration to the next. 1 warm-up step, 2 measured
  speed    glibc as it comes: every fresh mapping would cost its page faults again, about 30% of this
           model's step. --warmup-steps, then --steps timed
Memory from /proc/self/status and getrusage (the kernel's own counters, no sampling gap):
  peak RSS             ru_maxrss as the memory process ends: its whole life, imports, the load and the steps
  after the build      VmRSS as shardrun's restore returns the engine: the weights in DeepSpeed's flat buffers
                       and ZeRO's fp32 copy of the trained ones, no step yet
  peak growth          VmHWM over the measured steps (the high-water mark reset through /proc/self/clear_refs
                       as they begin) less `after the build`: what training adds to the built engine, i.e. the
                       activations kept for the backward, the gradients, AdamW's two moments (made at the
                       first step)
  peak RSS, glibc      ru_maxrss of the speed process: what the same training holds with malloc as it comes
  step                 the median of the speed process's timed steps' wall times (forward, backward, optimizer
                       step); tokens/s is micro-batch x seq_len over it
  trained              the parameters with requires_grad in the engine's module

    python bench/levers.py                  # the five configurations, two processes each (about 3 minutes)
    python bench/levers.py --record         # the same, appended to docs/benchmarks.md
    python bench/levers.py --quick          # a tiny Llama, 2 steps each: checks that it all runs
    python bench/levers.py --configs full,lora --reps 2
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import (
    SEED,
    Parser,
    deepspeed_cpu_env,
    in_turns,
    positive,
    report,
    run_to_end,
    status_kb,
    table,
    write_llama,
    write_tokens,
)
from gpu import pinned_batches

SECTION = "## Memory levers (CPU)"
VERSIONS = ("torch", "deepspeed", "transformers", "peft")
MMAP_THRESHOLD = 128 * 1024
"""glibc's initial mmap threshold, fixed in the memory processes (see above)."""
MEMORY_STEPS = (1, 2)
"""The memory process's warm-up steps (the first makes AdamW's state) and measured steps."""
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
SIZES = {
    # Llama-shaped: GQA (4 query heads per KV head), SwiGLU MLP about 2.75 x the width, untied embeddings
    "default": {"hf": {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8,
                       "num_key_value_heads": 2, "intermediate_size": 1408},
                "vocab": 8192, "seq_len": 512, "micro_batch": 4},
    "quick": {"hf": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "intermediate_size": 176},
              "vocab": 512, "seq_len": 64, "micro_batch": 2},
}
CONFIGS = {
    "full": {},
    "full+checkpointing": {"model": {"activation_checkpointing": True}},
    "lora": {"model": {"lora": LORA}},
    "lora+checkpointing": {"model": {"lora": LORA, "activation_checkpointing": True}},
    "full+offload": {"deepspeed": {"offload": {"optimizer": "cpu"}}},
}
"""Each configuration's additions to the job's model and deepspeed sections."""
NAMES = {"full": "full", "full+checkpointing": "full + checkpointing", "lora": f"LoRA r{LORA['r']}",
         "lora+checkpointing": f"LoRA r{LORA['r']} + checkpointing", "full+offload": "full + offload.optimizer cpu"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    size = SIZES[args.size]
    with tempfile.TemporaryDirectory(prefix="shardrun-levers-") as work:
        work = Path(work)
        params = write_llama(work / "llama", size["vocab"], max_position_embeddings=size["seq_len"], **size["hf"])
        data = write_tokens(work / "data", {**size, "vocab_size": size["vocab"]}, max(total_steps(args),
                                                                                      sum(MEMORY_STEPS)))
        runs = measure(args, work, data)
    rows = summarize(runs)
    report(SECTION, args, [format_table(rows)], findings(rows), details=[setup(args, params), modes(rows)],
           versions_of=VERSIONS)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(__doc__, reps=1, reps_help="repetitions of each configuration (a memory and a speed process each)",
               measures="memory or speed", quick={"size": "quick", "steps": 2, "warmup_steps": 1},
               quick_help="a tiny Llama, 2 timed steps per configuration")
    p.add_argument("--configs", type=configs, default=list(CONFIGS), metavar="NAME[,NAME...]",
                   help=f"the configurations, in this order: {', '.join(CONFIGS)} (default all)")
    p.add_argument("--steps", type=positive, default=6, help="timed steps per configuration (default 6)")
    p.add_argument("--warmup-steps", type=positive, default=2, help="untimed steps first (default 2)")
    p.add_argument("--size", choices=SIZES, default="default", help=argparse.SUPPRESS)
    p.add_argument("--child", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--phase", choices=("memory", "speed"), help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse(argv)


def configs(text: str) -> list[str]:
    """An argparse type: comma-separated names of CONFIGS, each once."""
    out = list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    if not out or any(x not in CONFIGS for x in out):
        raise argparse.ArgumentTypeError(f"{text!r}: configurations are {', '.join(CONFIGS)}")
    return out


def total_steps(args: argparse.Namespace) -> int:
    return args.warmup_steps + args.steps


# -- the parent: one fresh process per configuration ---------------------------------------------------


def measure(args: argparse.Namespace, work: Path, data: str) -> dict[str, list[dict]]:
    """Per configuration, its runs: one per repetition (the configurations taking turns at going first), each its
    speed process's numbers with its memory process's under "memory"."""
    envs = {"memory": deepspeed_cpu_env(MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD)), "speed": deepspeed_cpu_env()}
    runs: dict[str, list[dict]] = {name: [] for name in args.configs}
    for rep, order in in_turns(args.configs, args.reps):
        for name in order:
            t0 = time.monotonic()
            memory = launch(args, name, "memory", MEMORY_STEPS, work, data, envs["memory"])
            r = {**launch(args, name, "speed", (args.warmup_steps, args.steps), work, data, envs["speed"]),
                 "memory": memory}
            runs[name].append(r)
            print(f"  {NAMES[name]}{f' (repetition {rep + 1})' if args.reps > 1 else ''}: step "
                  f"{r['step_s'] * 1e3:,.0f} ms; peak RSS {memory['maxrss_kb'] / 1024:,.0f} MiB, growth in the "
                  f"steps {growth_mib(memory):,.0f} MiB (glibc's own malloc: peak RSS "
                  f"{r['maxrss_kb'] / 1024:,.0f} MiB); {time.monotonic() - t0:.0f} s in all", flush=True)
    return runs


def launch(args: argparse.Namespace, name: str, phase: str, steps: tuple[int, int], work: Path, data: str,
           env: dict[str, str]) -> dict:
    """One configuration's process for one phase: (warm-up, timed) steps; what it measured."""
    out = work / f"{name}-{phase}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--phase", phase, "--model",
           str(work / "llama"), "--data", data, "--out", str(out), "--size", args.size,
           "--warmup-steps", str(steps[0]), "--steps", str(steps[1])]
    run_to_end(cmd, env, f"the {name} configuration's {phase} process")
    return json.loads(out.read_text())


# -- the child: one configuration, one rank ------------------------------------------------------------


class NoCheckpoint:
    """A checkpoint store with nothing in it: restore builds a fresh engine."""

    @contextlib.contextmanager
    def latest_checkpoint(self):
        yield None


def job_spec(args: argparse.Namespace) -> dict:
    """The job: the Llama of args.model, ZeRO 2, fp32, torch's AdamW, plus the configuration's sections."""
    size, extra = SIZES[args.size], CONFIGS[args.child]
    return {
        "name": "levers",
        "model": {"hf": {"path": args.model, "dtype": "fp32", "attn_implementation": "sdpa"}, **extra.get("model", {})},
        "data": {"paths": [args.data], "seq_len": size["seq_len"], "seed": SEED},
        "deepspeed": {"zero_stage": 2, "precision": "fp32", "micro_batch_size": size["micro_batch"],
                      "grad_accum_steps": 1, "grad_clip": 1.0,
                      "optimizer": {"type": "adamw", "lr": 1e-3, "weight_decay": 0.1, "implementation": "torch"},
                      "schedule": {"warmup_steps": 1, "decay": "constant"}, **extra.get("deepspeed", {})},
        "scaling": {"num_workers": 1, "use_gpu": False},
        "checkpoint": {"storage": str(Path(args.out).parent / "runs")},
        "run": {"max_steps": total_steps(args), "seed": SEED},
    }


def run_child(args: argparse.Namespace) -> int:
    import torch

    from shardrun.config import parse
    from shardrun.trainer import engine
    from shardrun.trainer.restore import restore
    from shardrun.trainer.topology import Topology

    spec = parse(job_spec(args), source="bench/levers.py")
    topology = Topology(rank=0, world_size=1, local_rank=0, device="cpu")
    engine.init_distributed(topology)
    batches = pinned_batches(args.data, spec.deepspeed.micro_batch_size, torch.device("cpu"))
    t0 = time.perf_counter()
    built = restore(spec, NoCheckpoint(), topology).engine
    build_s = time.perf_counter() - t0
    modules = list(built.module.modules())
    in_eval = sum(not m.training for m in modules)
    built.train()  # restore does since 8b8ac96; before, a model.hf model stayed in from_pretrained's eval mode
    gc.collect()
    built_kb = status_kb()["VmRSS"]
    result = train(built, batches[:total_steps(args)], args.warmup_steps)
    params = list(built.module.parameters())
    Path(args.out).write_text(json.dumps({
        **result, "build_s": build_s, "built_kb": built_kb, "eval_modules": in_eval, "modules": len(modules),
        "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "params": sum(p.numel() for p in params), "trained": sum(p.numel() for p in params if p.requires_grad),
        "tokens_per_step": spec.deepspeed.micro_batch_size * spec.data.seq_len,
    }))
    return 0


def train(built, batches: list, warmup_steps: int) -> dict:
    """Forward, backward and step over the batches, as shardrun's loop calls the engine; each step's wall time,
    the peak RSS over the steps after the warm-up, the losses, and how many attention forwards the first step
    ran (twice the layers where every layer is recomputed in the backward)."""
    attention = [0]
    hooks = [m.register_forward_hook(lambda *_: attention.__setitem__(0, attention[0] + 1))
             for m in built.module.modules() if type(m).__name__.endswith("Attention")]
    times, losses = [], []
    for i, (inputs, targets) in enumerate(batches):
        if i == warmup_steps:
            gc.collect()
            reset_peak()
        t0 = time.perf_counter()
        loss = built(inputs, targets)
        built.backward(loss)
        built.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if i == 0:
            for hook in hooks:
                hook.remove()
    return {"step_s": statistics.median(times[warmup_steps:]), "timed_s": times[warmup_steps:], "losses": losses,
            "steps_peak_kb": status_kb()["VmHWM"], "attention_forwards": attention[0], "layers": len(hooks)}


def reset_peak() -> None:
    """Reset this process's VmHWM to its VmRSS now (Linux 4.0+)."""
    Path("/proc/self/clear_refs").write_text("5")


# -- results -------------------------------------------------------------------------------------------


def growth_mib(r: dict) -> float:
    return (r["steps_peak_kb"] - r["built_kb"]) / 1024


def summarize(runs: dict[str, list[dict]]) -> list[dict]:
    """A row per configuration: the medians of its runs, and its timed steps' spread."""
    rows = []
    for name, rs in runs.items():
        def med(key, rs=rs):
            return statistics.median(key(r) for r in rs)

        timed = [t for r in rs for t in r["timed_s"]]
        rows.append({"name": name, "runs": len(rs), "params": rs[0]["params"], "trained": rs[0]["trained"],
                     "maxrss_mib": med(lambda r: r["memory"]["maxrss_kb"] / 1024),
                     "built_mib": med(lambda r: r["memory"]["built_kb"] / 1024),
                     "growth_mib": med(lambda r: growth_mib(r["memory"])),
                     "glibc_maxrss_mib": med(lambda r: r["maxrss_kb"] / 1024),
                     "step_s": med(lambda r: r["step_s"]), "step_min": min(timed), "step_max": max(timed),
                     "tokens_per_s": med(lambda r: r["tokens_per_step"] / r["step_s"]),
                     "attention_forwards": rs[0]["attention_forwards"], "layers": rs[0]["layers"],
                     "eval_modules": rs[0]["eval_modules"], "modules": rs[0]["modules"],
                     "first_loss": rs[0]["losses"][0], "last_loss": rs[0]["losses"][-1]})
    return rows


def format_table(rows: list[dict]) -> str:
    full = next((r for r in rows if r["name"] == "full"), None)

    def vs(r: dict, key: str) -> str:
        return f"{r[key] / full[key]:.2f}" if full else "-"

    body = [[NAMES[r["name"]], f"{r['trained'] / 1e6:,.2f}M ({r['trained'] / r['params']:.1%})",
             f"{r['maxrss_mib']:,.0f}", f"{r['built_mib']:,.0f}", f"{r['growth_mib']:,.0f}", vs(r, "growth_mib"),
             f"{r['glibc_maxrss_mib']:,.0f}", f"{r['step_s'] * 1e3:,.0f}",
             f"{r['step_min'] * 1e3:,.0f} - {r['step_max'] * 1e3:,.0f}", vs(r, "step_s"), f"{r['tokens_per_s']:,.0f}",
             f"{r['attention_forwards']} ({r['layers']} layers)", f"{r['first_loss']:.2f} → {r['last_loss']:.2f}"]
            for r in rows]
    return table(["configuration", "trained parameters", "peak RSS (MiB)", "after the build (MiB)",
                  "peak growth in the steps (MiB)", "growth vs full", "peak RSS, glibc's own malloc (MiB)",
                  "step (ms, median)", "min - max", "step vs full", "tokens/s", "attention forwards in a step",
                  "loss first → last"], body)


def change(base: dict, r: dict) -> str:
    """r against base: the growth in the steps, the peak RSS and the step, each before → after (difference)."""
    def mib(key: str) -> str:
        d = r[key] - base[key]
        return f"{base[key]:,.0f} → {r[key]:,.0f} MiB ({d:+,.0f} MiB, {d / base[key]:+.0%})"

    return (f"growth in the steps {mib('growth_mib')}, peak RSS {mib('maxrss_mib')}, step "
            f"{base['step_s'] * 1e3:,.0f} → {r['step_s'] * 1e3:,.0f} ms ({r['step_s'] / base['step_s'] - 1:+.0%})")


def findings(rows: list[dict]) -> list[str]:
    """Each lever against what it changes: memory saved (or added), step time lost (or won)."""
    by = {r["name"]: r for r in rows}
    full, out = by.get("full"), []
    ckpt = [(by[b], by[c]) for b, c in (("full", "full+checkpointing"), ("lora", "lora+checkpointing"))
            if b in by and c in by]
    if ckpt:
        r = ckpt[0][1]
        out.append(f"Activation checkpointing ({r['attention_forwards']} attention forwards a step for "
                   f"{r['layers']} layers: each recomputed in the backward) "
                   + "; ".join(f"on {NAMES[b['name']]}: {change(b, c)}" for b, c in ckpt))
    if full and "lora" in by:
        r = by["lora"]
        out.append(f"LoRA r{LORA['r']} trains {r['trained'] / r['params']:.1%} of the parameters: no gradients and "
                   "no AdamW moments for the frozen base weights, and ZeRO's fp32 copy holds the trained ones alone "
                   f"(after the build {full['built_mib']:,.0f} → {r['built_mib']:,.0f} MiB); against full: "
                   f"{change(full, r)}")
    if full and "lora+checkpointing" in by:
        out.append(f"Both levers together, against full: {change(full, by['lora+checkpointing'])}")
    if full and "full+offload" in by:
        r = by["full+offload"]
        out.append(f"offload.optimizer cpu on a CPU has nowhere to move the state to (it is in host memory "
                   f"already): after the build {full['built_mib']:,.0f} → {r['built_mib']:,.0f} MiB, and "
                   f"{change(full, r)}: the cost of DeepSpeed's offload path itself")
    return out


def modes(rows: list[dict]) -> str:
    """The record's line on the training mode restore left the model in (the bench sets it: engine.train())."""
    r = rows[0]
    if not r["eval_modules"]:
        return "Mode: shardrun's restore returned the model in training mode"
    return (f"Mode: shardrun's restore returned {r['eval_modules']} of the model's {r['modules']} modules in eval "
            "mode (from_pretrained's), where transformers never checkpoints; the bench put the engine in training "
            "mode (engine.train()) before its first step, as a training loop must")


def setup(args: argparse.Namespace, params: int) -> str:
    s = SIZES[args.size]
    h = s["hf"]
    return (f"Setup: transformers Llama {h['num_hidden_layers']} x {h['hidden_size']}, {h['num_attention_heads']} "
            f"heads ({h['num_key_value_heads']} KV), MLP {h['intermediate_size']}, vocabulary {s['vocab']}, untied, "
            f"{params / 1e6:.1f}M parameters, fp32, SDPA attention, random weights written by save_pretrained; "
            f"shardrun's restore (the worker loop's engine), 1 rank, ZeRO 2, torch AdamW (weight decay 0.1), "
            f"gradient clipping 1.0; micro-batch {s['micro_batch']} x {s['seq_len']} tokens; LoRA r {LORA['r']}, "
            f"alpha {LORA['alpha']:g}, all-linear; per configuration a memory process (MALLOC_MMAP_THRESHOLD_="
            f"{MMAP_THRESHOLD}; {MEMORY_STEPS[0]} warm-up step, {MEMORY_STEPS[1]} measured) and a speed process "
            f"(glibc's malloc as it comes; {args.warmup_steps} warm-up steps, {args.steps} timed), "
            f"{'once' if args.reps == 1 else f'{args.reps} times, the configurations taking turns, medians'}; "
            "torch threads: default (all cores)")


if __name__ == "__main__":
    sys.exit(main())
