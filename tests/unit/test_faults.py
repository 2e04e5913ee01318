"""Fault descriptions: point, step or step range, rank, and the once-only marker; none by default."""

from shardrun.trainer.faults import FaultInjector


def test_a_fault_fires_at_its_point_step_and_rank_only():
    faults = FaultInjector("nonfinite-loss:step=3-5:rank=1")
    fired = [(s, r) for s in range(1, 8) for r in (0, 1) if faults.active("nonfinite-loss", step=s, rank=r)]
    assert fired == [(3, 1), (4, 1), (5, 1)]
    assert not faults.active("checkpoint-save", step=3, rank=1)


def test_without_step_or_rank_it_fires_everywhere_and_a_marker_makes_it_once(tmp_path):
    faults = FaultInjector("stall", marker=str(tmp_path / "fired"))
    assert faults.active("stall", step=7, rank=3)
    assert not faults.active("stall", step=8, rank=3)
    assert (tmp_path / "fired").read_text() == "stall step 7 rank 3\n"


def test_the_environment_is_read_once_at_the_entry(monkeypatch):
    monkeypatch.setenv("SHARDRUN_FAULT", "stall:step=2")
    monkeypatch.setenv("SHARDRUN_STEP_DELAY", "0.5")
    faults = FaultInjector.from_env()
    monkeypatch.delenv("SHARDRUN_FAULT")
    assert faults.active("stall", step=2, rank=0) and faults.step_delay == 0.5


def test_the_default_injects_nothing():
    import torch

    faults = FaultInjector()
    loss = torch.tensor(1.5)
    assert not faults.active("stall", step=1, rank=0) and faults.step_delay == 0.0
    assert faults.loss(loss, step=1, rank=0) is loss
