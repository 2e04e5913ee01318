"""A real Prometheus (Debian's package, from make setup) with deploy/monitoring's configuration scrapes a
real 2-rank run found through shardrun's file_sd target file; every dashboard query and rule works."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.parse
import urllib.request

import pytest
from helpers import child_env, free_port, kill_group, tiny_spec, write_spec
from monitoring_config import ABSENT_ON_CPU, PROMETHEUS, PROMTOOL, dashboard_exprs, render_prometheus_config

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


class Prometheus:
    def __init__(self, config, workdir):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / "prometheus.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(PROMETHEUS), f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)

    def query(self, expr: str) -> list:
        data = _get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert data["status"] == "success", (expr, data)
        return data["data"]["result"]

    def wait_for(self, expr: str, count: int, timeout: float = 120) -> list:
        deadline = time.time() + timeout
        while True:
            try:
                result = self.query(expr)
                if len(result) >= count:
                    return result
            except OSError:
                pass  # not up yet
            if time.time() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"{expr}: fewer than {count} series after {timeout} s; see prometheus.log")
            time.sleep(1)

    def stop(self) -> None:
        kill_group(self.proc, grace=5)
        self.log.close()


def test_prometheus_finds_every_rank_and_every_panel_and_rule_has_data(tmp_path, corpus):
    spec = tiny_spec(corpus, tmp_path / "runs", run={"max_steps": 1_000_000, "log_every": 5},
                     checkpoint={"every_steps": 40, "keep": 1}, metrics={"peak_flops": 1e11},
                     eval={"paths": [str(corpus)], "every_steps": 10, "max_batches": 2})
    targets = tmp_path / "runs" / "targets"
    targets.mkdir(parents=True)  # Prometheus watches the folder from its start (the head node's bootstrap makes it)
    config = render_prometheus_config(tmp_path / "prom", scrape_interval="1s",
                                      ray_sd_files=[str(tmp_path / "no-ray.json")],
                                      shardrun_sd_files=[str(targets / "*.json")])
    subprocess.run([str(PROMTOOL), "check", "config", str(config)], check=True, capture_output=True)
    prom = Prometheus(config, tmp_path)
    job = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--master-addr=127.0.0.1",
         f"--master-port={free_port()}", "-m", "shardrun", "train", str(write_spec(tmp_path / "job.yaml", spec))],
        stdout=open(tmp_path / "job.log", "w"), stderr=subprocess.STDOUT, env=child_env(),  # noqa: SIM115
        start_new_session=True)
    try:
        up = prom.wait_for('up{job="shardrun", run="tiny"} == 1', 3)
        assert sorted(s["metric"].get("rank", "driver") for s in up) == ["0", "1", "driver"]
        # every rank's own series, with a checkpoint saved and rates over several scrapes
        prom.wait_for('shardrun_checkpoint_save_seconds_count{run="tiny"} > 0', 2)
        prom.wait_for('count_over_time(shardrun_steps_total{run="tiny"}[1m]) >= 4', 2)
        prom.wait_for('shardrun:tokens_per_second:rate1m{run="tiny"}', 1, timeout=30)
        prom.wait_for('shardrun_eval_loss{run="tiny"} > 0', 2, timeout=30)  # the held-out loss, on each rank

        empty = []
        for expr in dashboard_exprs("tiny"):
            if not prom.query(expr) and not any(name in expr for name in ABSENT_ON_CPU):
                empty.append(expr)
        assert not empty, f"dashboard queries without data: {empty}"

        rules = _get(f"{prom.url}/api/v1/rules")["data"]["groups"]
        checked = 0
        for group in rules:
            for rule in group["rules"]:
                assert rule["health"] == "ok", (rule["name"], rule.get("lastError"))
                if rule["type"] == "recording":
                    assert prom.query(rule["name"]), f"recording rule {rule['name']} has no data"
                checked += 1
        assert checked >= 10
        assert job.poll() is None, (tmp_path / "job.log").read_text()[-3000:]
    finally:
        kill_group(job, grace=10)
        prom.stop()
    # a killed run leaves its target file; a run that ends removes it (tests/unit/test_metrics.py)
