"""A checkpoint is committed only once its bytes are on the disk: every file and folder is fsynced before
the rename that puts it into place, and `latest` is written the same way. A host crash cannot be staged
in a test, so the real fsync calls are watched and their order checked against the renames."""

import os

import pytest

from shardrun import fs
from shardrun.driver.local import LocalCheckpointStore
from shardrun.trainer.topology import Topology


@pytest.fixture
def disk_log(monkeypatch):
    """Every fsync (by the path of its descriptor) and every rename, in order; the real calls still run."""
    log = []
    real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

    def fsync(fd):
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def rename(src, dst):
        log.append(("rename", str(src), str(dst)))
        return real_rename(src, dst)

    def replace(src, dst):
        log.append(("rename", str(src), str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "rename", rename)
    monkeypatch.setattr(os, "replace", replace)
    return log


def test_a_local_checkpoint_is_on_the_disk_before_it_is_renamed_into_place(tmp_path, disk_log):
    session = LocalCheckpointStore(str(tmp_path), Topology(rank=0, world_size=1, local_rank=0, device="cpu"), keep=2)
    with session.checkpoint_dir(4, {}) as staging:
        os.makedirs(os.path.join(staging, "global_step4"))
        for name in ("global_step4/mp_rank_00_model_states.pt", "global_step4/optim.pt", "rank_0.pt",
                     "shardrun.json"):
            with open(os.path.join(staging, name), "wb") as f:
                f.write(os.urandom(1000))
    root = str(tmp_path / "checkpoints")
    final = os.path.join(root, "step_00000004")
    [commit] = [i for i, e in enumerate(disk_log) if e[0] == "rename" and e[2] == final]
    synced_before = {e[1] for e in disk_log[:commit] if e[0] == "fsync"}
    staged = os.path.join(root, ".staging-step_00000004")
    for name in ("global_step4/mp_rank_00_model_states.pt", "global_step4/optim.pt", "rank_0.pt",
                 "shardrun.json", "global_step4", ""):
        assert os.path.normpath(os.path.join(staged, name)) in synced_before, name
    after = disk_log[commit + 1:]
    assert ("fsync", root) in after  # the rename itself
    [latest] = [i for i, e in enumerate(after) if e[0] == "rename" and e[2] == os.path.join(root, "latest")]
    tmp = after[latest][1]
    assert ("fsync", tmp) in after[:latest]  # the new `latest` was on the disk before it replaced the old
    assert ("fsync", root) in after[latest + 1:]  # and its rename
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000004"
    assert sorted(os.listdir(final)) == ["global_step4", "rank_0.pt", "shardrun.json"]
    assert not [n for n in os.listdir(root) if ".tmp-" in n or n.startswith(".staging")]


def test_write_text_replaces_a_file_whole_and_syncs_it_and_its_folder(tmp_path, disk_log):
    target = tmp_path / "run" / "summary.json"
    fs.write_text(str(target), "old")
    disk_log.clear()
    fs.write_text(str(target), "new")
    [(_, tmp), (_, src, dst), (_, folder)] = disk_log
    assert src == tmp and dst == str(target) and folder == str(tmp_path / "run")
    assert target.read_text() == "new"
    assert os.listdir(tmp_path / "run") == ["summary.json"]


def test_sync_tree_syncs_the_named_files_and_every_folder_between_them_and_the_root(tmp_path, disk_log):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "x.pt").write_bytes(b"x" * 300)
    (tmp_path / "y.pt").write_bytes(b"y" * 20)
    (tmp_path / "other.pt").write_bytes(b"o")  # another rank's file: not named, not synced
    assert fs.sync_tree(str(tmp_path), ["a/b/x.pt", "y.pt"]) == 320
    synced = [e[1] for e in disk_log]
    assert synced[:2] == [str(tmp_path / "a" / "b" / "x.pt"), str(tmp_path / "y.pt")]
    # folders deepest first: a folder's entry in its parent is synced after the folder itself
    assert synced[2:] == [str(tmp_path / "a" / "b"), str(tmp_path / "a"), str(tmp_path)]
    with pytest.raises(FileNotFoundError):
        fs.sync_tree(str(tmp_path), ["missing.pt"])  # a file that was not written is not passed over


def test_pruning_keeps_the_checkpoint_just_committed_and_clears_what_a_crash_left(tmp_path):
    root = tmp_path / "checkpoints"
    for leftover in ("step_00000050", "step_00000002", ".staging-step_00000060"):  # a crashed attempt's
        (root / leftover).mkdir(parents=True)
    store = LocalCheckpointStore(str(tmp_path), Topology(rank=0, world_size=1, local_rank=0, device="cpu"), keep=1)
    for step in (4, 10):
        with store.checkpoint_dir(step, {}) as staging:
            with open(os.path.join(staging, "rank_0.pt"), "wb") as f:
                f.write(b"x")
    assert (root / "latest").read_text() == "step_00000010"
    assert sorted(os.listdir(root)) == ["latest", "step_00000010", "step_00000050"]


def test_train_resumes_from_a_newer_checkpoint_that_run_wrote_in_the_same_run_dir(tmp_path, capsys):
    """`shardrun run`, then `shardrun train` of the same name: one run dir, one run, whichever launcher goes on."""
    from helpers import write_checkpoint

    store = LocalCheckpointStore(str(tmp_path), Topology(rank=0, world_size=1, local_rank=0, device="cpu"), keep=2)
    with store.checkpoint_dir(4, {}) as staging:
        with open(os.path.join(staging, "rank_0.pt"), "wb") as f:
            f.write(b"x")
    with store.latest_checkpoint() as path:
        assert path == str(tmp_path / "checkpoints" / "step_00000004")  # latest's (not complete: not overridden)
    write_checkpoint(tmp_path / "checkpoint_00000010", 10, world=1, ranks=(0,))
    with store.latest_checkpoint() as path:
        assert path == str(tmp_path / "checkpoint_00000010")
    assert "resuming from the newest complete checkpoint in the run dir" in capsys.readouterr().out
