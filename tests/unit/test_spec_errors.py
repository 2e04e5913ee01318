"""`shardrun check` makes every check `run` makes before Ray; spec errors name the file, line and column, the
`--set` they came from, and lead with an unknown key's 'did you mean'; warm-up warnings (issue 19)."""

import yaml
from helpers import tiny_spec, write_checkpoint, write_spec

from shardrun import cli


def _check(capsys, *argv):
    rc = cli.main(["check", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def _job(tmp_path, corpus, **sections):
    return write_spec(tmp_path / "job.yaml", tiny_spec(corpus, tmp_path / "runs", **sections))


# -- item 6: check runs the checks run makes before Ray ------------------------------------------------


def test_check_reads_the_data_prints_its_line_on_stderr_and_the_spec_on_stdout(tmp_path, corpus, capsys):
    rc, out, err = _check(capsys, _job(tmp_path, corpus))
    assert rc == 0, err
    assert yaml.safe_load(out)["data"]["seq_len"] == 32
    assert "[shardrun] data: " in err and "steps per epoch at a global batch of 8" in err
    assert not (tmp_path / "runs").exists()  # nothing written: no run dir, no lease


def test_check_exits_2_on_a_missing_data_path_with_runs_message(tmp_path, capsys):
    rc, out, err = _check(capsys, _job(tmp_path, tmp_path / "no-such-data"))
    assert rc == 2
    assert err.strip().splitlines()[-1] == f"shardrun: error: data.paths: {tmp_path / 'no-such-data'} does not exist"
    assert yaml.safe_load(out)["name"] == "tiny"  # the resolved spec still comes, on stdout


def test_check_refuses_data_too_small_for_a_step(tmp_path, corpus, capsys):
    rc, _, err = _check(capsys, _job(tmp_path, corpus, deepspeed={"micro_batch_size": 100000}))
    assert rc == 2 and "rows make no whole step of a global batch of 200000 samples over 2 partitions" in err


def test_check_leaves_data_prepare_to_the_run(tmp_path, corpus, capsys):
    target = tmp_path / "to-prepare"
    path = _job(tmp_path, corpus, data={"paths": [str(target)], "seq_len": 32, "prepare": {"max_mb": 0.1}})
    rc, _, err = _check(capsys, path)
    assert rc == 0, err
    assert f"data.paths: {target} does not exist yet: `shardrun run` prepares the python-stdlib corpus there" in err
    assert not target.exists()


def test_check_makes_the_resume_check_unless_fresh(tmp_path, corpus, capsys):
    from shardrun.config import DataSpec
    from shardrun.datasets import build_index

    path = _job(tmp_path, corpus)
    index = build_index(DataSpec(paths=[str(corpus)], seq_len=32))
    position = {"version": 1, "seed": 7, "partitions": 2, "rows": index.rows, "row_groups": index.num_row_groups,
                "fingerprint": index.fingerprint, "epoch": 0, "offset": 8}
    write_checkpoint(tmp_path / "runs" / "tiny" / "checkpoint_00000005", 5, data=position)
    rc, _, err = _check(capsys, path)
    assert rc == 2
    assert "shardrun: error: resuming tiny from its checkpoint of step 5: data.seed is 0 but the checkpoint's " \
           "stream used seed 7" in err
    assert _check(capsys, path, "--fresh")[0] == 0


def test_check_imports_the_model_entrypoint(tmp_path, corpus, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = tiny_spec(corpus, tmp_path / "runs")
    raw["model"] = {"entrypoint": "no_such_module_here:build"}
    rc, _, err = _check(capsys, write_spec(tmp_path / "job.yaml", raw))
    assert rc == 2 and "no_such_module_here" in err


# -- item 5b: a warm-up longer than a fifth of the run is a warning ------------------------------------


def test_check_warns_of_a_run_that_is_all_warm_up_and_goes_on(tmp_path, corpus, capsys):
    path = _job(tmp_path, corpus, run={"max_steps": 100},
                deepspeed={"micro_batch_size": 4, "schedule": {"warmup_steps": 100}})
    rc, _, err = _check(capsys, path)
    assert rc == 0, err
    assert ("[shardrun] warning: deepspeed.schedule.warmup_steps (100) is more than a fifth of run.max_steps (100), "
            "so the whole run is warm-up: the learning rate never reaches deepspeed.optimizer.lr; set "
            "deepspeed.schedule.warmup_steps to 20 or less (e.g. --set deepspeed.schedule.warmup_steps=10)") in err
    assert "warning" not in _check(capsys, path, "--set", "deepspeed.schedule.warmup_steps=20")[2]


# -- item 8: error text ----------------------------------------------------------------------------------


def test_yaml_syntax_errors_name_the_file_line_and_column(tmp_path, capsys):
    path = tmp_path / "job.yaml"
    path.write_text("name: x\nrun: {max_steps: 3\ndata: {paths: [a]}\n")
    rc, _, err = _check(capsys, path)
    assert rc == 2 and "<unicode string>" not in err
    assert err.strip() == (f"shardrun: error: {path}:3:5: not valid YAML: expected ',' or '}}', but got ':' "
                           "(while parsing a flow mapping that starts at line 2, column 6)")


def test_an_unknown_key_leads_with_its_suggestion(tmp_path, corpus, capsys):
    raw = tiny_spec(corpus, tmp_path / "runs")
    raw["run"] = {"max_stepz": 3}
    path = write_spec(tmp_path / "job.yaml", raw)
    assert _check(capsys, path)[2].strip().splitlines() == [
        f"shardrun: error: {path}: run.max_stepz: unknown key; did you mean 'max_steps'? (got 3)",
        f"{path}: run.max_steps: Field required",
    ]


def test_set_errors_name_the_set_not_the_file(tmp_path, corpus, capsys):
    path = _job(tmp_path, corpus)
    for item, expect in [
        ("deepspeed.zero_stagee=2", "deepspeed.zero_stagee: unknown key; did you mean 'zero_stage'? (got 2)"),
        ("scaling.num_workers=0",
         "scaling.num_workers: must be a whole number >= 1, or [min, max] of them for an elastic run (got 0)"),
        ("deepspeed.optimizer.betas=[0.9, 0.8", "the value is not valid YAML: expected ',' or ']', but got "
                                                "'<stream end>'"),
        ("run.max_steps", "expected key.path=value, e.g. --set run.max_steps=100"),
        ("run.max_steps.x=1", "run.max_steps is not a section"),
    ]:
        rc, _, err = _check(capsys, path, "--set", item)
        assert rc == 2 and err.strip() == f"shardrun: error: --set {item}: {expect}", err
    # a problem of the file's own is still the file's, beside one of a --set
    raw = tiny_spec(corpus, tmp_path / "runs")
    raw["run"]["log_every"] = 0
    write_spec(path, raw)
    assert _check(capsys, path, "--set", "deepspeed.zero_stage=9")[2].strip().splitlines() == [
        "shardrun: error: --set deepspeed.zero_stage=9: deepspeed.zero_stage: Input should be less than or equal "
        "to 3 (got 9)",
        f"{path}: run.log_every: Input should be greater than or equal to 1 (got 0)",
    ]
