"""A bad spec fails fast with exit 2 and one clear line, before Ray is started or contacted."""

import socket
import sys
import threading

import pytest
from helpers import child_env, run, tiny_spec, write_checkpoint, write_spec

pytestmark = pytest.mark.timeout(120)


class Listener:
    """A TCP listener standing in for a Ray cluster: it only counts who connects."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen()
        self.sock.settimeout(0.2)
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            self.connections += 1
            conn.close()

    def close(self):
        self._stop.set()
        self._thread.join()
        self.sock.close()


@pytest.fixture
def ray_stand_in():
    listener = Listener()
    yield listener
    listener.close()


@pytest.mark.parametrize("override,expect", [
    ("deepspeed.zero_stagee=2",
     "deepspeed.zero_stagee: unknown key; did you mean 'zero_stage'? (got 2)"),
    ("scaling.num_workers=0",
     "scaling.num_workers: must be a whole number >= 1, or [min, max] of them for an elastic run (got 0)"),
])
def test_bad_spec_exits_2_naming_the_field(tmp_path, corpus, ray_stand_in, override, expect):
    path = write_spec(tmp_path / "job.yaml", tiny_spec(corpus, tmp_path / "runs"))
    result = run([sys.executable, "-m", "shardrun", "run", str(path), "--set", override],
                 timeout=60, check=False, env=child_env(RAY_ADDRESS=ray_stand_in.address))
    assert result.returncode == 2
    assert result.stdout.strip() == f"shardrun: error: --set {override}: {expect}"  # the --set, not the file
    assert ray_stand_in.connections == 0
    assert not (tmp_path / "runs").exists()


def test_missing_data_is_reported_before_ray(tmp_path, ray_stand_in):
    spec = tiny_spec(tmp_path / "no-such-data", tmp_path / "runs")
    path = write_spec(tmp_path / "job.yaml", spec)
    result = run([sys.executable, "-m", "shardrun", "run", str(path)], timeout=60, check=False,
                 env=child_env(RAY_ADDRESS=ray_stand_in.address))
    assert result.returncode == 2
    assert f"data.paths: {tmp_path / 'no-such-data'} does not exist" in result.stdout
    assert ray_stand_in.connections == 0


def test_a_ray_address_where_nothing_answers_is_an_error_not_a_wait(tmp_path, corpus):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    path = write_spec(tmp_path / "job.yaml", tiny_spec(corpus, tmp_path / "runs"))
    # Ray's client alone retries such an address for good (GCS warnings every 5 s)
    result = run([sys.executable, "-m", "shardrun", "run", str(path)], timeout=60, check=False,
                 env=child_env(RAY_ADDRESS=address))
    assert result.returncode == 2
    assert (f"shardrun: error: nothing answers at RAY_ADDRESS='{address}' ([Errno 111] Connection refused): "
            "check the address") in result.stdout
    assert not (tmp_path / "runs").exists()  # neither the run dir nor its lease


@pytest.mark.parametrize("position,expect", [
    ({"seed": 7}, "data.seed is 0 but the checkpoint's stream used seed 7"),
    ({"fingerprint": "other files"}, "the data changed: it now holds"),
    ({"partitions": 4}, "data.partitions is 2 but the run started with 4"),
], ids=["seed", "data", "partitions"])
def test_a_resume_on_other_data_seed_or_partitions_exits_2_before_ray(tmp_path, corpus, ray_stand_in, position,
                                                                      expect):
    from shardrun.config import DataSpec
    from shardrun.datasets import build_index

    spec = tiny_spec(corpus, tmp_path / "runs", data={"paths": [str(corpus)], "seq_len": 32, "partitions": 2})
    path = write_spec(tmp_path / "job.yaml", spec)
    index = build_index(DataSpec(**spec["data"]))
    written = {"version": 1, "seed": 0, "partitions": 2, "rows": index.rows, "row_groups": index.num_row_groups,
               "fingerprint": index.fingerprint, "epoch": 0, "offset": 8, **position}
    write_checkpoint(tmp_path / "runs" / "tiny" / "checkpoint_00000005", 5, data=written)
    result = run([sys.executable, "-m", "shardrun", "run", str(path)], timeout=60, check=False,
                 env=child_env(RAY_ADDRESS=ray_stand_in.address))
    assert result.returncode == 2, result.stdout
    assert f"shardrun: error: resuming tiny from its checkpoint of step 5: {expect}" in result.stdout
    assert ray_stand_in.connections == 0


def test_prepare_text_cli(tmp_path):
    (tmp_path / "a.txt").write_text("some text to learn from\n" * 50)
    out = tmp_path / "shards"
    result = run([sys.executable, "-m", "shardrun", "data", "prepare-text", str(tmp_path / "a.txt"),
                  "--out", str(out), "--seq-len", "16"], timeout=60)
    assert "wrote 1 Parquet shard to" in result.stdout
    again = run([sys.executable, "-m", "shardrun", "data", "prepare-text", str(tmp_path / "a.txt"),
                 "--out", str(out), "--seq-len", "16"], timeout=60, check=False)
    assert again.returncode == 2 and "already exists" in again.stdout
