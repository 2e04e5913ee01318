"""What `shardrun submit` sends to the cluster as the job's working dir: the spec's project folder, never a
home folder or credentials, and no more than Ray itself will pack (its ignore files and excludes)."""

import shutil
import zipfile
from pathlib import Path

import pytest

from shardrun import cli, jobs, working_dir
from shardrun.errors import UserError

EXAMPLE = Path(__file__).parents[2] / "examples" / "gpt-stdlib.yaml"


def put(root: Path, *names: str) -> None:
    """Files under root, each holding its own name (a name ending in / is an empty folder)."""
    for name in names:
        target = root / name
        if name.endswith("/"):
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(name)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A home folder as a user's looks: credentials at its top."""
    for name in ("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "home"
    put(home, ".ssh/id_ed25519", ".azure/msal_token_cache.json", ".ray/auth_token", "notes.txt")
    monkeypatch.setenv("HOME", str(home))
    return home


@pytest.fixture
def submitted(monkeypatch, tmp_path):
    """jobs.submit against a fake cluster: what reached submit_job (py_modules copied to tmp_path/modules, as
    Ray uploads them), and the lines said."""
    seen = {"lines": []}

    class Cluster:
        def list_jobs(self):
            return []

        def submit_job(self, **kwargs):
            seen.update(kwargs)
            for module in kwargs["runtime_env"]["py_modules"][1:]:
                shutil.copytree(module, tmp_path / "modules" / Path(module).name)

    monkeypatch.setattr(jobs, "client", lambda at: Cluster())

    def submit(spec: Path, **options) -> dict:
        jobs.submit(str(spec), options.pop("overrides", []), at="http://127.0.0.1:8265", wait=False,
                    emit=seen["lines"].append,
                    working_dir=options.pop("working_dir", None), **options)
        return seen

    return submit


def a_project(root: Path) -> Path:
    """A project with its spec one folder down; returns the spec."""
    put(root, "pyproject.toml", "train.py", "configs/")
    shutil.copy(EXAMPLE, root / "configs" / "job.yaml")
    return root / "configs" / "job.yaml"


def test_the_project_folder_is_the_nearest_one_with_a_marker(tmp_path):
    home = tmp_path / "home"
    for marker in ("pyproject.toml", "setup.py", ".git/"):
        project = home / f"p-{marker.strip('/')}"
        put(project, marker, "a/b/job.yaml")
        assert working_dir.project_folder(project / "a/b/job.yaml", home) == project
    put(home, "plain/sub/job.yaml")
    assert working_dir.project_folder(home / "plain/sub/job.yaml", home) == home / "plain/sub"


def test_the_project_folder_is_never_the_home_folder_or_above_it(tmp_path):
    home = tmp_path / "home"
    put(tmp_path, "pyproject.toml", "home/.git/", "home/jobs/job.yaml", "home/top.yaml")
    assert working_dir.project_folder(home / "jobs/job.yaml", home) == home / "jobs"
    assert working_dir.project_folder(home / "top.yaml", home) == home


def test_the_files_honour_gitignore_rayignore_and_the_excludes(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES", raising=False)
    put(tmp_path, "train.py", "big.bin", "logs/run.log", "data/keep.txt", "data/cache.npy",
        ".git/config", ".venv/bin/python", "pkg/__pycache__/m.pyc", ".tools/ruff", "pkg/m.py", "pkg/.tools/x")
    (tmp_path / ".gitignore").write_text("logs/\n*.bin\n")
    (tmp_path / "data/.rayignore").write_text("*.npy\n")
    shipped = working_dir.uploaded_files(tmp_path, working_dir.ray_excludes())
    assert sorted(shipped) == [".gitignore", "data/.rayignore", "data/keep.txt", "pkg/m.py", "train.py"]
    assert shipped["train.py"] == len("train.py")
    assert working_dir.upload_line(tmp_path, {"a": 3 * 2**20, "b": 2**19}).endswith(": 2 files, 3.5 MiB (after "
                                                                          ".gitignore, .rayignore and excludes)")
    # as Ray: RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 drops .gitignore, never .rayignore; .tools goes whatever Ray's
    # default excludes are
    monkeypatch.setenv("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "1")
    monkeypatch.setenv("RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES", "")
    assert not working_dir.ray_gitignore()
    shipped = working_dir.uploaded_files(tmp_path, working_dir.ray_excludes(), working_dir.ray_gitignore())
    assert {"big.bin", "logs/run.log"} <= set(shipped)
    assert not {"data/cache.npy", ".tools/ruff", "pkg/.tools/x", ".git/config", ".venv/bin/python"} & set(shipped)


def test_the_files_are_those_ray_packs(tmp_path, monkeypatch):
    from ray._private.runtime_env.packaging import _zip_files  # packs only: starts no Ray

    monkeypatch.delenv("RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES", raising=False)
    work = tmp_path / "work"
    put(work, "a.py", "out/x", "out/keep/y", "src/m.py", "src/gen/z.py", "src/gen/.gitignore", "venv/lib.py",
        "docs/a.md", "docs/b.tmp", ".tools/t", "notes/n.txt")
    (work / ".gitignore").write_text("out/\n!out/keep/\n/a.py\n")
    (work / "src/gen/.gitignore").write_text("*\n")  # Ray drops the folder itself, not only its files
    (work / "docs/.rayignore").write_text("*.tmp\n")
    packed = tmp_path / "packed.zip"
    _zip_files(str(work), working_dir.ray_excludes(), str(packed), include_gitignore=True)
    with zipfile.ZipFile(packed) as z:
        ray_files = sorted(n for n in z.namelist() if not n.endswith("/"))
    assert sorted(working_dir.uploaded_files(work, working_dir.ray_excludes())) == ray_files


def test_secrets_at_the_top_are_found_unless_ignored(tmp_path):
    put(tmp_path, ".ssh/id_ed25519", ".docker/config.json", ".netrc", "id_rsa.pub", ".aws/credentials",
        ".git-credentials", ".kube/config", "src/.ssh/known_hosts", "src/.netrc", ".docker/daemon.json",
        ".gnupg/", "train.py")
    (tmp_path / ".rayignore").write_text(".aws/\n")
    found = working_dir.secrets_in(list(working_dir.uploaded_files(tmp_path, working_dir.ray_excludes())))
    assert found == [".docker/config.json", ".git-credentials", ".kube/", ".netrc", ".ssh/", "id_rsa.pub"]
    assert working_dir.secrets_in(["train.py", ".docker/daemon.json", "src/.ssh/x", "src/id_rsa"]) == []


def test_submit_uploads_the_spec_project_and_says_how_much(home, submitted, monkeypatch):
    project = home / "proj"
    spec = a_project(project)
    put(project, ".tools/cache.bin", "pkg/__pycache__/m.pyc")
    monkeypatch.chdir(home)  # where the secrets are: the old default sent this folder
    seen = submitted(spec)
    assert seen["runtime_env"]["working_dir"] == str(project.resolve())
    assert {".git", ".venv", "__pycache__", ".tools"} <= set(seen["runtime_env"]["excludes"])
    assert " run configs/job.yaml" in seen["entrypoint"]
    size = sum(len(n) for n in ("pyproject.toml", "train.py")) + EXAMPLE.stat().st_size
    assert seen["lines"][0] == (f"uploading {project.resolve()} as the job's working dir: 3 files, "
                                f"{size / 1024:.1f} KiB (after .gitignore, .rayignore and excludes)")


def test_submit_refuses_a_home_folder(home, submitted):
    shutil.copy(EXAMPLE, home / "job.yaml")
    with pytest.raises(UserError, match=r"is your home folder .*keep the spec in its project folder \(one with "
                                        r"\.git, pyproject\.toml, setup\.py\), give --working-dir PROJECT, or add "
                                        r"--allow-secrets"):
        submitted(home / "job.yaml")
    spec = a_project(home / "proj")
    with pytest.raises(UserError, match="is your home folder"):
        submitted(spec, working_dir=str(home))
    with pytest.raises(UserError, match="above your home"):
        submitted(spec, working_dir=str(home.parent))


def test_submit_refuses_secrets_at_the_top_unless_allowed(home, submitted):
    project = home / "proj"
    spec = a_project(project)
    put(project, ".ssh/id_ed25519", ".netrc")
    with pytest.raises(UserError, match=r"proj holds \.netrc, \.ssh/, credentials .*list them in .*\.rayignore, "
                                        r"give --working-dir PROJECT, or add --allow-secrets"):
        submitted(spec)
    seen = submitted(spec, allow_secrets=True)
    assert seen["runtime_env"]["working_dir"] == str(project.resolve())


def test_working_dir_still_overrides_and_is_checked_too(home, submitted, monkeypatch):
    project = home / "proj"
    spec = a_project(project)
    monkeypatch.chdir(home)
    seen = submitted(spec, working_dir=str(project / "configs"))
    assert seen["runtime_env"]["working_dir"] == str((project / "configs").resolve())
    assert " run job.yaml" in seen["entrypoint"]
    put(project, "configs/.git-credentials")
    with pytest.raises(UserError, match=r"configs holds \.git-credentials"):
        submitted(spec, working_dir=str(project / "configs"))
    put(home, "other/")
    with pytest.raises(UserError, match="outside the working dir"):
        submitted(spec, working_dir=str(home / "other"))


def test_submit_has_an_allow_secrets_flag():
    from shardrun.cli import build_parser

    assert build_parser().parse_args(["submit", "job.yaml", "--allow-secrets"]).allow_secrets
    assert not build_parser().parse_args(["submit", "job.yaml"]).allow_secrets


def test_set_values_holding_a_secret_reach_the_job_in_a_file_not_on_its_command_line(home, submitted, tmp_path,
                                                                                      monkeypatch):
    spec = a_project(home / "proj")
    plain = submitted(spec, overrides=["run.max_steps=7"])
    assert plain["entrypoint"].endswith(" run configs/job.yaml --set run.max_steps=7")
    storage = "checkpoint.storage=abfs://runs@acct.dfs.core.windows.net/r?sv=2024&sig=SECRETSIG"
    seen = submitted(spec, overrides=["run.max_steps=7", storage])
    assert "SECRETSIG" not in seen["entrypoint"] and "--set" not in seen["entrypoint"]
    package = seen["entrypoint"].split("--overrides-from ")[1]
    said = "\n".join(seen["lines"])
    assert "SECRETSIG" not in said and "not on its command line (run.max_steps=7, checkpoint.storage=abfs" in said
    monkeypatch.syspath_prepend(str(tmp_path / "modules"))
    assert jobs.overrides_from(package) == ["run.max_steps=7", storage]  # in their order
    args = cli.build_parser().parse_args(["run", "job.yaml", "--overrides-from", package])
    assert args.overrides_from == package
    with pytest.raises(UserError, match="--overrides-from shardrun_overrides_gone: cannot read"):
        jobs.overrides_from("shardrun_overrides_gone")
