"""Instruction data made from this Python's standard library, for examples/finetune-docstrings.yaml: a function's
signature as the prompt, the first line of its docstring as the completion.

    python -m examples.docstrings --out ~/shardrun/data/docstrings [--max-bytes 128]

writes `train.jsonl` and `eval.jsonl` (the held-out functions: those of one module in twenty, chosen by a hash of
the module's name, so no module is in both). Each record is

    {"prompt": "def isabs(s):\\n    \\"\\"\\"", "completion": "Test whether a path is absolute\\"\\"\\""}

and fits --max-bytes bytes (the demo's GPT reads 128 bytes at a time). Then tokenize both with the model's own
tokenizer (the demo's, exported in the Hugging Face format, reads bytes):

    shardrun data prepare ~/shardrun/data/docstrings/train.jsonl --out ~/shardrun/data/docstrings-train \\
        --format prompt-completion --seq-len 128 --tokenizer ~/shardrun/exports/gpt-stdlib-hf

The same Python gives the same files: modules are read in sorted order.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

HELD_OUT = 20
"""One module in this many is held out for evaluation."""
QUOTES = '"""'


def documented_functions(stdlib: Path) -> Iterator[tuple[str, list[str], ast.FunctionDef | ast.AsyncFunctionDef,
                                                         str]]:
    """(module name, its source lines, the function's node, its docstring) of every function with a docstring
    in the standard library's top-level modules, in sorted order."""
    for path in sorted(stdlib.glob("*.py")):
        try:
            source = path.read_text(encoding="utf-8")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", SyntaxWarning)
                tree = ast.parse(source)
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = source.splitlines()
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and (doc := ast.get_docstring(node)):
                yield path.stem, lines, node, doc


def records(stdlib: Path, max_bytes: int) -> Iterator[tuple[str, dict]]:
    """(module, record) pairs: the signature, dedented, then the docstring's opening quotes; the docstring's first
    line and its closing quotes. Records longer than max_bytes bytes are left out."""
    for module, lines, node, doc in documented_functions(stdlib):
        signature = lines[node.lineno - 1:node.body[0].lineno - 1]
        if not signature:
            continue
        indent = len(signature[0]) - len(signature[0].lstrip())
        prompt = "\n".join(line[indent:] for line in signature) + f"\n    {QUOTES}"
        completion = doc.splitlines()[0].strip() + QUOTES
        if len(completion) > len(QUOTES) + 8 and len((prompt + completion).encode()) + 1 <= max_bytes:
            yield module, {"prompt": prompt, "completion": completion}


def held_out(module: str) -> bool:
    return int(hashlib.sha256(module.encode()).hexdigest(), 16) % HELD_OUT == 0


def make(out: Path, max_bytes: int = 128) -> tuple[int, int]:
    """Writes out/train.jsonl and out/eval.jsonl; returns their record counts."""
    out.mkdir(parents=True, exist_ok=True)
    counts = {"train": 0, "eval": 0}
    with open(out / "train.jsonl", "w", encoding="utf-8") as train, open(out / "eval.jsonl", "w",
                                                                          encoding="utf-8") as held:
        for module, record in records(Path(sysconfig.get_paths()["stdlib"]), max_bytes):
            split = "eval" if held_out(module) else "train"
            (held if split == "eval" else train).write(json.dumps(record) + "\n")
            counts[split] += 1
    return counts["train"], counts["eval"]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for train.jsonl and eval.jsonl")
    p.add_argument("--max-bytes", type=int, default=128, help="longest record, prompt and completion (default 128)")
    args = p.parse_args()
    n_train, n_eval = make(args.out.expanduser(), args.max_bytes)
    print(f"wrote {n_train:,} training and {n_eval:,} held-out records to {args.out}")
