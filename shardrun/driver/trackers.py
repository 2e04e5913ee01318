"""The experiment trackers shardrun.driver.tracking feeds: TensorBoard event files, Weights & Biases. Each imports
its client when it opens (an optional extra), and is made by `trackers(spec)` for the spec's tracking section."""

from __future__ import annotations

import importlib.util
import json
import os

from shardrun.config import JobSpec
from shardrun.errors import UserError, redact

EXTRAS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}
"""tracking.<key>: (the module it needs, the shardrun extra that installs it)."""


class TensorBoard:
    """Event files under a folder (`tensorboard --logdir`): each metric a scalar under its metrics.jsonl name, at
    the training step; the resolved spec, the run's tags and its restarts as text. Every invocation of the run adds
    an event file to the folder, which TensorBoard reads as one run."""

    name = "tensorboard"

    def __init__(self, folder: str):
        self.folder = folder
        self.writer = None

    def open(self, run_id: str | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        os.makedirs(self.folder, exist_ok=True)
        self.writer = SummaryWriter(log_dir=self.folder, flush_secs=10)
        return None

    def params(self, params: dict[str, str]) -> None:
        rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(params.items()))
        self.writer.add_text("spec", f"| key | value |\n| --- | --- |\n{rows}")

    def tags(self, tags: dict[str, str]) -> None:
        self.writer.add_text("tags", json.dumps(tags, indent=2))

    def metrics(self, step: int, values: dict[str, float]) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def event(self, step: int, text: str) -> None:
        self.writer.add_text("events", text, step)
        self.writer.flush()

    def artifact(self, path: str) -> None:
        """TensorBoard keeps no files: a JSON file's content is text, others are left out."""
        if path.endswith(".json"):
            with open(path) as f:
                self.writer.add_text(os.path.basename(path), f"```\n{f.read()}\n```")

    def close(self, state: str) -> None:
        self.writer.add_text("events", f"the run {state}")
        self.writer.close()


class WandB:
    """A Weights & Biases run: metrics at the training step, the spec as its config, the tags in its config under
    `shardrun`, events as an `event` text logged with the next step, summary.json as a file. Its id is the one kept
    in tracking.json, so every invocation continues it (resume="allow")."""

    name = "wandb"

    def __init__(self, spec, run_name: str, folder: str | None):
        self.spec, self.run_name, self.folder = spec, run_name, folder
        self.run = None

    def open(self, run_id: str | None) -> str:
        import wandb

        if self.folder:
            os.makedirs(self.folder, exist_ok=True)
        self.run = wandb.init(project=self.spec.project, entity=self.spec.entity, mode=self.spec.mode,
                              name=self.run_name, id=run_id, resume="allow", dir=self.folder,
                              settings=wandb.Settings(silent=True, console="off"))
        return self.run.id

    def params(self, params: dict[str, str]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def tags(self, tags: dict[str, str]) -> None:
        self.run.config.update({"shardrun": tags}, allow_val_change=True)

    def metrics(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def event(self, step: int, text: str) -> None:
        self.run.log({"event": text}, commit=False)  # W&B's steps only go forward: with the next step's row

    def artifact(self, path: str) -> None:
        """Into the run's files folder, which W&B uploads at the end (wandb.save would link it, and warn)."""
        import shutil

        shutil.copyfile(path, os.path.join(self.run.dir, os.path.basename(path)))

    def close(self, state: str) -> None:
        self.run.finish(exit_code=0 if state == "succeeded" else 1)


def trackers(spec: JobSpec) -> list:
    """The trackers the spec's tracking section asks for."""
    out = []
    tb = spec.tracking.tensorboard
    if tb is not None:
        out.append(TensorBoard(os.path.expanduser(tb.dir) if tb.dir else os.path.join(spec.run_dir, "tensorboard")))
    if spec.tracking.wandb is not None:  # its files in the run dir, where it is local
        out.append(WandB(spec.tracking.wandb, spec.name, None if "://" in spec.run_dir else spec.run_dir))
    return out


def check(spec: JobSpec) -> None:
    """Before Ray: each tracker the spec asks for has its client installed, a local folder, and (W&B online) a key
    (UserError)."""
    for key, (module, extra) in EXTRAS.items():
        if getattr(spec.tracking, key) is not None and importlib.util.find_spec(module) is None:
            raise UserError(f"tracking.{key} needs the {module} package: pip install 'shardrun[{extra}]'")
    tb = spec.tracking.tensorboard
    folder = tb.dir if tb is not None and tb.dir else spec.run_dir
    if tb is not None and "://" in folder:
        raise UserError(f"tracking.tensorboard{'.dir' if tb.dir else ' (in the run dir)'} {redact(folder)}: a folder "
                        "on the driver's machine is needed (TensorBoard's event files are appended to as the run goes; "
                        "a URI is not yet supported); set tracking.tensorboard.dir")
    wb = spec.tracking.wandb
    keyed = os.environ.get("WANDB_API_KEY") or _netrc_has("api.wandb.ai")
    if wb is not None and wb.mode == "online" and not keyed:
        raise UserError("tracking.wandb mode online needs W&B's key on this machine: set WANDB_API_KEY or run `wandb "
                        "login`; or set tracking.wandb.mode: offline (files in the run dir, `wandb sync` later)")


def _netrc_has(host: str) -> bool:
    """Whether ~/.netrc (where `wandb login` keeps the key) has an entry for host."""
    import netrc

    try:
        return netrc.netrc().authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False
