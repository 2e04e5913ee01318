"""`shardrun submit | status | logs | stop`: where they find the Ray cluster's token (where Ray itself looks),
and the environment a submitted job gets."""

import pytest

from shardrun import jobs
from shardrun.errors import UserError


@pytest.fixture
def home(tmp_path, monkeypatch):
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray/auth_token").write_text("from-home\n")
    return tmp_path


def test_the_variable_then_the_named_file_then_the_home_file(home, monkeypatch):
    assert jobs.token() == "from-home"
    named = home / "token"
    named.write_text(" from-path \n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(named))
    assert jobs.token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-variable")
    assert jobs.token() == "from-variable"


def test_a_token_path_that_names_no_file_is_an_error_not_a_fallback_to_another_token(home, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(home / "typo"))
    with pytest.raises(UserError, match=r"RAY_AUTH_TOKEN_PATH=.*typo names no file"):
        jobs.token()


def test_no_token_anywhere(home):
    (home / ".ray/auth_token").unlink()
    assert jobs.token() is None


def test_env_options_become_the_jobs_environment_with_the_stop_grace_raised():
    assert jobs.env_vars([]) == {"RAY_JOB_STOP_WAIT_TIME_S": str(jobs.STOP_WAIT_S)}
    assert jobs.env_vars(["NCCL_SOCKET_IFNAME=eth0", "X=a=b", "EMPTY=", "RAY_JOB_STOP_WAIT_TIME_S=60"]) == {
        "RAY_JOB_STOP_WAIT_TIME_S": "60", "NCCL_SOCKET_IFNAME": "eth0", "X": "a=b", "EMPTY": ""}
    for bad in ("NCCL_SOCKET_IFNAME", "=eth0", "1X=2", "A-B=1"):
        with pytest.raises(UserError, match="give KEY=VALUE"):
            jobs.env_vars([bad])
