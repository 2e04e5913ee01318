"""shardrun checkpoints: which checkpoint folders are complete, and which one export takes."""

import pytest
from helpers import Planted, commit, write_checkpoint

from shardrun.checkpoint_format import list_checkpoints as checkpoints
from shardrun.checkpoint_format import pick, resume_from
from shardrun.errors import UserError
from shardrun.export import check_out, check_pickles, export, model_spec, replace_folder


def test_complete_and_incomplete_checkpoints_are_told_apart(tmp_path):
    write_checkpoint(tmp_path / "checkpoint_00000004", 4)
    write_checkpoint(tmp_path / "checkpoint_00000008", 8, ranks=(0,))
    write_checkpoint(tmp_path / "checkpoints/step_00000012", 12, manifest=False)
    write_checkpoint(tmp_path / "checkpoints/step_00000016", 16, tag=False)
    (tmp_path / "checkpoints/.staging-step_00000020").mkdir()
    found = {c["step"]: c for c in checkpoints(str(tmp_path))}
    assert sorted(found) == [4, 8, 12, 16]
    assert found[4]["complete"] and found[4]["bytes"] > 0
    assert found[8]["why"] == "rank files missing: [1]"
    assert "no readable shardrun.json" in found[12]["why"]
    assert "global_step16 folder is missing" in found[16]["why"]
    assert pick(str(tmp_path))["step"] == 4
    with pytest.raises(UserError, match="no complete checkpoint of step 8; complete ones: \\[4\\]"):
        pick(str(tmp_path), 8)


@pytest.mark.parametrize(("stage", "damage", "why"), [
    (2, "global_step8/zero_pp_rank_1_mp_rank_00_optim_states.pt",
     "ZeRO optim shards of ranks [1] are missing from global_step8"),
    (3, "global_step8/zero_pp_rank_0_mp_rank_00_model_states.pt",
     "ZeRO model shards of ranks [0] are missing from global_step8"),
    (1, "global_step8/mp_rank_00_model_states.pt", "DeepSpeed's model states are missing from global_step8"),
    (0, "global_step8/mp_rank_00_model_states.pt", "DeepSpeed's global_step8 folder is missing"),  # its only file
])
def test_a_checkpoint_missing_a_shard_is_incomplete_and_never_picked(tmp_path, stage, damage, why):
    write_checkpoint(tmp_path / "checkpoint_00000004", 4, stage=stage)
    damaged = write_checkpoint(tmp_path / "checkpoint_00000008", 8, stage=stage)
    assert pick(str(tmp_path))["step"] == 8
    (damaged / damage).unlink()
    found = {c["step"]: c for c in checkpoints(str(tmp_path))}
    assert not found[8]["complete"] and found[8]["why"] == why
    assert pick(str(tmp_path))["step"] == 4


def test_a_file_cut_off_while_written_makes_the_checkpoint_incomplete(tmp_path):
    damaged = write_checkpoint(tmp_path / "checkpoint_00000008", 8)
    (damaged / "rank_1.pt").write_bytes(b"")
    (damaged / "global_step8/zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    [found] = checkpoints(str(tmp_path))
    assert found["why"] == ("empty files (cut off while written): ['global_step8/zero_pp_rank_0_mp_rank_00_optim_"
                            "states.pt', 'rank_1.pt']")
    with pytest.raises(UserError, match="has no complete checkpoint yet"):
        pick(str(tmp_path))


def test_under_ray_complete_means_committed_by_the_marker_or_rays_record(tmp_path):
    write_checkpoint(tmp_path / "checkpoint_00000004", 4)
    cut = write_checkpoint(tmp_path / "checkpoint_00000008", 8)
    (cut / "global_step8/zero_pp_rank_1_mp_rank_00_optim_states.pt").write_bytes(b"y" * 7)  # cut off, not empty
    write_checkpoint(tmp_path / "checkpoint_00000012", 12, committed=False)  # a rank died in its upload
    write_checkpoint(tmp_path / "checkpoint_00000016", 16, committed=False)  # Ray committed it, then the group ended
    (tmp_path / "checkpoint_manager_snapshot.json").write_text(
        '{"checkpoint_results": [{"checkpoint_dir_name": "checkpoint_00000016", "metrics": {"step": 16}}]}')
    write_checkpoint(tmp_path / "checkpoints/step_00000020", 20, committed=False)  # `train`: the rename commits
    found = {c["step"]: c for c in checkpoints(str(tmp_path))}
    assert found[4]["complete"] and found[16]["complete"] and found[20]["complete"]
    assert found[8]["why"] == ("files differ from its commit record (cut off or replaced): "
                               "['global_step8/zero_pp_rank_1_mp_rank_00_optim_states.pt']")
    assert found[12]["why"] == ("not committed: no commit.json, and Ray's record of the run does not name it "
                                "(a rank ended during its upload)")
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("")  # cut off: it names nothing
    assert not {c["step"]: c for c in checkpoints(str(tmp_path))}[16]["complete"]


def test_not_a_run_dir_is_named(tmp_path):
    # (a URI run dir is listed and exported against Azurite in tests/integration/test_remote_checkpoints.py)
    with pytest.raises(UserError, match="is no run dir"):
        checkpoints(str(tmp_path / "nope"))
    (tmp_path / "run").mkdir()
    with pytest.raises(UserError, match=f"{tmp_path / 'run' / 'job.yaml'} is missing: it is written when a run "
                                        "starts"):
        model_spec(str(tmp_path / "run"))


def test_export_goes_to_a_folder_of_its_own_and_replaces_an_earlier_export_whole(tmp_path):
    run = tmp_path / "runs/tiny"
    write_checkpoint(run / "checkpoint_00000004", 4)
    with pytest.raises(UserError, match="is inside the run dir"):
        check_out(str(run), str(run / "export"))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes/todo.txt").write_text("mine")
    with pytest.raises(UserError, match="holds files that are no export \\(todo.txt\\)"):
        check_out(str(run), str(tmp_path / "notes"))
    earlier = tmp_path / "export"
    earlier.mkdir()
    for name in ("model.safetensors", "config.json"):
        (earlier / name).write_text("old")
    check_out(str(run), str(earlier))  # an earlier export may be replaced
    new = tmp_path / "staged"
    new.mkdir()
    for name in ("model.safetensors", "config.json"):
        (new / name).write_text("new")
    replace_folder(str(new), str(earlier))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "notes", "runs"]
    assert {p.name: p.read_text() for p in earlier.iterdir()} == {"model.safetensors": "new", "config.json": "new"}


@pytest.mark.parametrize(("recorded", "complete", "resume"), [
    (20, [10, 20], None),  # the record names the newest complete checkpoint: take it
    (None, [], None),  # a new run
    (None, [10, 20], 20),  # no record (lost, or the run ended before Ray wrote it)
    (10, [10, 20], 20),  # a record older than storage
    (30, [10, 20], 20),  # a record naming a checkpoint that is not complete
])
def test_resume_takes_the_newest_complete_checkpoint_over_an_older_or_missing_record(recorded, complete, resume):
    assert resume_from(recorded, complete) == resume


def test_export_refuses_a_checkpoint_whose_files_would_run_code_and_loads_nothing_to_know(tmp_path):
    import torch

    run = tmp_path / "runs/tiny"
    folder = write_checkpoint(run / "checkpoint_00000004", 4, world=1, ranks=(0,), stage=0)
    (run / "job.yaml").write_text("name: tiny\nmodel: {n_layer: 1, n_head: 1, n_embd: 8, block_size: 8}\n")
    marker = tmp_path / "pwned"
    torch.save({"module": {}, "extra": Planted(marker)}, folder / "global_step4/mp_rank_00_model_states.pt")
    commit(folder)  # whoever can write the storage can write the commit marker too
    with pytest.raises(UserError, match=r"global_step4/mp_rank_00_model_states\.pt would call (posix|os)\.system "
                                        r"when loaded.*--trust-checkpoint"):
        export(str(run), str(tmp_path / "export"))
    assert not marker.exists() and not (tmp_path / "export").exists()
    torch.save({"module": {}, "step": torch.ones(2)}, folder / "global_step4/mp_rank_00_model_states.pt")
    check_pickles(str(folder))  # torch's tensors and plain data pass
