"""shardrun checkpoints: which checkpoint folders are complete, and which one export takes."""

import json

import pytest

from shardrun.checkpoint_format import list_checkpoints as checkpoints
from shardrun.checkpoint_format import pick
from shardrun.errors import UserError
from shardrun.export import model_spec


def _checkpoint(folder, step, *, world=2, ranks=(0, 1), manifest=True, tag=True):
    folder.mkdir(parents=True)
    if manifest:
        (folder / "shardrun.json").write_text(json.dumps({"step": step, "tag": f"global_step{step}",
                                                          "world_size": world, "zero_stage": 2}))
    for r in ranks:
        (folder / f"rank_{r}.pt").write_bytes(b"x" * 10)
    if tag:
        (folder / f"global_step{step}").mkdir()


def test_complete_and_incomplete_checkpoints_are_told_apart(tmp_path):
    _checkpoint(tmp_path / "checkpoint_00000004", 4)
    _checkpoint(tmp_path / "checkpoint_00000008", 8, ranks=(0,))
    _checkpoint(tmp_path / "checkpoints/step_00000012", 12, manifest=False)
    _checkpoint(tmp_path / "checkpoints/step_00000016", 16, tag=False)
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


def test_not_a_run_dir_is_named(tmp_path):
    # (a URI run dir is listed and exported against Azurite in tests/integration/test_remote_checkpoints.py)
    with pytest.raises(UserError, match="is no run dir"):
        checkpoints(str(tmp_path / "nope"))
    (tmp_path / "run").mkdir()
    with pytest.raises(UserError, match=f"{tmp_path / 'run' / 'job.yaml'} is missing: it is written when a run "
                                        "starts"):
        model_spec(str(tmp_path / "run"))
