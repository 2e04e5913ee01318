"""A deterministic error met by the workers (here: a corrupt row group) ends a `shardrun run` at once with its
own message, even with failure.max_failures: -1, which would otherwise restart the group for good."""

import json
import shutil
import sys

import pyarrow.parquet as pq
import pytest
from datagen import corrupt_row_group
from helpers import child_env, run, tiny_spec, write_spec

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_a_bad_row_group_met_mid_run_ends_the_run_once_whatever_max_failures(tmp_path, corpus):
    data = tmp_path / "corpus"
    shutil.copytree(corpus, data)
    for path in sorted(data.glob("*.parquet")):
        for group in range(1, pq.read_metadata(path).num_row_groups):  # the footers stay readable
            corrupt_row_group(path, group)
    spec = write_spec(tmp_path / "job.yaml", tiny_spec(data, tmp_path / "runs", run={"max_steps": 50},
                                                         failure={"max_failures": -1}))
    done = run([sys.executable, "-m", "shardrun", "run", str(spec)], timeout=240, env=child_env(), check=False)
    out = done.stdout
    assert done.returncode == 2, out[-4000:]
    assert "shardrun: error: " in out and "cannot be read" in out and "row group" in out, out[-4000:]
    assert "restart 1" not in out, out[-4000:]  # the group was not started again


def test_a_crash_at_the_same_step_in_every_attempt_ends_the_run_at_the_limit(tmp_path, corpus):
    spec = write_spec(tmp_path / "job.yaml", tiny_spec(
        corpus, tmp_path / "runs", run={"max_steps": 20},
        failure={"max_failures": -1, "same_failure_limit": 2, "scheduled_events": "off"}))
    done = run([sys.executable, "-m", "shardrun", "run", str(spec)], timeout=240, check=False,
               env=child_env(SHARDRUN_FAULT="crash:step=3:rank=1"))
    out = done.stdout
    assert done.returncode == 1, out[-4000:]
    assert ("shardrun: RepeatedFailure: rank 1 failed after step 3 in 2 attempts of the worker group with the same "
            "error, RuntimeError: injected crash (SHARDRUN_FAULT) after step 3 on rank 1") in out, out[-4000:]
    assert "restart 1" in out and "restart 2" not in out, out[-4000:]
    # the retried failure is said on the console with its rank, Ray's traceback kept off it
    assert ("[shardrun] rank 1 failed after step 3: RuntimeError: injected crash (SHARDRUN_FAULT) after step 3 on "
            "rank 1") in out and "Traceback" not in out, out[-4000:]
    summary = json.loads((tmp_path / "runs" / "tiny" / "summary.json").read_text())
    assert summary["error"].startswith("RepeatedFailure: rank 1 failed after step 3"), summary
