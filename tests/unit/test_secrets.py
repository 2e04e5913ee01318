"""Storage secrets (SAS signatures, keys) never reach what shardrun writes or prints: the run dir's job.yaml,
`shardrun check`, a failed run's state in `shardrun runs`."""

import json

from helpers import tiny_spec, write_spec

from shardrun import cli, fs
from shardrun.config import parse
from shardrun.driver.run_dir import prepare_run_dir
from shardrun.runs import list_runs

SAS = "sv=2024-08-04&sp=rl&sig=c2VjcmV0%2Fc2ln"


def test_the_saved_job_spec_and_check_mask_storage_secrets(tmp_path, capsys, corpus, azurite):
    """The run dir on a blob store (Azurite on 127.0.0.1) named with a SAS: `check` looks there too (a resume)."""
    storage = azurite.uri("runs")
    assert "sig=" in storage
    raw = tiny_spec(corpus, storage)
    prepare_run_dir(parse(raw), fresh=False, emit=print)
    saved = fs.read_text(fs.join(storage, "tiny", "job.yaml"))
    secret = storage.split("sig=", 1)[1].split("&")[0]
    assert "sig=***" in saved and secret not in saved
    assert cli.main(["check", str(write_spec(tmp_path / "job.yaml", raw))]) == 0
    captured = capsys.readouterr()
    assert "sig=***" in captured.out and secret not in captured.out + captured.err


def test_a_failed_runs_error_is_masked_in_the_listing(tmp_path):
    run = tmp_path / "runs/tiny"
    run.mkdir(parents=True)
    (run / "job.yaml").write_text("name: tiny\n")
    (run / "summary.json").write_text(json.dumps({"error": f"OSError: abfs://data@acct/x?{SAS}: 403"}))
    [found] = list_runs(str(tmp_path / "runs"))
    assert found["state"] == "failed: OSError: abfs://data@acct/x?sv=2024-08-04&sp=rl&sig=***: 403"
