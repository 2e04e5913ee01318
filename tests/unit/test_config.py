import re

import pytest
import yaml
from helpers import tiny_spec, write_spec

from shardrun import config
from shardrun.errors import UserError


def _spec(tmp_path, **sections):
    return tiny_spec(tmp_path / "data", tmp_path / "runs", **sections)


def test_defaults_fill_in_and_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    raw = _spec(tmp_path, data={"paths": ["rel/data"]}, checkpoint={"storage": "runs"})
    spec = config.parse(raw)
    assert spec.model.type == "gpt"
    assert spec.deepspeed.precision == "fp32"
    assert spec.data.paths == [str(tmp_path / "rel/data")]
    assert spec.run_dir == str(tmp_path / "runs" / "tiny")


def test_uri_storage_is_kept_as_given(tmp_path):
    spec = config.parse(_spec(tmp_path, checkpoint={"storage": "abfs://runs@acct/x"}))
    assert spec.run_dir == "abfs://runs@acct/x/tiny"


def test_unknown_key_names_the_path_and_suggests(tmp_path):
    raw = _spec(tmp_path, deepspeed={"zero_stge": 3})
    with pytest.raises(UserError) as e:
        config.parse(raw, source="job.yaml")
    assert str(e.value) == "job.yaml: deepspeed.zero_stge: unknown key; did you mean 'zero_stage'? (got 3)"


@pytest.mark.parametrize("section,key,value,expect", [
    ("deepspeed", "zero_stage", 4, "deepspeed.zero_stage: Input should be less than or equal to 3 (got 4)"),
    ("deepspeed", "precision", "fp8", "deepspeed.precision: Input should be 'fp32', 'bf16' or 'fp16' (got 'fp8')"),
    ("run", "max_steps", 0, "run.max_steps: Input should be greater than or equal to 1 (got 0)"),
    ("scaling", "placement_strategy", "pack", "scaling.placement_strategy:"),
])
def test_bad_value_names_field_and_value(tmp_path, section, key, value, expect):
    with pytest.raises(UserError) as e:
        config.parse(_spec(tmp_path, **{section: {key: value}}))
    assert expect in str(e.value)


@pytest.mark.parametrize(("sections", "expect"), [
    ({"run": {"seed": 2**32}}, "run.seed: Input should be less than 4294967296"),
    ({"data": {"seed": -1}}, "data.seed: Input should be greater than or equal to 0"),
    ({"failure": {"collective_timeout_s": float("inf")}},
     "failure.collective_timeout_s: Input should be a finite number"),
    ({"deepspeed": {"optimizer": {"lr": float("nan")}}}, "deepspeed.optimizer.lr: Input should be a finite number"),
    ({"deepspeed": {"optimizer": {"eps": float("inf")}}}, "deepspeed.optimizer.eps: Input should be a finite number"),
    ({"deepspeed": {"grad_clip": float("inf")}}, "deepspeed.grad_clip: Input should be a finite number"),
    ({"deepspeed": {"optimizer": {"betas": [0.9, 1.0]}}}, "deepspeed.optimizer.betas: each beta must be in [0, 1)"),
    ({"metrics": {"port": 65535}}, "metrics.port 65535 + local rank goes past 65535 with up to 2 workers"),
    ({"deepspeed": {"config": {"train_batch_size": 64}}},
     "deepspeed.config: train_batch_size is computed by shardrun for every world size"),
    ({"name": "n" * 201}, "name: String should have at most 200 characters"),
    ({"scaling": {"use_gpu": True, "gpus_per_worker": 0}}, "scaling.use_gpu needs scaling.gpus_per_worker above 0"),
    ({"scaling": {"use_gpu": True, "gpus_per_worker": 0.5}},
     "scaling.gpus_per_worker is 0.5: NCCL takes a whole GPU per rank"),
])
def test_values_that_would_fail_only_after_ray_is_up_are_refused_here(tmp_path, sections, expect):
    with pytest.raises(UserError, match="^job spec: " + re.escape(expect)):
        config.parse(_spec(tmp_path, **sections))


def test_cross_field_checks(tmp_path):
    with pytest.raises(UserError, match=r"data.seq_len \(64\) is longer than model.block_size \(32\)"):
        config.parse(_spec(tmp_path, data={"seq_len": 64}))
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        config.parse(_spec(tmp_path, deepspeed={"precision": "fp16"}))


def test_prepare_needs_a_local_path(tmp_path):
    with pytest.raises(UserError, match="data.prepare writes to a local path"):
        config.parse(_spec(tmp_path, data={"paths": ["abfs://c@a/x"], "prepare": {}}))


def test_entrypoint_model_rules(tmp_path):
    def with_model(model):
        raw = _spec(tmp_path)
        raw["model"] = model
        return config.parse(raw)

    ok = with_model({"entrypoint": "pkg.mod:build", "args": {"h": 1}})
    assert ok.model.type is None and ok.model.args == {"h": 1}
    with pytest.raises(UserError, match="n_layer apply to type: gpt only"):
        with_model({"entrypoint": "pkg.mod:build", "n_layer": 2})
    with pytest.raises(UserError, match="must look like 'package.module:function'"):
        with_model({"entrypoint": "pkg.mod.build"})
    with pytest.raises(UserError, match="not both"):
        with_model({"entrypoint": "a:b", "type": "gpt"})
    with pytest.raises(UserError, match="model.args is only for an entrypoint"):
        with_model({"args": {"h": 1}})


def test_missing_section_is_named(tmp_path):
    raw = _spec(tmp_path)
    del raw["run"]
    with pytest.raises(UserError, match=r"^job spec: run: Field required$"):
        config.parse(raw)


def test_overrides_are_typed_and_nested(tmp_path):
    path = write_spec(tmp_path / "job.yaml", _spec(tmp_path))
    spec = config.load(path, ["run.max_steps=40", "deepspeed.optimizer.betas=[0.8, 0.9]",
                              "scaling.use_gpu=false", "name=other"])
    assert spec.run.max_steps == 40
    assert spec.deepspeed.optimizer.betas == (0.8, 0.9)
    assert spec.name == "other"


def test_override_errors(tmp_path):
    path = write_spec(tmp_path / "job.yaml", _spec(tmp_path))
    with pytest.raises(UserError, match="expected key.path=value"):
        config.load(path, ["run.max_steps"])
    with pytest.raises(UserError, match="run.max_steps is not a section"):
        config.load(path, ["run.max_steps.x=1"])
    with pytest.raises(UserError, match=r"run.max_step: unknown key; did you mean 'max_steps'"):
        config.load(path, ["run.max_step=3"])


def test_unreadable_or_non_mapping_files(tmp_path):
    with pytest.raises(UserError, match="cannot read the job spec"):
        config.load(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(UserError, match="a job spec is a mapping"):
        config.load(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("name: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        config.load(tmp_path / "bad.yaml")


@pytest.mark.parametrize("model", [{"n_layer": 3}, {"entrypoint": "pkg.mod:build", "args": {"h": 2}}])
def test_resolved_yaml_round_trips(tmp_path, model):
    raw = _spec(tmp_path)
    raw["model"] = model
    spec = config.parse(raw)
    again = config.parse(yaml.safe_load(spec.to_yaml()))
    assert again == spec
    assert config.parse(spec.model_dump()) == spec  # what workers receive


def test_example_specs_validate():
    from helpers import REPO

    for path in (REPO / "examples").glob("*.yaml"):
        config.load(path)


def test_elastic_workers_keep_the_global_batch_and_default_partitions(tmp_path):
    spec = config.parse(_spec(tmp_path, scaling={"num_workers": [2, 4]},
                              deepspeed={"micro_batch_size": 1, "grad_accum_steps": 3}))
    assert spec.scaling.elastic and spec.scaling.world_sizes == [2, 3, 4]
    assert spec.partitions == 12  # lcm(2, 3, 4): every world size owns whole partitions
    assert spec.global_batch == 12 and [spec.grad_accum_for(w) for w in (2, 3, 4)] == [6, 4, 3]
    assert {spec.global_batch_for(w) for w in (2, 3, 4)} == {12}


def test_elastic_ranges_that_cannot_keep_the_batch_are_refused_naming_the_fix(tmp_path):
    with pytest.raises(UserError) as e:
        config.parse(_spec(tmp_path, scaling={"num_workers": [3, 4]}, deepspeed={"micro_batch_size": 4}))
    assert "with 3 workers the global batch of 16" in str(e.value) and "keep_global_batch: false" in str(e.value)
    scaled = config.parse(_spec(tmp_path, scaling={"num_workers": [1, 2], "keep_global_batch": False},
                                deepspeed={"micro_batch_size": 4}))
    assert [scaled.global_batch_for(w) for w in (1, 2)] == [4, 8] and scaled.grad_accum_for(1) == 1


@pytest.mark.parametrize(("value", "expect"), [
    (0, "must be a whole number >= 1, or [min, max] of them for an elastic run (got 0)"),
    ([3, 2], "[min, max] needs min <= max (got [3, 2])"),
    ([1, 2, 3], "must be a whole number >= 1"),
    (True, "must be a whole number >= 1"),
])
def test_bad_worker_counts_are_named(tmp_path, value, expect):
    with pytest.raises(UserError) as e:
        config.parse(_spec(tmp_path, scaling={"num_workers": value}))
    assert f"scaling.num_workers: {expect}" in str(e.value)


def test_equal_bounds_are_a_fixed_size(tmp_path):
    spec = config.parse(_spec(tmp_path, scaling={"num_workers": [2, 2]}))
    assert spec.scaling.num_workers == 2 and not spec.scaling.elastic


# -- issue 19 ------------------------------------------------------------------------------------------


def test_seq_len_may_be_left_to_the_data_but_not_for_data_prepare(tmp_path):
    raw = _spec(tmp_path)
    del raw["data"]["seq_len"]
    spec = config.parse(raw)
    assert spec.data.seq_len is None and spec.data.tokens_per_sample == 0
    spec.data.seq_len = 64  # as the driver sets it from the files; then the checks that need it run
    with pytest.raises(UserError, match=r"^from the data: data.seq_len \(64\) is longer than model.block_size \(32\)$"):
        config.revalidate(spec, "from the data")
    raw["data"]["prepare"] = {}
    with pytest.raises(UserError, match="data.prepare needs data.seq_len"):
        config.parse(raw)


@pytest.mark.parametrize(("warmup", "steps", "expect"), [
    (2, 10, None),
    (100, 100, "so the whole run is warm-up: the learning rate never reaches deepspeed.optimizer.lr; "
               "set deepspeed.schedule.warmup_steps to 20 or less (e.g. --set deepspeed.schedule.warmup_steps=10)"),
    (300, 1000, "so 300 of the run's 1000 steps are warm-up; set deepspeed.schedule.warmup_steps to 200 or less"),
])
def test_a_warm_up_longer_than_a_fifth_of_the_run_is_a_warning(tmp_path, warmup, steps, expect):
    spec = config.parse(_spec(tmp_path, run={"max_steps": steps},
                              deepspeed={"schedule": {"warmup_steps": warmup}}))
    if expect is None:
        assert spec.warnings() == []
    else:
        [warning] = spec.warnings()
        assert warning.startswith(f"deepspeed.schedule.warmup_steps ({warmup}) is more than a fifth of "
                                  f"run.max_steps ({steps}), ") and expect in warning


def test_yaml_errors_name_file_line_and_column(tmp_path):
    (tmp_path / "bad.yaml").write_text("name: x\n  run: 1\n")
    with pytest.raises(UserError) as e:
        config.load(tmp_path / "bad.yaml")
    assert str(e.value) == f"{tmp_path / 'bad.yaml'}:2:6: not valid YAML: mapping values are not allowed here"


def test_set_problems_are_blamed_on_the_set(tmp_path):
    path = write_spec(tmp_path / "job.yaml", _spec(tmp_path))
    with pytest.raises(UserError) as e:
        config.load(path, ["deepspeed.optimizer={lr: -1}", "run.max_steps=5"])
    assert str(e.value) == ("--set deepspeed.optimizer={lr: -1}: deepspeed.optimizer.lr: Input should be greater "
                            "than 0 (got -1)")
    with pytest.raises(UserError, match=r"^--set deepspeed.optimizer.nope.deeper=1: deepspeed.optimizer.nope: "
                                        r"unknown key \(got \{'deeper': 1\}\)$"):
        config.load(path, ["deepspeed.optimizer.nope.deeper=1"])
    assert config.load(path, ["checkpoint.storage=/tmp/a: b: c"]).checkpoint.storage == "/tmp/a: b: c"  # not YAML
