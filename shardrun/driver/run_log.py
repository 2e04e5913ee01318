"""The run's log lines and its summary, from rank 0's step records (on the driver, or a lone process)."""

from __future__ import annotations

import math
import time


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}{'es' if word.endswith('ch') else 's'}"


class RunLog:
    """Turns step records into log lines; remembers what the summary needs."""

    def __init__(self, *, max_steps: int, byte_level: bool):
        self.max_steps = max_steps
        self.byte_level = byte_level
        self.starts: list[dict] = []
        self.first: dict | None = None
        self.last: dict | None = None
        self.evals: list[dict] = []
        self.t0 = time.time()

    def on_start(self, info: dict) -> str:
        """A worker group began at info['step'] (more than once: restarts)."""
        self.starts.append(info)
        what = "starting" if info["step"] == 0 else f"resuming from step {info['step']}"
        again = f" (restart {len(self.starts) - 1})" if len(self.starts) > 1 else ""
        line = f"{what} with {plural(info['world_size'], 'worker')}{again}"
        if info.get("resized_from"):
            how = ", converted to DeepSpeed's universal format" if info.get("universal") else ""
            line += (f"; the checkpoint was written by {plural(info['resized_from'], 'worker')}{how}; now "
                     f"{plural(info['grad_accum_steps'], 'micro-batch')} per step, a global batch of "
                     f"{info['global_batch']}")
        return line

    def on_record(self, rec: dict) -> str:
        """One progress line: step, loss, tokens/s, ETA (an eval record: its own line)."""
        if "eval_loss" in rec:
            self.evals.append(rec)
            return eval_line(rec, byte_level=self.byte_level)
        if self.first is None:
            self.first = rec
        self.last = rec
        parts = [f"step {rec['step']:>6}/{self.max_steps}", f"loss {rec['loss']:.4f}"]
        if self.byte_level:
            parts.append(f"bpb {rec['loss'] / math.log(2):.3f}")
        rate = (f"{rec['tokens_per_s']:,.0f} tok/s" if rec.get("tokens_per_s")
                else f"{rec.get('samples_per_s', 0):,.0f} samples/s")
        parts += [f"lr {rec['lr']:.2e}", rate]
        if rec.get("step_time"):
            parts.append(f"ETA {format_duration((self.max_steps - rec['step']) * rec['step_time'])}")
        return " | ".join(parts)

    def summary(self, *, checkpoint: str | None, finished: bool,
                wall_seconds: float | None = None) -> dict:
        """What this invocation did; counts exclude work lost to restarts."""
        start = self.starts[0] if self.starts else {"step": 0, "samples": 0, "tokens": 0}
        end = self.last or start
        out = {
            "start_step": start["step"],
            "final_step": end["step"],
            "steps": end["step"] - start["step"],
            "samples": end["samples"] - start["samples"],
            "tokens": end["tokens"] - start["tokens"],
            "first_loss": self.first["loss"] if self.first else None,
            "last_loss": self.last["loss"] if self.last else None,
            "wall_seconds": round(wall_seconds if wall_seconds is not None else time.time() - self.t0, 2),
            "checkpoint": checkpoint,
            "restarts": max(0, len(self.starts) - 1),
            "finished": finished,
        }
        if self.byte_level and self.last:
            out["first_bits_per_byte"] = self.first["loss"] / math.log(2)
            out["last_bits_per_byte"] = self.last["loss"] / math.log(2)
        if self.evals:
            best = min(self.evals, key=lambda r: r["eval_loss"])
            out.update(first_eval_loss=self.evals[0]["eval_loss"], last_eval_loss=self.evals[-1]["eval_loss"],
                       best_eval_loss=best["eval_loss"], best_eval_step=best["step"])
        return out


def eval_line(rec: dict, *, byte_level: bool) -> str:
    """`eval at step 200: loss 1.2345 (perplexity 3.44) over 65,536 tokens in 1.2 s`."""
    loss = rec["eval_loss"]
    if "eval_tokens" in rec:
        measure = f" (bits per byte {loss / math.log(2):.3f})" if byte_level else \
            f" (perplexity {math.exp(min(loss, 700)):,.2f})"
        n, unit = rec["eval_tokens"], "token"
    else:
        measure, n, unit = "", rec.get("eval_rows", 0), "row"
    over = f"{n:,} {unit}{'' if n == 1 else 's'}"
    return f"eval at step {rec['step']}: loss {loss:.4f}{measure} over {over} in {rec.get('eval_seconds', 0):.1f} s"


def carry_over(summary: dict, previous: dict | None) -> dict:
    """summary.json of an invocation that resumed a run keeps where the run began: run_start_step and
    run_first_loss (from the earlier summary.json, whose own run_ fields win), and how many invocations it
    took."""
    previous = previous if isinstance(previous, dict) else {}
    resumed = summary.get("start_step", 0) > 0 and previous
    out = dict(summary)
    out["run_start_step"] = previous.get("run_start_step", previous.get("start_step", 0)) if resumed else \
        summary.get("start_step", 0)
    out["run_first_loss"] = previous.get("run_first_loss", previous.get("first_loss")) if resumed else \
        summary.get("first_loss")
    out["invocations"] = previous.get("invocations", 1) + 1 if resumed else 1
    if resumed and previous.get("best_eval_loss") is not None and (
            out.get("best_eval_loss") is None or previous["best_eval_loss"] < out["best_eval_loss"]):
        out["best_eval_loss"], out["best_eval_step"] = previous["best_eval_loss"], previous.get("best_eval_step")
    if resumed and previous.get("first_eval_loss") is not None:
        out["first_eval_loss"] = previous["first_eval_loss"]
    return out


def gpt_parameters(n_layer: int, n_embd: int, block_size: int, vocab_size: int, bias: bool) -> int:
    """The built-in GPT's parameter count (its token embedding and output head are one matrix)."""
    per_layer = 12 * n_embd * n_embd + 2 * n_embd + (11 * n_embd if bias else 0)
    return (vocab_size + block_size) * n_embd + n_layer * per_layer + n_embd * (2 if bias else 1)


def banner(spec) -> str:
    """The run in one line: name, model, precision and ZeRO stage, workers, steps, and where its files go (the
    resolved spec among them: job.yaml in the run dir)."""
    m, ds, s = spec.model, spec.deepspeed, spec.scaling
    if m.hf is not None:
        model = f"{m.hf.path}{' (its architecture, random weights)' if m.hf.from_scratch else ''}"
    elif m.entrypoint:
        model = m.entrypoint
    else:
        params = gpt_parameters(m.n_layer, m.n_embd, m.block_size, m.vocab_size, m.bias)
        model = f"GPT of {params / 1e6:,.1f} M parameters ({m.n_layer} layers x {m.n_embd})"
    workers = (f"{s.num_workers[0]}-{s.num_workers[1]} workers" if isinstance(s.num_workers, tuple)
               else plural(s.num_workers, "worker"))
    device = "GPUs" if s.use_gpu else "CPU"
    return (f"{spec.name}: {model}, {ds.precision}, ZeRO {ds.zero_stage}, {workers} on {device}, "
            f"{spec.run.max_steps} steps; run dir {spec.run_dir} (the resolved spec: job.yaml there)")


def summary_line(summary: dict, run_dir: str) -> str:
    """How the run ended, in one line, for both launchers: the steps, the loss, the checkpoint."""
    how = "finished" if summary.get("finished") else f"stopped ({summary['stopped']})" if summary.get(
        "stopped") else "stopped"
    parts = [f"{how}: steps {summary['start_step']}-{summary['final_step']} in "
             f"{format_duration(summary.get('wall_seconds') or 0)}"]
    if summary.get("first_loss") is not None and summary.get("last_loss") is not None:
        parts.append(f"loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}")
    if summary.get("last_eval_loss") is not None:
        parts.append(f"eval loss {summary['first_eval_loss']:.4f} -> {summary['last_eval_loss']:.4f} (best "
                     f"{summary['best_eval_loss']:.4f} at step {summary['best_eval_step']})")
    if summary.get("restarts"):
        parts.append(plural(summary["restarts"], "restart"))
    checkpoint = summary.get("checkpoint")
    parts.append(f"checkpoint {checkpoint}" if checkpoint else "no checkpoint")
    return ", ".join(parts) + f"; summary.json in {run_dir}"
