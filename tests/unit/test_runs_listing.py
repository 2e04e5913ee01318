"""shardrun runs: the run dirs of a storage location, each with a state read honestly from its files."""

import json
import os
import time

import pytest
from helpers import write_checkpoint

from shardrun import cli
from shardrun.errors import UserError
from shardrun.runs import format_table, list_runs


def _checkpoint(folder, step, *, complete=True):
    return write_checkpoint(folder, step, world=1, ranks=(0,), tag=complete)


def _run(storage, name, *, steps=(), summary=None, age=0.0):
    """A run dir: job.yaml, a metrics.jsonl row per step (loss 10/step), summary.json when given; every file
    dated `age` seconds ago, summary.json a second after the metrics."""
    run = storage / name
    run.mkdir(parents=True)
    (run / "job.yaml").write_text(f"name: {name}\n")
    metrics = run / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"time": 0, "step": s, "loss": 10 / s}) + "\n" for s in steps))
    if summary is not None:
        (run / "summary.json").write_text(summary if isinstance(summary, str) else json.dumps(summary))
    then = time.time() - age
    for path, at in ((run / "job.yaml", then - 1), (metrics, then - 1), (run / "summary.json", then)):
        if path.exists():
            os.utime(path, (at, at))
    return run


def _by_name(storage):
    return {r["name"]: r for r in list_runs(str(storage))}


def test_states_steps_losses_and_checkpoints_come_from_the_files(tmp_path):
    done = _run(tmp_path, "done", steps=(1, 10, 20), age=3600,
                summary={"start_step": 0, "final_step": 20, "steps": 20, "last_loss": 0.5, "finished": True})
    _checkpoint(done / "checkpoint_00000010", 10)
    _checkpoint(done / "checkpoint_00000020", 20, complete=False)
    halted = _run(tmp_path, "halted", steps=(1, 8), age=3600,
                  summary={"final_step": 8, "last_loss": 1.25, "finished": False, "stopped": "SIGTERM"})
    _checkpoint(halted / "checkpoints/step_00000008", 8)
    (halted / "checkpoints/latest").write_text("step_00000008")
    _run(tmp_path, "failed", steps=(1,), age=3600,
         summary={"final_step": 1, "finished": False, "error": "RuntimeError: NCCL timeout\ntraceback..."})
    _run(tmp_path, "cut-off", steps=(1, 5), age=3600)
    _run(tmp_path, "going", steps=(1, 5))

    runs = _by_name(tmp_path)
    assert list(runs) == ["cut-off", "done", "failed", "going", "halted"]
    assert {n: r["state"] for n, r in runs.items()} == {
        "done": "finished", "halted": "stopped (SIGTERM)", "failed": "failed: RuntimeError: NCCL timeout",
        "cut-off": "interrupted", "going": "running"}
    assert (runs["done"]["step"], runs["done"]["loss"], runs["done"]["checkpoint"]) == (20, 0.5, 10)
    assert (runs["halted"]["step"], runs["halted"]["loss"], runs["halted"]["checkpoint"]) == (8, 1.25, 8)
    assert runs["cut-off"]["checkpoint"] is None and runs["cut-off"]["step"] == 5
    assert runs["done"]["modified"].endswith("+00:00") and not runs["done"]["moved_aside"]


def test_a_summary_older_than_the_metrics_belongs_to_an_earlier_invocation(tmp_path):
    run = _run(tmp_path, "resumed", steps=(1, 8), age=3600, summary={"final_step": 8, "finished": False})
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 9, "loss": 0.9}) + "\n" + '{"step": 10, "lo')  # the last line half written
    assert _by_name(tmp_path)["resumed"] | {"modified": None} == {
        "name": "resumed", "run_dir": str(run), "state": "running", "moved_aside": False, "step": 9, "loss": 0.9,
        "checkpoint": None, "modified": None}


def test_corrupt_files_are_named_in_the_state_and_do_not_stop_the_listing(tmp_path):
    _run(tmp_path, "bad-summary", steps=(1, 4), summary='{"final_step": 4, "fini')
    _run(tmp_path, "list-summary", summary="[1, 2]")
    bad_metrics = _run(tmp_path, "bad-metrics", summary={"finished": True})
    (bad_metrics / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\nnot json\n')
    _run(tmp_path, "fine", steps=(1,), summary={"finished": True})
    runs = _by_name(tmp_path)
    assert runs["bad-summary"]["state"].startswith("unreadable: summary.json: not JSON (")
    assert runs["bad-summary"]["step"] == 4  # what could be read is still shown
    assert runs["list-summary"]["state"] == "unreadable: summary.json: a JSON list, not an object"
    assert runs["bad-metrics"]["state"].startswith("unreadable: metrics.jsonl: the last line is not JSON")
    assert runs["fine"]["state"] == "finished"


def test_folders_that_are_no_runs_are_skipped_and_moved_aside_runs_marked(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    (tmp_path / "stray.txt").write_text("x")
    _checkpoint(tmp_path / "only-checkpoints" / "checkpoint_00000003", 3)
    _run(tmp_path, "gpt.replaced-20250102-030405", steps=(1,), age=3600, summary={"finished": True})
    runs = _by_name(tmp_path)
    assert list(runs) == ["gpt.replaced-20250102-030405", "only-checkpoints"]
    assert runs["gpt.replaced-20250102-030405"]["moved_aside"]
    assert runs["only-checkpoints"]["checkpoint"] == 3 and runs["only-checkpoints"]["step"] is None
    table = format_table(list(runs.values()))
    assert "finished, moved aside" in table


def test_missing_storage_a_file_or_a_run_dir_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=f"{tmp_path / 'nope'} does not exist"):
        list_runs(str(tmp_path / "nope"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        list_runs(str(tmp_path / "file"))
    run = _run(tmp_path, "one", steps=(1,))
    with pytest.raises(UserError, match="is a run dir: STORAGE is the folder above it"):
        list_runs(str(run))
    assert cli.main(["runs", str(tmp_path / "nope")]) == cli.EXIT_USER_ERROR


def test_the_table_is_aligned_and_json_parses(tmp_path, capsys):
    _run(tmp_path, "a", steps=(1, 100), age=7200, summary={"final_step": 100, "last_loss": 0.1, "finished": True})
    _run(tmp_path, "longer-name", steps=(1, 5), age=3600)
    assert cli.main(["runs", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["NAME", "STATE", "STEP", "LOSS", "CHECKPOINT", "AGE"]
    assert lines[1].split() == ["a", "finished", "100", "0.1000", "-", "2h"]
    assert lines[2].split() == ["longer-name", "interrupted", "5", "2.0000", "-", "1h"]
    assert len({len(line) for line in lines}) == 1  # the last column is right-aligned: every line as long
    assert lines[0].index("STEP") + len("STEP") == lines[1].index(" 100 ") + len(" 100")
    assert cli.main(["runs", str(tmp_path), "--json"]) == 0
    parsed = json.loads(capsys.readouterr().out)
    assert [(r["name"], r["state"], r["step"]) for r in parsed] == [("a", "finished", 100),
                                                                    ("longer-name", "interrupted", 5)]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["runs", str(empty)]) == 0
    assert capsys.readouterr().out == f"{empty}: no runs\n"


def test_a_long_metrics_file_is_read_from_its_end(tmp_path):
    _run(tmp_path, "long", steps=range(1, 5001), age=3600, summary={"final_step": 5000, "finished": True})
    assert (tmp_path / "long" / "metrics.jsonl").stat().st_size > 2 * 64 * 1024
    run = _by_name(tmp_path)["long"]
    assert (run["state"], run["step"], run["loss"]) == ("finished", 5000, 10 / 5000)


def test_a_run_whose_last_records_are_evaluations_shows_its_last_step_record(tmp_path):
    run = _run(tmp_path, "evaluated", steps=(10, 20), age=3600, summary={"final_step": 20, "finished": True})
    with (run / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"time": 0, "step": 20, "eval_loss": 1.5, "eval_tokens": 100}) + "\n")
    at = (run / "summary.json").stat().st_mtime - 1  # written before the summary, as a run writes them
    os.utime(run / "metrics.jsonl", (at, at))
    listed = _by_name(tmp_path)["evaluated"]
    assert (listed["state"], listed["step"], listed["loss"]) == ("finished", 20, 10 / 20)


def test_prune_replaced_keeps_the_newest_n_moved_aside_runs_of_each_name(tmp_path, capsys):
    stamps = [f"2025010{d}-000000" for d in range(1, 6)]
    for stamp in stamps:
        _run(tmp_path, f"gpt.replaced-{stamp}", steps=(1,), age=3600)
    _run(tmp_path, "other.replaced-20240101-000000", steps=(1,), age=3600)
    _run(tmp_path, "gpt", steps=(1,), age=3600)
    (tmp_path / "notes.replaced-20240101-000000.txt").write_text("not a folder")
    assert cli.main(["runs", str(tmp_path), "--prune-replaced", "--keep", "2"]) == 0
    assert capsys.readouterr().out.splitlines() == [f"removed {tmp_path / f'gpt.replaced-{s}'}" for s in stamps[:3]]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "gpt", *(f"gpt.replaced-{s}" for s in stamps[3:]), "notes.replaced-20240101-000000.txt",
        "other.replaced-20240101-000000"]
    assert cli.main(["runs", str(tmp_path), "--prune-replaced"]) == 0  # keeps 3 of each name by default
    assert capsys.readouterr().out == f"{tmp_path}: no moved-aside run dirs beyond the newest 3 of each name\n"
    assert cli.main(["runs", str(tmp_path), "--prune-replaced", "--keep", "0"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt", "notes.replaced-20240101-000000.txt"]


def test_prune_replaced_is_for_local_storage_and_keep_goes_with_it(tmp_path, capsys):
    assert cli.main(["runs", "abfs://c@acct.dfs.core.windows.net/runs", "--prune-replaced"]) == cli.EXIT_USER_ERROR
    assert "--prune-replaced works on local storage only" in capsys.readouterr().err
    assert cli.main(["runs", str(tmp_path), "--keep", "2"]) == cli.EXIT_USER_ERROR
    assert "--keep goes with --prune-replaced" in capsys.readouterr().err
    assert cli.main(["runs", str(tmp_path), "--prune-replaced", "--keep", "-1"]) == cli.EXIT_USER_ERROR
    assert "--keep must be 0 or more (got -1)" in capsys.readouterr().err
