"""What `shardrun submit` sends to the cluster as the job's working dir: the spec's project folder, less what
.gitignore, .rayignore and the excludes leave out (counted as Ray packs it), never a home folder or
credentials unless asked."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from shardrun.errors import UserError

PROJECT_MARKERS = (".git", "pyproject.toml", "setup.py")
"""What makes a folder a project's root, for the folder `shardrun submit` uploads by default."""

ALWAYS_EXCLUDED = [".git", ".venv", "__pycache__", ".tools"]
"""Never uploaded (runtime_env excludes, gitignore patterns): Ray drops the first three by default, but its
RAY_OVERRIDE_RUNTIME_ENV_DEFAULT_EXCLUDES can turn that off."""

# credentials that sit at the top of a home folder: a working dir that holds them there is one by mistake
SECRET_FOLDERS = (".ssh", ".aws", ".azure", ".gnupg", ".kube", ".ray")
SECRET_FILES = (".docker/config.json", ".netrc", ".git-credentials")
SECRET_NAMES = "id_rsa*"


def project_folder(spec: Path, home: Path) -> Path:
    """The spec's project: the nearest folder at or above it with a project marker, else the spec's own."""
    start = spec.parent
    for folder in (start, *start.parents):
        if folder == home or folder == folder.parent:  # a home folder or / is nobody's project
            break
        if any((folder / marker).exists() for marker in PROJECT_MARKERS):
            return folder
    return start


def working_folder(spec: Path, given: str | None, home: Path) -> Path:
    """The folder that goes to the cluster: --working-dir, else the spec's project folder."""
    work = Path(given).resolve() if given else project_folder(spec, home)
    if not spec.is_relative_to(work):
        raise UserError(f"{spec} is outside the working dir {work} that goes to the cluster; give a "
                        "--working-dir that holds it, or leave it out to upload the spec's project folder")
    return work


def uploaded_files(folder: Path, excludes: list[str], gitignore: bool = True) -> dict[str, int]:
    """What Ray packs from folder as its working dir: each file's relative path and bytes."""
    try:
        return {path.relative_to(folder).as_posix(): path.stat().st_size
                for path in _walk(folder, [_matcher(folder, excludes)], gitignore)}
    except OSError as e:
        raise UserError(f"cannot read {e.filename} in the working dir {folder} ({e.strerror}); list it in "
                        f"{folder / '.rayignore'}, or give another --working-dir") from None


def _walk(path: Path, matchers: list[Callable[[Path], bool]], gitignore: bool) -> Iterator[Path]:
    """Ray's own walk (packaging._dir_travel): a folder's ignore files apply to it and all below it."""
    matchers = matchers + _ignore_files(path, gitignore)
    if any(match(path) for match in matchers):
        return
    if path.is_dir():
        for sub in path.iterdir():
            yield from _walk(sub, matchers, gitignore)
    elif path.is_file():
        yield path


def _ignore_files(folder: Path, gitignore: bool) -> list[Callable[[Path], bool]]:
    """Matchers for the folder's .rayignore, and its .gitignore unless Ray is told to ignore those."""
    names = [".gitignore", ".rayignore"] if gitignore else [".rayignore"]
    found = []
    for name in names:
        if (folder / name).is_file():
            with (folder / name).open() as f:  # read as Ray reads it, so the patterns are the same
                found.append(_matcher(folder, f.readlines()))
    return found


def _matcher(folder: Path, patterns: list[str]) -> Callable[[Path], bool]:
    """Whether a path under folder matches gitignore-style patterns, with Ray's own matcher."""
    from ray._private.thirdparty.pathspec import PathSpec  # the copy Ray matches with: same answers

    spec = PathSpec.from_lines("gitwildmatch", patterns)
    return lambda path: spec.match_file(str(path.relative_to(folder)))


def ray_gitignore() -> bool:
    """Whether Ray's upload reads .gitignore files (RAY_RUNTIME_ENV_IGNORE_GITIGNORE=1 turns it off)."""
    return os.environ.get("RAY_RUNTIME_ENV_IGNORE_GITIGNORE", "0") != "1"


def ray_excludes() -> list[str]:
    """All that Ray excludes from this working dir: its defaults, then the ones shardrun adds."""
    from ray._private import ray_constants

    defaults = getattr(ray_constants, "get_runtime_env_default_excludes", list)()  # older Rays have none
    return [*defaults, *ALWAYS_EXCLUDED]


def secrets_in(files: list[str]) -> list[str]:
    """The known credentials at the top of a folder, among the relative paths of its files."""
    found = set()
    for name in files:
        top, _, below = name.partition("/")
        if top in SECRET_FOLDERS and below:
            found.add(f"{top}/")
        elif name in SECRET_FILES or (not below and fnmatch.fnmatchcase(top, SECRET_NAMES)):
            found.add(name)
    return sorted(found)


def refuse_home(work: Path, home: Path) -> None:
    """A home folder, or one that holds it, is everything its user has: never a working dir."""
    if home.is_relative_to(work):
        raise UserError(f"the working dir {work} is {'your home folder' if work == home else 'above your home'}"
                        " and would ship all of it (.ssh, cloud logins, Ray's token) to the cluster; keep the "
                        f"spec in its project folder (one with {', '.join(PROJECT_MARKERS)}), give --working-dir "
                        "PROJECT, or add --allow-secrets to upload it anyway")


def refuse_secrets(work: Path, found: list[str]) -> None:
    """Credentials at the top of the working dir stay here."""
    if found:
        raise UserError(f"the working dir {work} holds {', '.join(found)}, credentials that would go to the "
                        f"cluster; list them in {work / '.rayignore'}, give --working-dir PROJECT, or add "
                        "--allow-secrets to upload them anyway")


def upload_line(work: Path, files: dict[str, int]) -> str:
    """One line that says which folder goes to the cluster and how much of it."""
    size = sum(files.values())
    shown = f"{size / 2**20:.1f} MiB" if size >= 2**20 / 10 else f"{size / 2**10:.1f} KiB"  # no "0.0 MiB"
    return (f"uploading {work} as the job's working dir: {len(files)} files, {shown} (after .gitignore, "
            ".rayignore and excludes)")
