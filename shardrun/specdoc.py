"""The job spec reference, docs/spec.md, generated from JobSpec's own fields so that it cannot drift.

`python -m shardrun.specdoc > docs/spec.md` writes it; `python -m shardrun.specdoc --check docs/spec.md`
exits 1 with a diff when the file is stale.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import types
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types as at
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from shardrun.config import JobSpec

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "gpt-stdlib.yaml"
COMMAND = "python -m shardrun.specdoc > docs/spec.md"

INTRO = f"""\
# Job spec reference

A job is one YAML file: a `name` and the sections below. `shardrun check JOB.yaml` validates it,
makes the other checks a run makes before Ray (the data, the checkpoint it would resume from), and
prints it with every default filled in. `--set key.path=value` overrides any field on the
command line, e.g. `--set deepspeed.zero_stage=3` (the value is read as YAML). An unknown key or a
bad value stops the command before anything starts, naming the field (and the `--set` it came from).

A job spec is code: `model.entrypoint` imports a module and calls a function of it, on your machine
(`shardrun check` included) and on every worker. Run specs you would run as scripts, and review them
as you review code. Storage secrets in it (SAS tokens, keys) are masked in what shardrun prints and in
the job.yaml it saves in the run dir.

This page is generated from the spec's models in `shardrun/config.py`: edit the field
descriptions there, then run `{COMMAND}`.
A test fails while the page is stale.

In the tables, *key* is the field's path as `--set` takes it, *type* what the field accepts
(`null` is YAML's empty value), and *default* what an omitted field gets (`{{}}` for a section:
all of its own defaults).
"""

_SCALARS = {str: "string", int: "integer", float: "number", bool: "true or false"}


def generate(example: Path = EXAMPLE) -> str:
    """The whole reference as Markdown: intro, one table per section in spec order, the example."""
    parts = [INTRO]
    for path, model in sections(JobSpec):
        parts.append(section_table(path, model))
    parts.append(example_block(example))
    return "\n".join(parts)


def sections(model: type[BaseModel], prefix: str = "") -> list[tuple[str, type[BaseModel]]]:
    """(dotted path, model) of the spec and every nested section, depth first in field order."""
    found = [(prefix, model)]
    for name, field in model.model_fields.items():
        sub = section_model(field.annotation)
        if sub is not None:
            found += sections(sub, f"{prefix}.{name}" if prefix else name)
    return found


def section_model(annotation: Any) -> type[BaseModel] | None:
    """The section model of a field (also an optional one), or None for a plain value."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def section_table(path: str, model: type[BaseModel]) -> str:
    """A heading and a table of the section's fields."""
    heading = f"## `{path}`" if path else "## Top level"
    doc = model.__dict__.get("__doc__")
    lines = [heading, ""] + ([doc.strip(), ""] if doc else [])
    lines += ["| key | type | default | what |", "| --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        key = f"{path}.{name}" if path else name
        lines.append("| " + " | ".join(_cell(c) for c in (
            f"`{key}`", type_text(field), default_text(field), describe(key, field))) + " |")
    return "\n".join(lines) + "\n"


def describe(key: str, field: FieldInfo) -> str:
    """The field's own description; a section's row points to the section's table."""
    text = _prose(field.description or "")
    if section_model(field.annotation) is not None:
        return f"See [`{key}`](#{key.replace('.', '')}). {text}".strip()
    return text


def type_text(field: FieldInfo) -> str:
    """What the field accepts, with its constraints: `integer (>= 0, <= 3)`, `` `fp32`, `bf16` or `fp16` ``."""
    args = get_args(field.annotation)
    optional = _is_union(field.annotation) and type(None) in args
    inner = [a for a in args if a is not type(None)] if optional else [field.annotation]
    text = _annotation_text(inner[0] if len(inner) == 1 else Union[tuple(inner)])  # noqa: UP007
    limits = constraints(field)
    if limits:
        text += f" ({', '.join(limits)})"
    return f"{text} or null" if optional else text


def constraints(field: FieldInfo) -> list[str]:
    """The field's declared bounds, lengths and pattern, in words."""
    words = []
    for item in field.metadata:
        if isinstance(item, at.Ge):
            words.append(f">= {item.ge}")
        elif isinstance(item, at.Gt):
            words.append(f"> {item.gt}")
        elif isinstance(item, at.Le):
            words.append(f"<= {item.le}")
        elif isinstance(item, at.Lt):
            words.append(f"< {item.lt}")
        elif isinstance(item, at.MinLen):
            words.append(f"at least {item.min_length} {_units(field, item.min_length)}")
        elif isinstance(item, at.MaxLen):
            words.append(f"at most {item.max_length} {_units(field, item.max_length)}")
        elif getattr(item, "pattern", None):
            words.append(f"matching `{item.pattern}`")
    return words


def _units(field: FieldInfo, n: int) -> str:
    unit = "character" if field.annotation is str else "item"
    return unit if n == 1 else unit + "s"


def default_text(field: FieldInfo) -> str:
    """The default as YAML, `{}` for a section of defaults, or *required*."""
    if field.is_required():
        return "*required*"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "`{}`"
    return f"`{yaml_value(value)}`"


def yaml_value(value: Any) -> str:
    """A value as it is written in a spec file (flow style: `[0.9, 0.95]`, `1.0e-08`, `null`)."""
    if isinstance(value, tuple):
        value = list(value)
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("\n...\n").strip()


def example_block(example: Path) -> str:
    """The example job with every default filled in, its own paths kept as written (no machine paths)."""
    raw = yaml.safe_load(example.read_text())
    # JobSpec alone, not config.load: load makes local paths absolute, which would differ per machine.
    resolved = JobSpec.model_validate(raw).to_yaml()
    name = example.relative_to(EXAMPLE.parents[1]) if example.is_relative_to(EXAMPLE.parents[1]) else example.name
    return (f"## Example\n\n`{name}` with every default filled in, as `shardrun check {name}` prints it "
            "(which also makes local paths absolute):\n\n```yaml\n" + resolved + "```\n")


def _annotation_text(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        choices = [f"`{yaml_value(a)}`" for a in args]
        return choices[0] if len(choices) == 1 else f"{', '.join(choices[:-1])} or {choices[-1]}"
    if _is_union(annotation):
        return " or ".join(_annotation_text(a) for a in args)
    if origin is list:
        return f"list of {_annotation_text(args[0])}"
    if origin is tuple:
        return "[" + ", ".join(_annotation_text(a) for a in args) + "]"
    if origin is dict:
        return "mapping"
    if section_model(annotation) is not None:
        return "section"
    if annotation is type(None):
        return "null"
    return _SCALARS.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _is_union(annotation: Any) -> bool:
    return get_origin(annotation) in (Union, types.UnionType)


def _prose(text: str) -> str:
    """Description text for Markdown: `<run dir>` would be read as an HTML tag."""
    return text.replace("&", "&amp;").replace("<", "&lt;")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def main(argv: list[str] | None = None) -> int:
    """Print the reference, or with --check FILE compare it with FILE (exit 1 and a diff when stale)."""
    parser = argparse.ArgumentParser(prog="python -m shardrun.specdoc", description=__doc__.splitlines()[0])
    parser.add_argument("--check", metavar="FILE", help="exit 1 with a diff if FILE is not what would be written")
    args = parser.parse_args(argv)
    text = generate()
    if args.check is None:
        sys.stdout.write(text)
        return 0
    path = Path(args.check)
    current = path.read_text() if path.exists() else ""
    if current == text:
        return 0
    sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), text.splitlines(True),
                                               f"{path} (now)", f"{path} (generated)"))
    print(f"{path} is stale; regenerate it: {COMMAND}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
