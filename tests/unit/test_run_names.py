"""Run names where run dirs go: `report`, `checkpoints`, `export` and `generate` take a run's name, looked up under
--storage (default: the spec's default storage), or a run dir as a path or URI; `shardrun --version`."""

import json
import os
import stat
from importlib import metadata

import pytest
from helpers import commit, write_checkpoint

import shardrun
from shardrun import cli
from shardrun.runs import resolve_run_dir


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set the process's umask for a test; the old one comes back after it."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def _run(storage, name, *, step=4):
    """A run dir with a checkpoint and two metrics records."""
    run = storage / name
    write_checkpoint(run / f"checkpoint_{step:08d}", step, world=1, ranks=(0,))
    (run / "job.yaml").write_text(f"name: {name}\n")
    (run / "metrics.jsonl").write_text("".join(
        json.dumps({"time": float(s), "step": s, "loss": 4.0 / s, "lr": 1e-3, "tokens_per_s": 100.0,
                    "samples_per_s": 4.0, "step_time": 0.1, "data_wait_fraction": 0.0}) + "\n" for s in (1, 2)))
    return run


def test_checkpoints_takes_a_name_under_storage_and_says_which_run_dir(tmp_path, capsys):
    storage = tmp_path / "runs"
    run = _run(storage, "tiny")
    _run(storage, "other")
    assert cli.main(["checkpoints", "tiny", "--storage", str(storage)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("step        4") and "complete" in out and str(run / "checkpoint_00000004") in out
    assert err == f"[shardrun] run dir: {run}\n"

    assert cli.main(["checkpoints", str(run)]) == 0  # a path: as it is, and nothing said
    assert capsys.readouterr() == (out, "")
    assert cli.main(["checkpoints", f"file://{run}"]) == 0  # a URI too
    uri_out, err = capsys.readouterr()
    assert "step        4" in uri_out and err == ""


def test_a_folder_here_of_that_name_is_a_path(tmp_path, monkeypatch, capsys):
    storage = tmp_path / "runs"
    _run(storage, "tiny")
    monkeypatch.chdir(storage)
    assert cli.main(["checkpoints", "tiny", "--storage", str(tmp_path / "elsewhere")]) == 0
    assert "complete" in capsys.readouterr().out
    assert resolve_run_dir("tiny", "/nowhere") == "tiny"
    assert resolve_run_dir("abfs://c@acct.dfs.core.windows.net/runs/tiny", "/nowhere") == \
        "abfs://c@acct.dfs.core.windows.net/runs/tiny"


def test_a_missing_name_lists_the_runs_there(tmp_path, capsys):
    storage = tmp_path / "runs"
    _run(storage, "tiny")
    _run(storage, "gpt.replaced-20250102-030405")
    assert cli.main(["checkpoints", "tinny", "--storage", str(storage)]) == cli.EXIT_USER_ERROR
    err = capsys.readouterr().err
    assert err == (f"shardrun: error: no run named tinny in {storage} (RUN is a run name under --storage DIR, or a "
                   "run dir's path or URI); runs there: gpt.replaced-20250102-030405, tiny\n")
    (tmp_path / "empty").mkdir()
    assert cli.main(["report", "tiny", "--storage", str(tmp_path / "empty")]) == cli.EXIT_USER_ERROR
    assert "there are no runs there" in capsys.readouterr().err
    assert cli.main(["export", "tiny", "--storage", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert f"no run named tiny: {tmp_path / 'nope'} does not exist" in capsys.readouterr().err


def test_report_takes_a_name_under_the_default_storage(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))  # the default storage is ~/shardrun/runs
    run = _run(tmp_path / "shardrun/runs", "tiny")
    monkeypatch.chdir(tmp_path)
    assert cli.main(["report", "tiny"]) == 0
    out, err = capsys.readouterr()
    assert err == f"[shardrun] run dir: {run}\n"
    assert f"report: {run / 'report' / 'report.html'}" in out and (run / "report/loss.png").is_file()


def _gpt_run(storage):
    """A run of a tiny byte-level GPT with a ZeRO 0 checkpoint that export loads for real."""
    import torch

    from shardrun.config import ModelSpec
    from shardrun.trainer.models import gpt_config
    from shardrun.trainer.models.gpt import GPT

    run = storage / "tiny"
    folder = write_checkpoint(run / "checkpoint_00000004", 4, world=1, ranks=(0,), stage=0)
    (run / "job.yaml").write_text("name: tiny\nmodel: {n_layer: 1, n_head: 1, n_embd: 8, block_size: 8}\n")
    torch.manual_seed(0)
    model = GPT(gpt_config(ModelSpec(n_layer=1, n_head=1, n_embd=8, block_size=8)))
    torch.save({"module": model.state_dict()}, folder / "global_step4/mp_rank_00_model_states.pt")
    commit(folder)
    return run


@pytest.mark.parametrize(("mask", "folder_mode", "file_mode"), [(0o022, 0o755, 0o644), (0o007, 0o770, 0o660)])
def test_export_and_generate_by_name_and_the_export_follows_the_umask(tmp_path, monkeypatch, capsys, umask, mask,
                                                                       folder_mode, file_mode):
    storage = tmp_path / "runs"
    run = _gpt_run(storage)
    umask(mask)
    out = tmp_path / "export"
    assert cli.main(["export", "tiny", "--storage", str(storage), "--out", str(out)]) == 0
    assert capsys.readouterr().err == f"[shardrun] run dir: {run}\n"
    assert _mode(out) == folder_mode  # not mkdtemp's 0700
    assert {p.name: _mode(p) for p in out.iterdir()} == {"model.safetensors": file_mode, "config.json": file_mode}
    assert cli.main(["export", "tiny", "--storage", str(storage), "--out", str(out), "--dtype", "bf16"]) == 0
    assert _mode(out) == folder_mode and _mode(out / "model.safetensors") == file_mode  # a replaced export too
    capsys.readouterr()

    args = ["--prompt", "ab", "--tokens", "3"]
    assert cli.main(["generate", "tiny", "--storage", str(storage), *args]) == 0
    out_text, err = capsys.readouterr()
    assert out_text.startswith("ab") and f"[shardrun] run dir: {run}\n" in err
    monkeypatch.chdir(tmp_path)
    assert cli.main(["generate", "export", "--storage", str(storage), *args]) == 0  # an export folder here
    out_text, err = capsys.readouterr()
    assert out_text.startswith("ab") and "run dir" not in err


def test_version(capsys, monkeypatch):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out == f"shardrun {metadata.version('shardrun')}\n"

    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    assert cli.version() == f"shardrun {shardrun.__version__}"

