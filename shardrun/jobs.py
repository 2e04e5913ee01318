"""Jobs on a Ray cluster through its Jobs API: submit a spec, follow it, ask its status, read its logs, stop it.

The cluster is named by its dashboard address (`--address`, else RAY_ADDRESS when it is an http URL;
through an SSH tunnel: http://127.0.0.1:8265). The token is taken where Ray takes it: RAY_AUTH_TOKEN,
the file in RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token, and sent as `Authorization: Bearer`.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from shardrun import config, fs
from shardrun.driver.tracking import GIT_REVISION_ENV, git_revision
from shardrun.errors import UserError, redact
from shardrun.lease import RunDirBusy
from shardrun.working_dir import (
    ALWAYS_EXCLUDED,
    ray_excludes,
    ray_gitignore,
    refuse_home,
    refuse_secrets,
    secrets_in,
    upload_line,
    uploaded_files,
    working_folder,
)

STOP_WAIT_S = 300
"""What `ray job stop` waits after its SIGTERM before a SIGKILL (RAY_JOB_STOP_WAIT_TIME_S): time for the
workers to write a checkpoint at the next step."""

EXIT = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 143}
OVERRIDES_FILE = "overrides.json"
"""In the package named by `shardrun run --overrides-from`: the --set values that hold secrets, as a JSON list."""


def overrides_from(package: str) -> list[str]:
    """The --set values that `submit` sent in a package of their own (see submit)."""
    import importlib

    try:
        module = importlib.import_module(package)
        return json.loads(Path(module.__file__).with_name(OVERRIDES_FILE).read_text())
    except (ImportError, OSError, ValueError) as e:
        raise UserError(f"--overrides-from {package}: cannot read the job's --set values ({e}); submit the job "
                        "again") from None


def token() -> str | None:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if named:  # as Ray does: a path that names no file is an error, not a reason to send another token
        if not os.path.isfile(named):
            raise UserError(f"RAY_AUTH_TOKEN_PATH={named} names no file: point it at the cluster's token file, "
                            "or unset it")
        return Path(named).read_text().strip()
    default = Path.home() / ".ray" / "auth_token"
    return default.read_text().strip() if default.is_file() else None


def address(given: str | None) -> str:
    found = given or os.environ.get("RAY_ADDRESS", "")
    if not found.startswith(("http://", "https://")):
        raise UserError("give the Ray dashboard's address: --address http://HEAD:8265 (through an SSH tunnel: "
                        "http://127.0.0.1:8265), or set RAY_ADDRESS to it")
    return found.rstrip("/")


def client(at: str | None):
    from ray.job_submission import JobSubmissionClient

    url = address(at)
    secret = token()
    headers = {"Authorization": f"Bearer {secret}"} if secret else None
    try:
        made = JobSubmissionClient(url, headers=headers)
        made.list_jobs()  # fails here, named, rather than halfway through a command
    except Exception as e:  # noqa: BLE001 - Ray raises RuntimeError/ConnectionError with the HTTP text inside
        text = str(e)
        if "401" in text or "403" in text or "uthentica" in text:
            how = "no token was found" if not secret else "it refused this client's token"
            raise UserError(f"the Ray cluster at {url} wants its token and {how}: put it in RAY_AUTH_TOKEN, "
                            "RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token (docs/deploy-azure.md says where it "
                            "lives)") from None
        raise UserError(f"cannot reach the Ray Jobs API at {url} ({text.splitlines()[0][:300]}); check the address "
                        "and the SSH tunnel (ssh -L 8265:localhost:8265 HEAD)") from None
    return made


def env_vars(pairs: list[str]) -> dict[str, str]:
    """--env KEY=VALUE options as the job's environment variables, with RAY_JOB_STOP_WAIT_TIME_S raised
    (a value given here wins)."""
    found = {"RAY_JOB_STOP_WAIT_TIME_S": str(STOP_WAIT_S)}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not key.replace("_", "a").isalnum() or key[0].isdigit():
            raise UserError(f"--env {pair}: give KEY=VALUE, a variable's name and its value "
                            "(e.g. --env NCCL_SOCKET_IFNAME=eth0)")
        found[key] = value
    return found


def submit(spec_path: str, overrides: list[str], *, at: str | None, working_dir: str | None, wait: bool,
           emit: Callable[[str], None], env: list[str] = (), allow_secrets: bool = False, verbose: bool = False) -> int:
    """Validate the spec here, then submit `shardrun run` with the working dir; follow it unless not wait.
    env: KEY=VALUE pairs for the job's driver and every one of its workers (Ray's runtime_env env_vars).
    allow_secrets: upload a home folder or one with credentials at its top. verbose: the job's console keeps Ray's
    and DeepSpeed's lines (`shardrun run --verbose`)."""
    spec = config.load(spec_path, overrides)  # errors before anything reaches the cluster
    variables = env_vars(list(env))
    path = Path(spec_path).resolve()
    home = Path.home().resolve()
    work = working_folder(path, working_dir, home)
    if not allow_secrets:
        refuse_home(work, home)  # before counting: a home folder can take minutes to walk
    files = uploaded_files(work, ray_excludes(), ray_gitignore())
    if not allow_secrets:
        refuse_secrets(work, secrets_in(list(files)))
    jobs = client(at)
    refuse_running(jobs, spec.name)
    import shardrun

    submission = f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"
    # Overrides of which one holds a secret (a SAS in a storage URI) stay off the command line, which `ray job
    # list`, the dashboard and `ps` show: they travel in a file of their own, uploaded as the working dir is.
    hidden = list(overrides) if any(redact(o) != o for o in overrides) else []
    shown = [] if hidden else list(overrides)
    with tempfile.TemporaryDirectory() as tmp:
        modules = [str(Path(shardrun.__file__).parent)]  # this client's shardrun (the cluster has its deps)
        entrypoint = " ".join(["python", "-m", "shardrun", "run", _quote(str(path.relative_to(work))),
                               *(f"--set {_quote(o)}" for o in shown), *(["--verbose"] if verbose else [])])
        if hidden:
            package = Path(tmp, f"shardrun_overrides_{secrets.token_hex(4)}")
            package.mkdir()
            (package / "__init__.py").write_text("")
            (package / OVERRIDES_FILE).write_text(json.dumps(hidden))
            modules.append(str(package))
            entrypoint += f" --overrides-from {package.name}"
        revision = git_revision(str(work))  # for the trackers' tags: the upload leaves .git behind
        runtime_env = {"working_dir": str(work), "excludes": list(ALWAYS_EXCLUDED), "py_modules": modules,
                       "env_vars": {GIT_REVISION_ENV: revision, **variables} if revision else variables}
        emit(upload_line(work, files))
        jobs.submit_job(entrypoint=entrypoint, submission_id=submission, runtime_env=runtime_env,
                        metadata={"shardrun_run": spec.name})
    if hidden:
        emit("a --set value holds a secret: the --set values go to the job in a file, not on its command line ("
             + ", ".join(redact(o) for o in hidden) + ")")
    emit(f"submitted {submission} to {address(at)}: {entrypoint}")
    if not wait:
        emit(f"follow it with: shardrun logs {submission} --follow --address {address(at)}")
        return 0
    return follow(jobs, submission, emit)


def refuse_running(jobs, name: str) -> None:
    """A run name with a job on the cluster that has not ended is refused, the job named (the likeliest way to two
    runs in one run dir: Ctrl-C on `shardrun submit`, whose job goes on, then submitting again)."""
    going = [j for j in jobs.list_jobs()
             if (j.metadata or {}).get("shardrun_run") == name and j.status.value not in EXIT]
    if going:
        job = max(going, key=lambda j: j.start_time or 0)
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime((job.start_time or 0) / 1000))
        raise RunDirBusy(f"run {name!r} is already on this cluster: job {job.submission_id}, {job.status.value} "
                         f"since {started} UTC. Follow it (`shardrun logs {job.submission_id} --follow`), stop it "
                         f"(`shardrun stop {job.submission_id}`), or give this run another name.")


def follow(jobs, submission: str, emit: Callable[[str], None]) -> int:
    """Print the job's logs as they come, then its end; the exit status says how it ended."""
    async def tail() -> None:
        async for lines in jobs.tail_job_logs(submission):
            sys.stdout.write(lines)
            sys.stdout.flush()

    asyncio.run(tail())
    status = _wait_final(jobs, submission)
    emit(f"job {submission}: {status}")
    return EXIT.get(status, 1)


def _wait_final(jobs, submission: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = jobs.get_job_status(submission).value
        if status in EXIT or time.monotonic() > deadline:
            return status
        time.sleep(1)


def find(jobs, run: str):
    """A job by its submission id, or the newest one of a run name."""
    known = jobs.list_jobs()
    exact = [j for j in known if j.submission_id == run]
    if exact:
        return exact[0]
    mine = [j for j in known if (j.metadata or {}).get("shardrun_run") == run]
    if not mine:
        raise UserError(f"no job {run!r} on this cluster (neither a submission id nor a run name shardrun submitted)")
    return max(mine, key=lambda j: j.start_time or 0)


def status(run: str, *, at: str | None) -> int:
    jobs = client(at)
    job = find(jobs, run)
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime((job.start_time or 0) / 1000))
    print(f"{job.submission_id}: {job.status.value} (started {started} UTC){': ' + job.message if job.message else ''}")
    return 0


def logs(run: str, *, at: str | None, follow_logs: bool) -> int:
    jobs = client(at)
    job = find(jobs, run)
    if follow_logs:
        return follow(jobs, job.submission_id, fs.log)
    sys.stdout.write(jobs.get_job_logs(job.submission_id))
    return 0


def stop(run: str, *, at: str | None) -> int:
    jobs = client(at)
    job = find(jobs, run)
    if job.status.value in EXIT:
        print(f"{job.submission_id} has already ended: {job.status.value}")
        return 0
    jobs.stop_job(job.submission_id)
    print(f"stopping {job.submission_id}: its workers checkpoint at the next step and stop "
          f"(up to {STOP_WAIT_S} s)")
    final = _wait_final(jobs, job.submission_id, timeout=STOP_WAIT_S + 30)
    print(f"{job.submission_id}: {final}")
    return 0 if final in EXIT else 1


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)
