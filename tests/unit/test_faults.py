"""SHARDRUN_FAULT parsing: point, step or step range, rank, and the once-only marker."""

from shardrun.trainer import faults


def test_a_fault_fires_at_its_point_step_and_rank_only(monkeypatch):
    monkeypatch.setenv("SHARDRUN_FAULT", "nonfinite-loss:step=3-5:rank=1")
    fired = [(s, r) for s in range(1, 8) for r in (0, 1) if faults.active("nonfinite-loss", step=s, rank=r)]
    assert fired == [(3, 1), (4, 1), (5, 1)]
    assert not faults.active("checkpoint-save", step=3, rank=1)


def test_without_step_or_rank_it_fires_everywhere_and_a_marker_makes_it_once(monkeypatch, tmp_path):
    monkeypatch.setenv("SHARDRUN_FAULT", "stall")
    monkeypatch.setenv("SHARDRUN_FAULT_MARKER", str(tmp_path / "fired"))
    assert faults.active("stall", step=7, rank=3)
    assert not faults.active("stall", step=8, rank=3)
    assert (tmp_path / "fired").read_text() == "stall step 7 rank 3\n"


def test_no_fault_without_the_variable(monkeypatch):
    monkeypatch.delenv("SHARDRUN_FAULT", raising=False)
    assert not faults.active("stall", step=1, rank=0) and faults.step_delay() == 0.0
