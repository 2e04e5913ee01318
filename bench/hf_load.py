"""Hugging Face model loading: each rank's peak resident memory while `shardrun train` loads it, ZeRO-3 vs ZeRO-0.

A Llama with random weights (default 8 layers x 1024, 16 heads, 4 KV heads, MLP 2048, vocabulary 32000, tied
embeddings: 104M parameters, 397 MiB in fp32) is written once by save_pretrained (model.safetensors) into a
temporary folder, with token shards of ids below its vocabulary. Then, per ZeRO stage and repetition (the stages
taking turns), `shardrun train` runs it as `model: {hf: {path: FOLDER}}` on 2 CPU ranks under torchrun (gloo,
DS_ACCELERATOR=cpu), fp32, micro-batch 1 of 64 tokens, 2 steps (its one checkpoint after the last). At ZeRO-3
shardrun builds the model inside transformers' HfDeepSpeedConfig: parameters are partitioned as they are made
and the weights loaded into each rank's shard; at ZeRO 0 every rank loads the whole model.

Each rank runs `shardrun train` in-process (shardrun.cli.main) behind hooks of this script:
  RSS before the load   VmRSS of /proc/self/status when shardrun's restore asks for the model's folder
                        (hf.local_folder): imports (transformers and DeepSpeed imported first on every
                        rank), process group; nothing of the model yet
  peak RSS              VmHWM of /proc/self/status, the kernel's own high-water mark of the process's
                        resident set (anonymous, file-backed and shared pages), read when the worker logs
                        "engine ready" (shardrun.trainer.startup): the exact peak from the process's start to
                        the engine built, no sampling gap. It counts the pages of model.safetensors that the
                        process has mapped and touched, which are page cache the kernel may reclaim
  anon                  the highest RssAnon (the process's own memory: tensors, not the mapped file) seen by
                        a thread sampling /proc/self/status every 50 ms up to "engine ready": a sample can
                        miss a spike shorter than 50 ms, so it is a lower bound
  peak to the end of from_pretrained
                        VmHWM as shardrun's hf.build returns: the model built (at ZeRO-3 partitioned), before
                        deepspeed.initialize
  peak RSS, whole run   VmHWM again as the process ends: the 2 steps (gradients, AdamW's state) and the save
  from_pretrained       seconds in shardrun's hf.build (transformers' from_pretrained)
  load to engine ready  seconds from hf.local_folder to "engine ready": from_pretrained and deepspeed.initialize

    python bench/hf_load.py                 # ZeRO 0 and 3 on 2 ranks, 2 repetitions each
    python bench/hf_load.py --record        # the same, appended to docs/benchmarks.md
    python bench/hf_load.py --quick         # a tiny Llama, one repetition: checks that it all runs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import (
    SEED,
    Parser,
    deepspeed_cpu_env,
    in_turns,
    on_ranks,
    on_startup,
    plural,
    positive,
    report,
    run_to_end,
    status_kb,
    table,
    write_llama,
    write_tokens,
    zero_stages,
)

SECTION = "## Hugging Face model loading"
SEQ = 64
MICRO_BATCH = 1
STEPS = 2
SAMPLE_S = 0.05
MIB = 2**20
VERSIONS = ("torch", "deepspeed", "transformers", "accelerate", "safetensors")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    with tempfile.TemporaryDirectory(prefix="shardrun-hf-load-") as work:
        work = Path(work)
        model = write_model(work / "llama", args)
        print(f"model: {model['params'] / 1e6:.1f}M parameters, {model['bytes'] / MIB:.0f} MiB of "
              f"model.safetensors in {work / 'llama'}", flush=True)
        data = write_tokens(work / "data", {"micro_batch": MICRO_BATCH * args.ranks, "seq_len": SEQ,
                                            "vocab_size": args.vocab},
                            max(STEPS, -(-16 * 256 // (MICRO_BATCH * args.ranks))))
        env = deepspeed_cpu_env(PYTHONUNBUFFERED="1")
        runs: dict[int, list[list[dict]]] = {stage: [] for stage in args.stages}
        for rep, order in in_turns([str(s) for s in args.stages], args.reps):
            for stage in map(int, order):
                ranks = launch(args, stage, rep, work, data, env)
                runs[stage].append(ranks)
                print(f"  rep {rep + 1}/{args.reps} ZeRO {stage}: peak RSS to engine ready "
                      + ", ".join(f"rank {r['rank']} {r['peak_to_ready_kb'] / 1024:,.0f} MiB" for r in ranks)
                      + f"; loaded in {max(r['load_s'] for r in ranks):.1f} s", flush=True)
    report(SECTION, args, [format_table(runs, model)], findings(runs, model), details=[setup(args, model)],
           versions_of=VERSIONS)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(__doc__, reps=2, reps_help="runs per ZeRO stage", measures="memory",
               quick={"layers": 2, "hidden": 64, "vocab": 512, "reps": 1},
               quick_help="a tiny Llama (2 x 64, vocabulary 512), one repetition")
    p.add_argument("--layers", type=positive, default=8, help="Llama layers (default 8)")
    p.add_argument("--hidden", type=int, default=1024,
                   help="hidden size, a multiple of 64 (heads of 64; MLP twice as wide; default 1024)")
    p.add_argument("--vocab", type=positive, default=32000, help="vocabulary (default 32000)")
    p.add_argument("--stages", type=zero_stages, default=[0, 3], metavar="N[,N...]", help="ZeRO stages (default 0,3)")
    p.add_argument("--ranks", type=positive, default=2, help="ranks under torchrun (default 2)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--job", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse(argv)
    if args.hidden < 64 or args.hidden % 64:
        p.error("--hidden must be a multiple of 64")
    return args


def llama_config(args: argparse.Namespace) -> dict:
    """LlamaConfig's fields of the bench's model (its vocabulary aside)."""
    heads = args.hidden // 64
    return {"hidden_size": args.hidden, "intermediate_size": 2 * args.hidden, "num_hidden_layers": args.layers,
            "num_attention_heads": heads, "num_key_value_heads": max(1, heads // 4),
            "max_position_embeddings": max(2048, SEQ), "tie_word_embeddings": True}


def write_model(folder: Path, args: argparse.Namespace) -> dict:
    """A Llama with random weights (seed SEED), fp32, written as a pretrained model is; its size."""
    params = write_llama(folder, args.vocab, **llama_config(args))
    weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return {"params": params, "bytes": weights,
            "config": json.loads((folder / "config.json").read_text())}


# -- the parent: one torchrun per stage and repetition ---------------------------------------------------


def job(args: argparse.Namespace, stage: int, model: Path, data: str, runs: Path) -> dict:
    """shardrun's spec for one run: the HF model at this ZeRO stage, fp32, 2 steps, a save only at the end."""
    return {
        "name": f"hf-load-zero{stage}",
        "model": {"hf": {"path": str(model)}},
        "data": {"paths": [data], "seq_len": SEQ, "seed": SEED},
        "deepspeed": {"zero_stage": stage, "precision": "fp32", "micro_batch_size": MICRO_BATCH,
                      "schedule": {"warmup_steps": 1, "decay": "constant"}},
        "scaling": {"num_workers": args.ranks, "use_gpu": False, "cpus_per_worker": 1},
        "checkpoint": {"storage": str(runs), "every_steps": 100, "keep": 1},
        "metrics": {"enabled": False},
        "failure": {"scheduled_events": "off"},
        "run": {"max_steps": STEPS, "seed": SEED, "log_every": 1},
    }


def launch(args: argparse.Namespace, stage: int, rep: int, work: Path, data: str, env: dict) -> list[dict]:
    """One `shardrun train` on args.ranks ranks; each rank's numbers."""
    import yaml

    out, runs = work / f"out-{stage}-{rep}", work / f"runs-{stage}-{rep}"
    out.mkdir()
    spec = work / f"job-{stage}-{rep}.yaml"
    spec.write_text(yaml.safe_dump(job(args, stage, work / "llama", data, runs)))
    script = [str(Path(__file__).resolve()), "--child", "--job", str(spec), "--out", str(out)]
    run_to_end(on_ranks(script, args.ranks), env, f"shardrun train at ZeRO {stage} on {args.ranks} ranks")
    shutil.rmtree(runs, ignore_errors=True)
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(args.ranks)]
    missing = [r["rank"] for r in ranks if not {"peak_to_ready_kb", "before_load_kb", "peak_to_built_kb"} <= set(r)]
    if missing:
        sys.exit(f"bench: rank(s) {missing} never logged loading the model or \"engine ready\"")
    return ranks


# -- the child: one rank of `shardrun train` ---------------------------------------------------------------


class Meter:
    """This process's memory and the loading's times, marked by shardrun's own calls (hooks), written as JSON."""

    def __init__(self, out: Path):
        self.out, self.rank = out, int(os.environ.get("RANK", "0"))
        self.result: dict = {"rank": self.rank}
        self.loading = True  # until "engine ready"
        self.anon_max = 0
        self.done = threading.Event()
        threading.Thread(target=self.sample, daemon=True).start()

    def sample(self) -> None:
        while not self.done.wait(SAMPLE_S):
            if self.loading:
                self.anon_max = max(self.anon_max, status_kb()["RssAnon"])

    def before_load(self) -> None:
        if "before_load_kb" not in self.result:  # the first build only (a restart would build again)
            s = status_kb()
            self.result.update(before_load_kb=s["VmRSS"], before_load_anon_kb=s["RssAnon"], t_folder=time.monotonic())

    def built(self, seconds: float) -> None:
        if "from_pretrained_s" not in self.result:
            s = status_kb()
            self.result.update(from_pretrained_s=seconds, peak_to_built_kb=s["VmHWM"], built_kb=s["VmRSS"],
                               built_anon_kb=s["RssAnon"])

    def engine_ready(self, record) -> None:
        if "peak_to_ready_kb" in self.result:
            return
        s = status_kb()
        self.loading = False
        self.anon_max = max(self.anon_max, s["RssAnon"])
        self.result.update(peak_to_ready_kb=s["VmHWM"], ready_kb=s["VmRSS"], anon_peak_to_ready_kb=self.anon_max,
                           load_s=time.monotonic() - self.result.get("t_folder", time.monotonic()))

    def finish(self, code: int) -> None:
        self.done.set()
        self.result.update(peak_run_kb=status_kb()["VmHWM"], exit_code=code)
        self.result.pop("t_folder", None)
        (self.out / f"rank{self.rank}.json").write_text(json.dumps(self.result))


def run_child(args: argparse.Namespace) -> int:
    meter = Meter(Path(args.out))
    # what loading imports, imported first on every rank: "RSS before the load" then holds the same code on
    # each (rank 0 imports some of it for its checks before the workers start, the others in hf.build)
    import deepspeed  # noqa: F401 - DS_ACCELERATOR=cpu is set: the accelerator shardrun would choose
    import transformers.integrations  # noqa: F401
    from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401

    from shardrun.trainer.models import hf

    folder, build = hf.local_folder, hf.build

    def local_folder(*a, **kw):
        meter.before_load()
        return folder(*a, **kw)

    def timed_build(*a, **kw):
        t0 = time.monotonic()
        model = build(*a, **kw)
        meter.built(time.monotonic() - t0)
        return model

    hf.local_folder, hf.build = local_folder, timed_build  # restore._build calls them through the module
    on_startup("engine ready", meter.engine_ready)
    from shardrun.cli import main as shardrun

    code = 1
    try:
        code = shardrun(["train", args.job])
    finally:
        meter.finish(code)
    return code


# -- results ------------------------------------------------------------------------------------------------


def mib(kb: float) -> str:
    return f"{kb / 1024:,.0f}"


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def per_rank(runs: dict[int, list[list[dict]]]) -> dict[tuple[int, int], list[dict]]:
    """(stage, rank) -> that rank's numbers in each repetition."""
    out: dict[tuple[int, int], list[dict]] = {}
    for stage, reps in runs.items():
        for ranks in reps:
            for r in ranks:
                out.setdefault((stage, r["rank"]), []).append(r)
    return dict(sorted(out.items()))


def format_table(runs: dict[int, list[list[dict]]], model: dict) -> str:
    rows = []
    for (stage, rank), rs in per_rank(runs).items():
        peaks = [r["peak_to_ready_kb"] for r in rs]
        spread = f" ({mib(min(peaks))} - {mib(max(peaks))})" if len(rs) > 1 else ""
        rows.append([str(stage), str(rank), mib(med(peaks)) + spread,
                     mib(med([r["anon_peak_to_ready_kb"] for r in rs])),
                     mib(med([r["before_load_kb"] for r in rs])),
                     mib(med([r["peak_to_ready_kb"] - r["before_load_kb"] for r in rs])),
                     mib(med([r["peak_to_built_kb"] for r in rs])),
                     mib(med([r["peak_run_kb"] for r in rs])), f"{model['bytes'] / MIB:,.0f}",
                     f"{med([r['from_pretrained_s'] for r in rs]):.2f}", f"{med([r['load_s'] for r in rs]):.2f}"])
    return table(["ZeRO", "rank", "peak RSS to engine ready (MiB; VmHWM)", "of it anon (MiB, sampled 50 ms)",
                  "RSS before the load (MiB)", "peak - before (MiB)", "peak RSS to the end of from_pretrained (MiB)",
                  "peak RSS, whole run (MiB)", "model (MiB)",
                  "from_pretrained (s)", "load to engine ready (s)"], rows, align="r")


def findings(runs: dict[int, list[list[dict]]], model: dict) -> list[str]:
    """Each rank's load cost against the model's size, and ZeRO-3's peak against ZeRO-0's, rank by rank."""
    size_kb = model["bytes"] / 1024
    by = per_rank(runs)
    out = []
    for (stage, rank), rs in by.items():
        added = med([r["peak_to_ready_kb"] - r["before_load_kb"] for r in rs])
        built = med([r["peak_to_built_kb"] - r["before_load_kb"] for r in rs])
        anon = med([r["anon_peak_to_ready_kb"] - r["before_load_anon_kb"] for r in rs])
        out.append(f"ZeRO {stage}, rank {rank}: the load added {mib(added)} MiB to the peak RSS "
                   f"({added / size_kb:.2f} x the model's {mib(size_kb)} MiB), {mib(built)} MiB of it by the end of "
                   f"from_pretrained, the rest in deepspeed.initialize; its anonymous memory rose {mib(anon)} MiB "
                   f"({anon / size_kb:.2f} x)")
    if 0 in runs and 3 in runs:
        for rank in sorted({rank for _, rank in by}):
            z0, z3 = by.get((0, rank)), by.get((3, rank))
            if z0 and z3:
                p0, p3 = (med([r["peak_to_ready_kb"] for r in rs]) for rs in (z0, z3))
                out.append(f"rank {rank}: ZeRO 3's peak RSS to engine ready is {p3 / p0:.2f} x ZeRO 0's "
                           f"({mib(p3)} against {mib(p0)} MiB)")
    return out


def setup(args: argparse.Namespace, model: dict) -> str:
    c = model["config"]
    return (f"Setup: Llama {args.layers} x {args.hidden} ({c.get('num_attention_heads')} heads, "
            f"{c.get('num_key_value_heads')} KV heads, MLP {c.get('intermediate_size')}, vocabulary {args.vocab}, "
            f"tied embeddings; {model['params'] / 1e6:.1f}M parameters, {model['bytes'] / MIB:,.0f} MiB of "
            f"model.safetensors, fp32), `shardrun train` on {plural(args.ranks, 'rank')} under torchrun (gloo, "
            f"DeepSpeed's CPU accelerator), fp32, micro-batch {MICRO_BATCH} x {SEQ} tokens, {STEPS} steps; "
            f"peak RSS = VmHWM at \"engine ready\" (exact), anon = RssAnon sampled every {SAMPLE_S * 1000:.0f} ms; "
            f"medians of {args.reps} repetitions, the stages taking turns")


if __name__ == "__main__":
    sys.exit(main())
