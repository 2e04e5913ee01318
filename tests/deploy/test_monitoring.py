"""deploy/monitoring checked offline: promtool on the config, the rules and their unit tests; the dashboard's PromQL."""

from __future__ import annotations

import pytest
import yaml
from helpers import run
from monitoring_config import (
    COUNTERS,
    DASHBOARD,
    DATASOURCE_UID,
    GAUGES,
    GRAFANA,
    HISTOGRAMS,
    PROMETHEUS_CONFIG,
    PROMTOOL,
    RAY_METRICS,
    RULE_FILES,
    RULE_TESTS,
    alert_rules,
    contract_series,
    dashboard,
    dashboard_exprs,
    dashboard_panels,
    dashboard_queries,
    metric_names,
    recording_rules,
    render_prometheus_config,
    rule_exprs,
    selectors,
)

pytestmark = pytest.mark.timeout(60)

RULE_TEST_FILES = sorted(RULE_TESTS.glob("*.yml"))


@pytest.fixture(scope="module")
def promtool() -> str:
    if not PROMTOOL.exists():
        pytest.fail(f"promtool is not installed at {PROMTOOL}; run `make setup` (Debian's prometheus package)")
    return str(PROMTOOL)


def known_series() -> frozenset[str]:
    return contract_series() | set(recording_rules()) | set(RAY_METRICS)


# promtool


def test_prometheus_config_is_valid(promtool):
    out = run([promtool, "check", "config", str(PROMETHEUS_CONFIG)], timeout=30).stdout
    assert "SUCCESS" in out and "rule files found" in out


def test_rendered_config_is_valid_with_other_intervals_and_paths(promtool, tmp_path):
    path = render_prometheus_config(tmp_path / "prom", scrape_interval="1s", ray_sd_files=[str(tmp_path / "ray.json")],
                                    shardrun_sd_files=[str(tmp_path / "targets" / "*.json")])
    out = run([promtool, "check", "config", str(path)], timeout=30).stdout
    assert "SUCCESS: 2 rule files found" in out
    config = yaml.safe_load(path.read_text())
    assert config["global"] == {"scrape_interval": "1s", "evaluation_interval": "1s"}
    files = {job["job_name"]: job["file_sd_configs"][0]["files"] for job in config["scrape_configs"]}
    assert files == {"ray": [str(tmp_path / "ray.json")], "shardrun": [str(tmp_path / "targets" / "*.json")]}


def test_config_finds_ray_and_shardrun_through_their_discovery_files():
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["ray"]["file_sd_configs"] == [{"files": ["/tmp/ray/prom_metrics_service_discovery.json"]}]
    assert jobs["shardrun"]["file_sd_configs"] == [
        {"files": ["/tmp/ray/shardrun/targets/*.json"], "refresh_interval": "30s"}]
    assert config["global"]["scrape_interval"] == "15s"
    assert sorted(PROMETHEUS_CONFIG.parent / f for f in config["rule_files"]) == sorted(RULE_FILES)


@pytest.mark.parametrize("rule_file", RULE_FILES, ids=lambda p: p.name)
def test_rule_file_is_valid(promtool, rule_file):
    out = run([promtool, "check", "rules", str(rule_file)], timeout=30).stdout
    assert "SUCCESS" in out


@pytest.mark.parametrize("test_file", RULE_TEST_FILES, ids=lambda p: p.name)
def test_promtool_rule_unit_tests_pass(promtool, test_file):
    out = run([promtool, "test", "rules", str(test_file)], timeout=30).stdout
    assert "SUCCESS" in out


# The rules


def test_rules_read_only_contract_metrics_and_recorded_series():
    for expr in rule_exprs():
        names = metric_names(expr)
        assert names, expr
        assert names <= contract_series() | set(recording_rules()), (expr, names - contract_series())


def test_every_alert_has_a_for_a_severity_and_annotations_naming_the_run():
    rules = [rule for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]
             for rule in group["rules"] if "alert" in rule]
    assert {rule["alert"] for rule in rules} == {
        "ShardrunNoProgress", "ShardrunLossNotFinite", "ShardrunThroughputDrop", "ShardrunDataWaitHigh",
        "ShardrunRestarts"}
    for rule in rules:
        assert "for" in rule and rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        for key in ("summary", "description"):
            assert "{{ $labels.run }}" in rule["annotations"][key], (rule["alert"], key)


def _rule_tests() -> list[dict]:
    return [test for path in RULE_TEST_FILES for test in yaml.safe_load(path.read_text())["tests"]]


def test_every_alert_is_unit_tested_firing_and_quiet():
    firing, quiet = set(), set()
    for test in _rule_tests():
        for case in test.get("alert_rule_test", []):
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert firing == quiet == set(alert_rules())


def test_every_recording_rule_value_is_unit_tested():
    tested = set().union(*(metric_names(case["expr"])
                           for test in _rule_tests() for case in test.get("promql_expr_test", [])))
    assert set(recording_rules()) <= tested


# The dashboard


def test_dashboard_identity_and_run_variable():
    board = dashboard()
    assert board["uid"] == "shardrun" and board["schemaVersion"] >= 39
    variables = {v["name"]: v for v in board["templating"]["list"]}
    run_var = variables["run"]
    query = run_var["query"]["query"] if isinstance(run_var["query"], dict) else run_var["query"]
    assert run_var["type"] == "query" and run_var["datasource"]["uid"] == DATASOURCE_UID
    assert query.replace(" ", "") == "label_values(shardrun_steps_total,run)"


def test_every_panel_queries_prometheus_with_exprs_and_ref_ids():
    panels = dashboard_panels()
    assert len({p["id"] for p in dashboard()["panels"]}) == len(dashboard()["panels"])
    for panel in panels:
        assert panel["datasource"]["uid"] == DATASOURCE_UID, panel["title"]
        targets = panel["targets"]
        assert targets and all(t.get("expr") and t.get("refId") for t in targets), panel["title"]
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]
        assert all(t.get("datasource", {"uid": DATASOURCE_UID})["uid"] == DATASOURCE_UID for t in targets)


def test_dashboard_reads_only_known_series():
    for expr in dashboard_queries():
        names = metric_names(expr)
        assert names, expr
        assert names <= known_series(), (expr, names - known_series())


def test_every_shardrun_selector_of_the_dashboard_is_limited_to_the_run():
    for expr in dashboard_queries():
        for name, matchers in selectors(expr):
            if name.startswith("shardrun"):
                assert matchers.get("run=") == "$run", (expr, name)


def test_dashboard_and_rules_together_use_every_metric_of_the_contract():
    used = set().union(*(metric_names(expr) for expr in [*dashboard_queries(), *rule_exprs()]))
    for name in (*COUNTERS, *GAUGES):
        assert name in used, name
    for name in HISTOGRAMS:
        assert {f"{name}_bucket", f"{name}_sum"} & used, name


def test_dashboard_has_the_panels_an_engineer_looks_for():
    titles = " | ".join(p["title"].lower() for p in dashboard_panels())
    for word in ("throughput", "loss", "learning rate", "grad norm", "step time", "data wait", "mfu",
                 "checkpoint", "restarts", "world size", "queue depth", "slowest rank", "gpu utilisation",
                 "gpu memory"):
        assert word in titles, word


def test_dashboard_exprs_are_ready_for_prometheus():
    exprs = dashboard_exprs("tiny")
    assert len(exprs) == sum(len(panel["targets"]) for panel in dashboard_panels())
    assert len(dashboard_exprs("tiny", annotations=True)) == len(dashboard_queries()) > len(exprs)
    assert not any("$" in expr for expr in dashboard_exprs("tiny", annotations=True))
    assert 'shardrun:tokens_per_second:rate1m{run="tiny"}' in exprs
    assert 'sum(rate(shardrun_samples_total{run="tiny"}[1m]))' in exprs


def test_dashboard_exprs_parse(promtool, tmp_path):
    # promtool has no offline query check; a rule file of the expressions makes `check rules` parse them.
    exprs = dashboard_exprs("tiny", annotations=True)
    rules = [{"record": f"dashboard:expr_{i}", "expr": expr} for i, expr in enumerate(exprs)]
    path = tmp_path / "dashboard-exprs.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    out = run([promtool, "check", "rules", str(path)], timeout=30).stdout
    assert f"SUCCESS: {len(rules)} rules found" in out


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards():
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = sources["datasources"]
    assert (source["type"], source["uid"], source["url"]) == ("prometheus", DATASOURCE_UID, "http://127.0.0.1:9090")
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "shardrun.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].endswith("/shardrun")
    assert DASHBOARD.parent.name == "dashboards"


# The PromQL reader the checks above rely on


@pytest.mark.parametrize(("expr", "expected"), [
    ('sum by (run, le) (rate(shardrun_step_duration_seconds_bucket{run="a", le=~"1|2"}[5m]))',
     [("shardrun_step_duration_seconds_bucket", {"run=": "a", "le=~": "1|2"})]),
    ("max by (run) (shardrun_job_state{state=\"running\"}) == 1 unless on (run) "
     "sum by (run) (rate(shardrun_steps_total[2m])) > 0",
     [("shardrun_job_state", {"state=": "running"}), ("shardrun_steps_total", {})]),
    ("(shardrun_loss != shardrun_loss) or (abs(shardrun_loss) == +Inf)",
     [("shardrun_loss", {})] * 3),
    ('label_replace(up{job="x}"}, "ip", "$1", "node", "(.*)") * on (ip) group_left (GpuIndex) '
     "ray_node_gram_used offset 5m",
     [("up", {"job=": "x}"}), ("ray_node_gram_used", {})]),
    ("shardrun:tokens_per_second:rate1m < 0.5 * avg_over_time(shardrun:tokens_per_second:rate1m[1h:1m])",
     [("shardrun:tokens_per_second:rate1m", {})] * 2),
    ('topk by (run) (1, x{run="$run"}) / ignoring(rank) sum without (rank) (rate(y[$__rate_interval]))',
     [("x", {"run=": "$run"}), ("y", {})]),
    ('1e3 * vector(1) + count({__name__=~"shardrun_.*"})', []),
])
def test_selectors_reads_promql(expr, expected):
    assert selectors(expr) == expected
