"""A rank's own checkpoint file (train state, data position, RNG states) holds tensors and plain data only,
and is read back with torch.load's weights_only: a pickle planted in storage cannot run code on resume."""

import pickle
import random

import numpy as np
import pytest
import torch
from helpers import Planted

from shardrun.trainer.checkpoint import load_rank_file, rng_state, set_rng_state


def test_rng_states_come_back_exactly_from_plain_data(tmp_path):
    np.random.seed(3), random.seed(4), torch.manual_seed(5)
    torch.save({"rng": rng_state()}, tmp_path / "rank_0.pt")
    expected = (np.random.rand(), random.random(), torch.rand(1).item())
    set_rng_state(load_rank_file(str(tmp_path / "rank_0.pt"))["rng"])
    assert (np.random.rand(), random.random(), torch.rand(1).item()) == expected
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(tmp_path / "rank_0.pt")) == []


def test_an_earlier_rank_file_with_a_numpy_array_still_loads(tmp_path):
    np.random.seed(3)
    torch.save({"rng": {"python": random.getstate(), "numpy": np.random.get_state(),
                        "torch": torch.get_rng_state()}}, tmp_path / "rank_0.pt")
    expected = np.random.rand()
    set_rng_state(load_rank_file(str(tmp_path / "rank_0.pt"))["rng"])
    assert np.random.rand() == expected


def test_a_planted_pickle_is_refused_without_running(tmp_path):
    torch.save({"train": {"step": 1}, "rng": Planted(tmp_path / "pwned")}, tmp_path / "rank_0.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_rank_file(str(tmp_path / "rank_0.pt"))
    assert not (tmp_path / "pwned").exists()
