"""Metrics overhead: what shardrun's metrics path adds to a training step, as a share of the step.

    python bench/metrics.py [--reps 7] [--steps 300] [--quick] [--record]

It times the exact calls the worker loop makes for metrics (every step: WorkerMetrics.step_done and
the two clock reads around it; every log step: stream.stats() and WorkerMetrics.logged) with a
Prometheus endpoint being scraped, and divides by the step time of the demo model
(examples/gpt-stdlib.yaml: GPT 4 x 128, seq 128, micro-batch 16, fp32) trained on this CPU by plain
PyTorch (forward, backward, AdamW). A short step is the hard case: a GPU step of a real model is
longer, and the metrics path does not grow with the model.
"""

from __future__ import annotations

import statistics
import sys
import threading
import time
import urllib.request

import torch
from common import Parser, positive, report, spread, table

from shardrun.config import MetricsSpec
from shardrun.metrics import WorkerMetrics
from shardrun.trainer.models.gpt import GPT, GPTConfig

SECTION = "## Metrics overhead"
GOAL = 0.01
LOG_EVERY = 25  # the demo's run.log_every


def metrics_path_seconds(steps: int) -> float:
    """Seconds per step of the metrics calls, averaged over steps (log-step work amortised)."""
    m = WorkerMetrics(MetricsSpec(host="127.0.0.1"), run="bench", rank=0, local_rank=0)
    stop = threading.Event()

    def scrape():  # Prometheus at 1 s would be gentler; every 50 ms keeps the lock busy
        while not stop.wait(0.05):
            urllib.request.urlopen(f"http://{m.address}/metrics", timeout=5).read()

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    data = {"queue_depth": 2, "buffered_bytes": 1 << 20, "wait_seconds": 0.0, "skipped_files": 0,
            "skipped_row_groups": 0}
    try:
        t0 = time.perf_counter()
        for step in range(1, steps + 1):
            s0 = time.perf_counter()
            wait = 0.0
            m.step_done(step=step, seconds=time.perf_counter() - s0, data_wait=wait, samples=16, tokens=2048)
            if step % LOG_EVERY == 0:
                m.logged(loss=2.0, lr=1e-3, grad_norm=0.5, loss_scale=None, mfu=None, skipped_steps=0, data=data,
                         world_size=2, memory=None)
        return (time.perf_counter() - t0) / steps
    finally:
        stop.set()
        scraper.join()
        m.close()


def step_seconds(steps: int) -> float:
    """Median seconds of one training step of the demo model in plain PyTorch on this machine."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=4, n_head=4, n_embd=128, block_size=128, vocab_size=256))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randint(0, 256, (16, 129))
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[5:])


def main(argv: list[str] | None = None) -> int:
    p = Parser(__doc__, reps=7, quick={"reps": 1, "steps": 20}, quick_help="one repetition of 20 steps",
               measures="the metrics path")
    p.add_argument("--steps", type=positive, default=300, help="steps timed per repetition")
    args = p.parse(argv)

    torch.set_num_threads(max(1, torch.get_num_threads()))
    metrics_us, step_ms = [], []
    for rep in range(args.reps):
        metrics_us.append(metrics_path_seconds(args.steps * 20) * 1e6)
        step_ms.append(step_seconds(min(args.steps, 60)) * 1e3)
        print(f"  rep {rep + 1}/{args.reps}: metrics path {metrics_us[-1]:.1f} us/step, step {step_ms[-1]:.1f} ms")
    share = statistics.median(metrics_us) / (statistics.median(step_ms) * 1e3)
    result = table(["metrics path (us/step)", "min - max", "demo step (ms)", "min - max", "share of the step"],
                   [[*spread(metrics_us, 1), *spread(step_ms, 1), f"{share:.3%}"]], align="r")
    verdict = f"metrics path = {share:.3%} of a step: {'meets' if share < GOAL else 'misses'} the goal of {GOAL:.0%}"
    report(SECTION, args, [result], [verdict], versions_of=("torch", "prometheus-client"),
           details=[f"Medians of {args.reps} repetitions; log every {LOG_EVERY} steps; endpoint scraped every 50 ms"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
