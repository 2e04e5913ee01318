"""deploy/monitoring read for tests: the metric contract, the rules' and the dashboard's PromQL, a rendered config.

tests/deploy checks the configuration offline with promtool; the integration tests import `dashboard_exprs`,
`rule_exprs` and `render_prometheus_config` to run the same expressions against a live Prometheus.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
MONITORING = REPO / "deploy" / "monitoring"
PROMETHEUS_CONFIG = MONITORING / "prometheus.yml"
RULES = MONITORING / "rules"
RULE_FILES = (RULES / "shardrun-recording.yml", RULES / "shardrun-alerts.yml")
RULE_TESTS = RULES / "tests"
GRAFANA = MONITORING / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "shardrun.json"
DATASOURCE_UID = "prometheus"
# Debian's prometheus package, unpacked by `make setup`.
PROMETHEUS_BIN = REPO / ".tools" / "prometheus" / "usr" / "bin"
PROMETHEUS = PROMETHEUS_BIN / "prometheus"
PROMTOOL = PROMETHEUS_BIN / "promtool"

COUNTERS = (
    "shardrun_tokens_total", "shardrun_samples_total", "shardrun_steps_total", "shardrun_skipped_steps_total",
    "shardrun_data_skipped_files_total", "shardrun_data_skipped_row_groups_total", "shardrun_job_restarts_total",
)
GAUGES = (
    "shardrun_loss", "shardrun_eval_loss", "shardrun_learning_rate", "shardrun_grad_norm", "shardrun_loss_scale",
    "shardrun_mfu_ratio",
    "shardrun_device_memory_allocated_bytes", "shardrun_device_memory_reserved_bytes",
    "shardrun_device_memory_peak_bytes", "shardrun_world_size",
    "shardrun_data_queue_depth", "shardrun_data_buffered_bytes", "shardrun_step", "shardrun_job_state",
    "shardrun_job_workers",
)
HISTOGRAMS = (
    "shardrun_step_duration_seconds", "shardrun_data_wait_seconds", "shardrun_checkpoint_save_seconds",
    "shardrun_checkpoint_load_seconds",
)
# Ray's node metrics that the dashboard shows (ray_node_gram_used is in MiB, whatever its HELP says).
RAY_METRICS = ("ray_node_gpus_utilization", "ray_node_gram_used")
# Series that a CPU run does not export: the integration tests expect these expressions to come back empty.
ABSENT_ON_CPU = ("shardrun_mfu_ratio", "shardrun_loss_scale", "shardrun_device_memory_allocated_bytes",
                 "shardrun_device_memory_reserved_bytes", "shardrun_device_memory_peak_bytes", *RAY_METRICS)


def contract_series() -> frozenset[str]:
    """Every series name shardrun exports, as Prometheus stores it (histograms as _bucket, _sum, _count)."""
    parts = [f"{h}_{suffix}" for h in HISTOGRAMS for suffix in ("bucket", "sum", "count")]
    return frozenset((*COUNTERS, *GAUGES, *parts))


def _rules(kind: str) -> dict[str, str]:
    out = {}
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            out.update({rule[kind]: rule["expr"] for rule in group["rules"] if kind in rule})
    return out


def recording_rules() -> dict[str, str]:
    """Recorded series name -> expression, from the rule files."""
    return _rules("record")


def alert_rules() -> dict[str, str]:
    """Alert name -> expression, from the rule files."""
    return _rules("alert")


def rule_exprs() -> list[str]:
    """Every expression of the rule files, recording rules first (each one can be evaluated as a query)."""
    return [*recording_rules().values(), *alert_rules().values()]


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_panels() -> list[dict]:
    """The panels that query (rows left out, the panels of collapsed rows included)."""
    panels = []
    for panel in dashboard()["panels"]:
        panels.extend(panel.get("panels", []) if panel["type"] == "row" else [panel])
    return panels


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the dashboard as written, Grafana variables in: panels, then annotations."""
    exprs = [target["expr"] for panel in dashboard_panels() for target in panel["targets"]]
    exprs += [a["expr"] for a in dashboard()["annotations"]["list"] if "expr" in a]
    return exprs


def dashboard_exprs(run: str, *, annotations: bool = False) -> list[str]:
    """The panels' expressions as Prometheus receives them for one run ($__rate_interval as 1m).

    Annotation queries (events such as a restart: empty while nothing happens) only when asked for.
    """
    panel_count = sum(len(panel["targets"]) for panel in dashboard_panels())
    exprs = dashboard_queries() if annotations else dashboard_queries()[:panel_count]
    return [expr.replace("$__rate_interval", "1m").replace("${run}", run).replace("$run", run) for expr in exprs]


def render_prometheus_config(dest: Path, *, scrape_interval: str = "15s", evaluation_interval: str | None = None,
                             ray_sd_files: list[str] | None = None,
                             shardrun_sd_files: list[str] | None = None) -> Path:
    """A copy of prometheus.yml in `dest`, with the rule files next to it, intervals and file_sd paths replaced."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"]["scrape_interval"] = scrape_interval
    config["global"]["evaluation_interval"] = evaluation_interval or scrape_interval
    files = {"ray": ray_sd_files, "shardrun": shardrun_sd_files}
    for job in config["scrape_configs"]:
        if files.get(job["job_name"]) is not None:
            job["file_sd_configs"][0]["files"] = [str(f) for f in files[job["job_name"]]]
    dest.mkdir(parents=True, exist_ok=True)
    for rule_file in config["rule_files"]:
        (dest / rule_file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PROMETHEUS_CONFIG.parent / rule_file, dest / rule_file)
    path = dest / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


_TOKEN = re.compile(r"""
    (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<range>\[[^\]]*\])
  | (?P<variable>\$\w+|\$\{[^}]*\})
  | (?P<ident>[A-Za-z_:][\w:]*)
  | (?P<number>\.?\d[\w.]*)
  | (?P<punct>\S)
""", re.VERBOSE)
# Words that are not series names even when no "(" follows them (aggregations may put `by (...)` first).
_KEYWORDS = frozenset("""
    and or unless by without on ignoring group_left group_right offset bool atan2 inf nan
    sum min max avg group stddev stdvar count count_values bottomk topk quantile
""".split())
_LABEL_LISTS = frozenset(("by", "without", "on", "ignoring", "group_left", "group_right"))


def _closing(tokens: list[tuple[str, str]], i: int, open_: str, close: str) -> int:
    """The index of the token that closes the bracket at tokens[i]."""
    depth = 0
    for j in range(i, len(tokens)):
        depth += (tokens[j][1] == open_) - (tokens[j][1] == close)
        if depth == 0:
            return j
    raise ValueError(f"unbalanced {open_!r} in PromQL")


def _matchers(tokens: list[tuple[str, str]]) -> dict[str, str]:
    """{label: value} of the tokens between a selector's braces (the operator folded into the key: 'run=')."""
    out, label, op = {}, None, ""
    for kind, text in tokens:
        if kind == "ident" and label is None:
            label, op = text, ""
        elif kind == "punct" and text != ",":
            op += text
        elif kind == "string" and label is not None:
            out[label + op] = text[1:-1]
            label = None
    return out


def selectors(expr: str) -> list[tuple[str, dict[str, str]]]:
    """The series selectors of a PromQL expression: (metric name, {label + operator: value}), in order.

    A small lexer rather than one regex: strings, ranges and label lists (`by (run)`, `on (ip)`) are skipped,
    names followed by "(" are functions, so `shardrun_loss != shardrun_loss` and `x{a="}"}` come out right.
    Selectors without a metric name (`{__name__=~"..."}`) are not reported.
    """
    tokens = [(m.lastgroup, m.group()) for m in _TOKEN.finditer(expr)]
    found, i = [], 0
    while i < len(tokens):
        kind, text = tokens[i]
        following = tokens[i + 1][1] if i + 1 < len(tokens) else ""
        if text == "{":
            i = _closing(tokens, i, "{", "}")
        elif kind == "ident" and text.lower() in _LABEL_LISTS and following == "(":
            i = _closing(tokens, i + 1, "(", ")")
        elif kind == "ident" and following != "(" and text.lower() not in _KEYWORDS:
            matchers = {}
            if following == "{":
                end = _closing(tokens, i + 1, "{", "}")
                matchers, i = _matchers(tokens[i + 2:end]), end
            found.append((text, matchers))
        i += 1
    return found


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression reads."""
    return {name for name, _ in selectors(expr)}
