"""A labelled table made from this Python's standard library, for examples/hf-classify.yaml: is a piece of text
Python code (label 0) or English prose, a docstring (label 1)?

    python -m examples.code_or_prose --out ~/shardrun/data/code-or-prose [--length 128] [--tokenizer MODEL_DIR]

Each function with a docstring gives two rows: its docstring, and its body without the docstring. Rows are
`input_ids` (the text's first --length tokens: bytes, as the demo's model exported as GPT-2 reads them, or a
model's own tokenizer with --tokenizer), `attention_mask` (0 over the padding, id 0 where bytes are 0 in no
source text) and `label`. The same Python gives the same table: files are read in sorted order and the rows
shuffled with a fixed seed.
"""

from __future__ import annotations

import argparse
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from examples.docstrings import documented_functions

CODE, PROSE = 0, 1
ROW_GROUP_ROWS = 1024
PAD = 0


def pieces(stdlib: Path, limit: int):
    """(text, label) pairs: each documented function's docstring, and its source without it."""
    found = 0
    for _, lines, node, doc in documented_functions(stdlib):
        if len(node.body) < 2:
            continue
        body = "\n".join(lines[node.body[1].lineno - 1:node.end_lineno]).strip()
        if len(doc) < 40 or len(body) < 40:
            continue
        yield doc, PROSE
        yield body, CODE
        found += 1
        if found >= limit:
            return


def encoder(tokenizer: str | None):
    """Text to token ids: bytes, or the model's tokenizer (transformers' AutoTokenizer over its folder)."""
    if tokenizer is None:
        return lambda text: list(text.encode("utf-8"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    return lambda text: tok(text, add_special_tokens=True)["input_ids"]


def make(out: Path, *, length: int = 128, tokenizer: str | None = None, limit: int = 4000, seed: int = 0) -> int:
    """Writes out/part-0.parquet; returns its rows."""
    encode = encoder(tokenizer)
    rows = [(encode(text)[:length], label) for text, label in pieces(Path(sysconfig.get_paths()["stdlib"]), limit)]
    ids = np.full((len(rows), length), PAD, dtype=np.int32)
    mask = np.zeros((len(rows), length), dtype=np.int8)
    for i, (tokens, _) in enumerate(rows):
        ids[i, :len(tokens)] = tokens
        mask[i, :len(tokens)] = 1
    labels = np.array([label for _, label in rows], dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(rows))

    def column(a: np.ndarray) -> pa.Array:
        return pa.FixedSizeListArray.from_arrays(pa.array(a[order].ravel()), length)

    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"input_ids": column(ids), "attention_mask": column(mask), "label": labels[order]}),
                   out / "part-0.parquet", row_group_size=ROW_GROUP_ROWS)
    return len(rows)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="folder for part-0.parquet")
    p.add_argument("--length", type=int, default=128, help="tokens per row (default 128)")
    p.add_argument("--tokenizer", help="a model folder whose tokenizer to use (default: bytes)")
    p.add_argument("--functions", type=int, default=4000, help="documented functions to take (default 4000)")
    args = p.parse_args()
    n = make(args.out.expanduser(), length=args.length, tokenizer=args.tokenizer, limit=args.functions)
    print(f"wrote {n:,} rows ({n // 2:,} docstrings, {n // 2:,} function bodies) to {args.out / 'part-0.parquet'}")
