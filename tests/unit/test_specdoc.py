"""docs/spec.md: generated from the spec's models, current, and complete."""

import os
from typing import get_args

import yaml
from helpers import REPO
from pydantic import BaseModel

from shardrun import specdoc
from shardrun.config import JobSpec

SPEC_MD = REPO / "docs" / "spec.md"


def _fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every field's dotted path, found here independently of specdoc."""
    paths = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        paths.append(path)
        for sub in (field.annotation, *get_args(field.annotation)):
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                paths += _fields(sub, f"{path}.")
    return paths


def _row(doc: str, key: str) -> str:
    return next(line for line in doc.splitlines() if line.startswith(f"| `{key}` |"))


def test_docs_spec_md_is_current():
    assert SPEC_MD.read_text() == specdoc.generate(), (
        f"docs/spec.md is stale: regenerate it with `{specdoc.COMMAND}` and commit it")


def test_every_field_of_every_section_has_a_row_and_every_section_a_table():
    doc = specdoc.generate()
    fields = _fields(JobSpec)
    assert len(fields) > 60
    for path in fields:
        assert _row(doc, path), path
    for path, _ in specdoc.sections(JobSpec)[1:]:
        assert f"\n## `{path}`\n" in doc
    assert [p for p, _ in specdoc.sections(JobSpec)][:6] == ["", "model", "model.hf", "model.lora", "data",
                                                             "data.prepare"]


def test_types_defaults_and_constraints():
    doc = specdoc.generate()
    assert _row(doc, "name").startswith(
        "| `name` | string (at most 200 characters, matching `^[A-Za-z0-9][A-Za-z0-9._-]*$`) | *required* | Run name;")
    assert "| integer (>= 0, <= 3) | `2` | ZeRO stage 0-3. |" in _row(doc, "deepspeed.zero_stage")
    assert "| `fp32`, `bf16` or `fp16` | `fp32` |" in _row(doc, "deepspeed.precision")
    assert "| integer or [integer, integer] | `2` | Training processes" in _row(doc, "scaling.num_workers")
    assert "| [number, number] | `[0.9, 0.95]` |" in _row(doc, "deepspeed.optimizer.betas")
    assert "| number (> 0) | `1.0e-08` |" in _row(doc, "deepspeed.optimizer.eps")
    assert "| list of string (at least 1 item) | *required* |" in _row(doc, "data.paths")
    assert "| integer (>= 1) or null | `null` |" in _row(doc, "data.seq_len")
    assert "| section or null | `null` | See [`data.prepare`](#dataprepare). Build" in _row(doc, "data.prepare")
    assert "| section | `{}` | See [`deepspeed`](#deepspeed). |" in _row(doc, "deepspeed")
    assert "&lt;run dir>/metrics.jsonl" in _row(doc, "metrics.jsonl")  # not an HTML tag


def test_the_example_is_the_resolved_spec_without_machine_paths():
    doc = specdoc.generate()
    example = yaml.safe_load(doc.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert example == JobSpec.model_validate(example).model_dump(mode="json")
    assert example["data"]["paths"] == ["~/shardrun/data/python-stdlib-128"]
    assert example["run"]["log_every"] == 25 and example["model"]["vocab_size"] == 256
    assert str(REPO) not in doc and os.path.expanduser("~/") not in doc


def test_check_exits_1_with_a_diff_when_stale(tmp_path, capsys):
    page = tmp_path / "spec.md"
    page.write_text(specdoc.generate().replace("Peak learning rate.", "Old words."))
    assert specdoc.main(["--check", str(page)]) == 1
    out, err = capsys.readouterr()
    assert "-| `deepspeed.optimizer.lr` | number (> 0) | `0.0003` | Old words. |" in out
    assert f"regenerate it: {specdoc.COMMAND}" in err
    page.write_text(specdoc.generate())
    assert specdoc.main(["--check", str(page)]) == 0
