"""`shardrun report RUN`: PNG plots and a short HTML page from a run's metrics.jsonl, and a text summary.

RUN is a run dir, `<checkpoint.storage>/<name>`, on local disk or behind a URI (abfs://, s3://); `shardrun report`
also takes a run's name, looked up under --storage (runs.resolve_run_dir).
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import ValidationError

from shardrun import fs
from shardrun.config import ModelSpec
from shardrun.driver.run_log import format_duration, plural
from shardrun.errors import UserError, redact
from shardrun.fs import is_uri, join, split_query

HOW_TO_GET_METRICS = ("RUN is a run's name or its run dir, <checkpoint.storage>/<name> (e.g. "
                      "~/shardrun/runs/gpt-stdlib), of a run "
                      "with metrics.jsonl: true (the default), which appends a record every run.log_every steps")


@dataclass
class RunMetrics:
    """What a run dir holds for a report."""

    name: str
    location: str
    """The run dir, secrets masked (for display)."""
    records: list[dict]
    """metrics.jsonl's records, in file order."""
    curve: list[dict]
    """One record per step in step order: after a restart, the records it made again replace the earlier ones."""
    restarts: list[int]
    """The first step logged after each restart."""
    byte_level: bool
    evals: list[dict]
    """The eval records (step, eval_loss), one per step in step order (a restart's repeats replace earlier
    ones)."""
    spec_yaml: str | None
    run_summary: dict | None


@dataclass
class Plot:
    file: str
    key: str
    title: str
    ylabel: str


def report(run_dir: str, out_dir: str | None = None) -> dict:
    """Write `report.html` and its PNGs into out_dir; return the run's summary (see `summarize`)."""
    run_dir = run_dir if is_uri(run_dir) else os.path.abspath(os.path.expanduser(run_dir))
    run = read_run(run_dir)
    if out_dir is None:
        out_dir = os.path.join(run_dir, "report") if not is_uri(run_dir) else f"{run.name}-report"
    out = Path(out_dir).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(run)
    plots = draw(run, out)
    (out / "report.html").write_text(html_page(run, summary, plots), encoding="utf-8")
    return {**summary, "report": str(out / "report.html"), "plots": [p.file for p in plots]}


def read_run(run_dir: str) -> RunMetrics:
    """metrics.jsonl (required), job.yaml and summary.json (when there) of a run dir."""
    path = join(run_dir, "metrics.jsonl")
    text = fs.read_text(path)
    if text is None:
        what = "does not exist" if fs.exists(run_dir) else "does not exist (nor does the run dir)"
        raise UserError(f"{redact(path)} {what}; {HOW_TO_GET_METRICS}")
    records = parse_records(text, redact(path))
    spec = _read_yaml(join(run_dir, "job.yaml"))
    curve, restarts = [], []
    evals = {r["step"]: r for r in records if "eval_loss" in r}  # a restart's repeat replaces the earlier
    records = [r for r in records if "loss" in r]
    if not records:
        raise UserError(f"{redact(path)} has no step records yet; the run appends one every run.log_every steps: "
                        "report again after the first log step")
    for rec in records:
        if curve and rec["step"] <= curve[-1]["step"]:
            restarts.append(rec["step"])
        while curve and curve[-1]["step"] >= rec["step"]:  # work lost to the restart
            curve.pop()
        curve.append(rec)
    base = split_query(run_dir)[0]
    name = (spec or {}).get("name") or base.rstrip("/").rsplit("/", 1)[-1]
    return RunMetrics(
        name=str(name), location=redact(run_dir), records=records, curve=curve, restarts=restarts,
        byte_level=_byte_level(spec), evals=[evals[k] for k in sorted(evals)],
        spec_yaml=redact(yaml.safe_dump(spec, sort_keys=False)) if spec else None,
        run_summary=_read_json(join(run_dir, "summary.json")),
    )


def parse_records(text: str, path: str) -> list[dict]:
    """The step records of a metrics.jsonl; a last line still being written is left out."""
    lines = text.splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines) and not text.endswith("\n"):
                break
            raise UserError(f"{path}, line {number}: not a JSON record ({e.msg}); remove or fix that line") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int) or not (
                "loss" in rec or "eval_loss" in rec):
            raise UserError(f"{path}, line {number}: not a step record (it needs step and loss, or eval_loss); "
                            "remove that line")
        records.append(rec)
    if not records:
        raise UserError(f"{path} has no records yet; the run appends one every run.log_every steps: "
                        "report again after the first log step")
    return records


def summarize(run: RunMetrics) -> dict:
    """Steps, first and last loss, mean throughput after the first record, restarts, logged wall time."""
    first, last = run.curve[0], run.curve[-1]
    steady = run.curve[1:] or run.curve  # the first window holds start-up work
    out = {
        "run": run.name,
        "run_dir": run.location,
        "records": len(run.records),
        "first_step": first["step"],
        "final_step": last["step"],
        "first_loss": first["loss"],
        "last_loss": last["loss"],
    }
    if run.evals:
        best = min(run.evals, key=lambda r: r["eval_loss"])
        out.update(first_eval_loss=run.evals[0]["eval_loss"], last_eval_loss=run.evals[-1]["eval_loss"],
                   best_eval_loss=best["eval_loss"], best_eval_step=best["step"])
    if run.byte_level:
        out["first_bits_per_byte"] = _bits(first["loss"])
        out["last_bits_per_byte"] = _bits(last["loss"])
    tokens = _mean(steady, "tokens_per_s")
    out["mean_tokens_per_s"] = tokens or None  # 0 for table data
    out["mean_samples_per_s"] = _mean(steady, "samples_per_s")
    out["restarts"] = len(run.restarts)
    out["restart_steps"] = run.restarts
    times = [r["time"] for r in run.records if isinstance(r.get("time"), int | float)]
    # not summary.json's wall_seconds (the last invocation, start-up included), shown beside it on the page
    out["logged_seconds"] = round(times[-1] - times[0], 3) if times else None
    return out


def format_summary(summary: dict) -> str:
    """The printed summary: a line about the run, a line naming the report."""
    parts = [f"{summary['run']}: step {summary['final_step']} ({plural(summary['records'], 'record')})",
             f"loss {summary['first_loss']:.4f} -> {summary['last_loss']:.4f}"]
    if "first_bits_per_byte" in summary:
        parts[-1] += f" (bits per byte {summary['first_bits_per_byte']:.3f} -> {summary['last_bits_per_byte']:.3f})"
    if "last_eval_loss" in summary:
        parts.append(f"eval loss {summary['first_eval_loss']:.4f} -> {summary['last_eval_loss']:.4f} (best "
                     f"{summary['best_eval_loss']:.4f} at step {summary['best_eval_step']})")
    if summary["mean_tokens_per_s"]:
        parts.append(f"{summary['mean_tokens_per_s']:,.0f} tokens/s")
    elif summary["mean_samples_per_s"]:
        parts.append(f"{summary['mean_samples_per_s']:,.0f} samples/s")
    if summary["restarts"]:
        steps = ", ".join(str(s) for s in summary["restart_steps"])
        parts.append(f"{plural(summary['restarts'], 'restart')} (logging again from step {steps})")
    if summary["logged_seconds"] is not None:
        parts.append(f"{format_duration(summary['logged_seconds'])} from the first record to the last")
    lines = [redact(", ".join(parts))]
    if "report" in summary:
        lines.append(f"report: {summary['report']} ({plural(len(summary['plots']), 'plot')})")
    return "\n".join(lines)


def plots_for(run: RunMetrics) -> list[Plot]:
    """The plots this run has data for, in page order."""
    by_tokens = any(r.get("tokens_per_s") for r in run.curve)
    candidates = [
        Plot("loss.png", "loss", "Loss", "loss (nats)"),
        Plot("throughput.png", "tokens_per_s" if by_tokens else "samples_per_s",
             "Throughput", "tokens/s" if by_tokens else "samples/s"),
        Plot("step_time.png", "step_time", "Step time", "seconds per step"),
        Plot("data_wait.png", "data_wait_fraction", "Data wait", "share of the time waiting for data"),
        Plot("lr.png", "lr", "Learning rate", "learning rate"),
        Plot("grad_norm.png", "grad_norm", "Gradient norm", "global norm before clipping"),
        Plot("mfu.png", "mfu", "Model FLOPs utilisation", "MFU"),
    ]
    return [p for p in candidates if any(_number(r.get(p.key)) for r in run.curve)]


def draw(run: RunMetrics, out: Path) -> list[Plot]:
    """One PNG per plot in out, through matplotlib's Agg canvas (no display, no pyplot state)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import PercentFormatter
    except ImportError:  # an optional dependency: only this command needs it
        raise UserError("shardrun report draws its plots with matplotlib, which is not installed; "
                        "pip install 'shardrun[report]'") from None
    steps = [r["step"] for r in run.curve]
    plots = plots_for(run)
    for plot in plots:
        fig = Figure(figsize=(8, 3.6), layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        values = [r.get(plot.key) if _number(r.get(plot.key)) else math.nan for r in run.curve]
        ax.plot(steps, values, marker="." if len(steps) <= 50 else None, label="training" if run.evals else None)
        if plot.key == "loss" and run.evals:
            ax.plot([r["step"] for r in run.evals], [r["eval_loss"] for r in run.evals], marker="o",
                    label="held-out (eval)")
        for i, step in enumerate(run.restarts):
            ax.axvline(step, color="0.5", linestyle="--", linewidth=1, label="restart" if i == 0 else None)
        if run.restarts or (plot.key == "loss" and run.evals):
            ax.legend(loc="best")
        if plot.key == "loss" and run.byte_level:
            ax.secondary_yaxis("right", functions=(_bits, lambda b: b * math.log(2))).set_ylabel("bits per byte")
        if plot.key == "data_wait_fraction":
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
            ax.set_ylim(bottom=0)
        ax.set(title=f"{run.name}: {plot.title}", xlabel="step", ylabel=plot.ylabel)
        ax.grid(alpha=0.3)
        fig.savefig(out / plot.file, dpi=100)
    return plots


def html_page(run: RunMetrics, summary: dict, plots: list[Plot]) -> str:
    """A self-contained page: the summary, the plots (relative links), summary.json, the resolved spec."""
    e = html.escape
    parts = [
        f"<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>shardrun report: "
        f"{e(run.name)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n<h1>{e(run.name)}</h1>",
        f"<p>From <code>{e(run.location)}</code>: {plural(len(run.records), 'record')} in metrics.jsonl.</p>",
        "<h2>Summary</h2>", _table(summary),
    ]
    parts += [f"<h2>{e(p.title)}</h2>\n<img src=\"{e(p.file)}\" alt=\"{e(p.title)} by step\">" for p in plots]
    if run.run_summary is not None:
        parts += ["<h2>summary.json</h2>", _table(run.run_summary)]
    if run.spec_yaml is not None:
        parts += ["<h2>Job spec (job.yaml)</h2>", f"<pre>{e(run.spec_yaml)}</pre>"]
    return "\n".join(parts) + "\n</body>\n</html>\n"


_CSS = ("body{font-family:system-ui,sans-serif;max-width:62rem;margin:2rem auto;padding:0 1rem;color:#222}"
        "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:.2rem .6rem;text-align:left}"
        "img{max-width:100%}pre{background:#f5f5f5;padding:1rem;overflow:auto}")


def _table(data: dict) -> str:
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(redact(_show(v)))}</td></tr>\n"
                   for k, v in data.items())
    return f"<table>\n{rows}</table>"


def _show(value: object) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, list):
        return ", ".join(_show(v) for v in value) or "none"
    return "" if value is None else str(value)


def _read_yaml(path: str) -> dict | None:
    text = fs.read_text(path)
    try:
        data = yaml.safe_load(text) if text is not None else None
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None


def _read_json(path: str) -> dict | None:
    text = fs.read_text(path)
    try:
        data = json.loads(text) if text is not None else None
    except json.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def _byte_level(spec: dict | None) -> bool:
    if not spec or not isinstance(spec.get("model"), dict):
        return False
    try:
        return ModelSpec.model_validate(spec["model"]).byte_level
    except ValidationError:
        return False


def _mean(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if _number(r.get(key))]
    return statistics.fmean(values) if values else None


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _bits(loss: float) -> float:
    return loss / math.log(2)


def main(argv: list[str] | None = None) -> int:
    """`python -m shardrun.report RUN [--out DIR]`: write the report and print its summary."""
    parser = argparse.ArgumentParser(prog="shardrun report", description=__doc__.splitlines()[0])
    parser.add_argument("run", metavar="RUN", help="a run name, looked up under --storage, or a run dir, "
                        "<checkpoint.storage>/<name>: a path or URI")
    parser.add_argument("--storage", metavar="DIR", default=None,
                        help="where a run name is looked up (default: the spec's default, ~/shardrun/runs)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="where report.html and its PNGs go (default: RUN/report; ./<name>-report for a URI)")
    args = parser.parse_args(argv)
    from shardrun.runs import resolve_run_dir

    try:
        print(format_summary(report(resolve_run_dir(args.run, args.storage), args.out)))
    except UserError as e:
        print(f"shardrun: error: {redact(str(e))}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
