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
        """One progress line: step, loss, tokens/s, ETA."""
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
        return out
