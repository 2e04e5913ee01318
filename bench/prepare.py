"""Tokenizing fine-tuning data: tokens per second from a JSONL corpus to token Parquet, shardrun vs HF datasets.

Both ways read the same JSONL corpus of text documents ({"text": ...}: this Python's standard library cut at line
ends into documents of a few KB) with the same Hugging Face tokenizer (a byte-level BPE the bench trains on the
corpus and saves with save_pretrained) and write the same rows:
  shardrun   `shardrun data prepare CORPUS --format text --no-pack --workers 2`, as its API
             (finetune.prepare_documents): spawned workers tokenize, then write Parquet shards
  datasets   load_dataset("json"), map(batched=True, num_proc=2) to the same rows, to_parquet (row groups of 512
             rows as shardrun writes; snappy, which to_parquet sets itself, where shardrun writes zstd): the anchor
Each row is one document (the tokenizer's ids, then its EOS) padded to seq_len + 1 with the pad id, with a
loss_mask of 1 on every token but the first; a document longer than a row is cut into pieces of seq_len + 1 that
overlap by one. That is shardrun's --no-pack: greedy packing carries a row across the map's batches, so the
anchor would need a sequential pass of its own to pack the same rows. The bench checks that both wrote the same
tokens and loss_mask values, row for row.

Every repetition of each way runs in a fresh process (imports before the clock; the tokenizer's load inside it),
the ways taking turns; its peak memory is the growth of what it and its workers hold.

    python bench/prepare.py                 # 3 repetitions of each way, medians, printed
    python bench/prepare.py --record        # the same, appended to docs/benchmarks.md
    python bench/prepare.py --quick         # a tiny corpus, one repetition: checks that it all runs
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from common import SAY, Parser, in_turns, measured_child, positive, report, spread, table

from shardrun.datasets.prepare import stdlib_sources

SECTION = "## Tokenizing fine-tuning data"
WAYS = ("shardrun", "datasets")
WORKERS = 2
EOS, PAD = "<|endoftext|>", "<|pad|>"
ROW_GROUP_ROWS = 512  # shardrun's default, given to to_parquet too
TRAIN_BYTES = 4_000_000  # of the corpus the tokenizer is trained on
VERSIONS = ("transformers", "tokenizers", "datasets", "pyarrow", "numpy")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return run_child(args)
    with tempfile.TemporaryDirectory(prefix="shardrun-bench-prepare-") as work:
        work = Path(work)
        corpus = write_corpus(work / "corpus.jsonl", int(args.mb * 1e6), args.doc_bytes)
        split = shardrun_split(corpus)
        started = time.perf_counter()
        tokenizer = train_tokenizer(work / "tokenizer", corpus["path"], args.vocab)
        print(f"corpus: {describe_corpus(corpus)}; tokenizer: byte-level BPE of {args.vocab:,} ids, trained in "
              f"{time.perf_counter() - started:.1f} s", flush=True)
        results, outputs = {w: [] for w in WAYS}, set()
        for rep, order in in_turns(list(WAYS), args.reps):
            for way in order:
                res = run_rep(way, work, corpus["path"], tokenizer, args.seq_len)
                results[way].append(res)
                outputs.add((res["rows"], res["tokens"], res["digest"]))
                print(f"  rep {rep + 1}/{args.reps} {way:9s} {res['tokens'] / res['seconds'] / 1e6:6.2f} M tokens/s, "
                      f"{res['seconds']:.1f} s, {res['rows']:,} rows, peak +{res['peak_mb']:.0f} MB", flush=True)
    if len(outputs) != 1:
        sys.exit(f"bench: the ways wrote different rows: {sorted(outputs)}")
    (rows, tokens, digest), = outputs
    summary = summarize(results)
    same = (f"same rows: both ways wrote {rows:,} rows of {args.seq_len + 1} holding {tokens:,} document tokens, "
            f"identical tokens and loss_mask in every repetition (sha256 {digest[:16]})")
    details = [f"Corpus: {describe_corpus(corpus)}",
               f"Tokenizer: byte-level BPE of {args.vocab:,} ids (EOS `{EOS}`, pad `{PAD}`, no BOS) trained on its "
               f"first {min(TRAIN_BYTES, corpus['bytes']) / 1e6:.1f} MB; seq_len {args.seq_len}, one document per row "
               f"(shardrun --no-pack), row groups of {ROW_GROUP_ROWS} (shardrun zstd, to_parquet snappy); {WORKERS} "
               f"workers each way ({split}); medians of {args.reps} repetitions"]
    report(SECTION, args, [format_table(summary)], [same, *findings(summary)], details=details, versions_of=VERSIONS)
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(__doc__, reps=3, reps_help="repetitions of each way", measures="speed",
               quick={"reps": 1, "mb": 0.5, "vocab": 1000},
               quick_help="a 0.5 MB corpus (shardrun then tokenizes in one process), one repetition")
    p.add_argument("--mb", type=float, default=32, help="MB of documents in the corpus (default 32)")
    p.add_argument("--doc-bytes", type=positive, default=3000,
                   help="a document ends at the first line end after this many bytes (default 3000)")
    p.add_argument("--seq-len", type=positive, default=1024, help="tokens per training sequence (default 1024)")
    p.add_argument("--vocab", type=positive, default=16384, help="the tokenizer's vocabulary (default 16384)")
    p.add_argument("--child", choices=WAYS, help=argparse.SUPPRESS)
    p.add_argument("--corpus", help=argparse.SUPPRESS)
    p.add_argument("--tokenizer", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse(argv)
    if args.mb <= 0:
        p.error("--mb must be positive")
    return args


# -- the corpus and the tokenizer ------------------------------------------------------------------


def write_corpus(path: Path, max_bytes: int, doc_bytes: int) -> dict:
    """JSONL of {"text": ...} documents: the standard library's files in order, each cut at the first line end
    after doc_bytes (its last document shorter), until max_bytes of text."""
    docs = total = 0
    with open(path, "w") as out:
        for doc in documents(doc_bytes):
            out.write(json.dumps({"text": doc}) + "\n")
            docs += 1
            total += len(doc.encode())
            if total >= max_bytes:
                break
    return {"path": path, "documents": docs, "bytes": total, "file_bytes": path.stat().st_size}


def documents(doc_bytes: int):
    """The standard library's source files in order, each cut at the first line end after doc_bytes."""
    for source in stdlib_sources():
        doc, size = [], 0
        for line in source.read_bytes().decode("utf-8", errors="replace").splitlines(keepends=True):
            doc.append(line)
            size += len(line)
            if size >= doc_bytes:
                yield "".join(doc)
                doc, size = [], 0
        if "".join(doc).strip():
            yield "".join(doc)


def describe_corpus(corpus: dict) -> str:
    return (f"{corpus['documents']:,} documents, {corpus['bytes'] / 1e6:.1f} MB of text "
            f"({corpus['file_bytes'] / 1e6:.1f} MB of JSONL), from this Python's standard library")


def train_tokenizer(folder: Path, corpus: Path, vocab: int) -> Path:
    """A byte-level BPE trained on the corpus's first TRAIN_BYTES, saved as a transformers tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def texts():
        seen = 0
        with open(corpus) as f:
            for line in f:
                text = json.loads(line)["text"]
                yield text
                seen += len(text)
                if seen >= TRAIN_BYTES:
                    return

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS, PAD], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts(), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD).save_pretrained(folder)
    return folder


def shardrun_split(corpus: dict) -> str:
    """How shardrun shares the corpus out (finetune.worker_count and part_bytes, as prepare_documents decides for
    text records and a fast tokenizer): processes, and the parts a JSONL file is read in."""
    from shardrun.datasets import finetune

    n = finetune.worker_count(corpus["file_bytes"], WORKERS, batched=True)
    if n == 1:
        return (f"shardrun tokenized in 1 process of the {WORKERS} allowed (a fast tokenizer's encode_batch runs on "
                "every core)")
    parts = finetune.input_parts([corpus["path"]], part_bytes=finetune.part_bytes(corpus["file_bytes"], n))
    return f"shardrun tokenized in {n} processes, the JSONL in {len(parts)} parts"


# -- one repetition, in a child process ------------------------------------------------------------


def run_rep(way: str, work: Path, corpus: Path, tokenizer: Path, seq_len: int) -> dict:
    """Start a child for this way, let it write its rows, sample its memory meanwhile, then read the rows back."""
    # data.py imports torch, which the children need not pay for at their start

    out = work / f"out-{way}"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", way, "--corpus", str(corpus),
           "--tokenizer", str(tokenizer), "--out", str(out), "--seq-len", str(seq_len)]
    env = dict(os.environ, HF_HOME=str(work / "hf-home"), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    result, start_s, peak_mb = measured_child(cmd, env, way)
    res = {**result, "start_s": start_s, "peak_mb": peak_mb, **read_rows(out, seq_len + 1)}
    for done in (out, work / "hf-cache"):
        shutil.rmtree(done, ignore_errors=True)
    return res


def read_rows(out: Path, row_len: int) -> dict:
    """The rows a way wrote, in order: how many, the document tokens in them, and a digest of both columns."""
    files = sorted(out.glob("*.parquet"))
    tables = [pq.read_table(f, columns=["tokens", "loss_mask"]) for f in files]
    tokens = np.concatenate([t["tokens"].combine_chunks().flatten().to_numpy() for t in tables]).astype(np.int32)
    mask = np.concatenate([t["loss_mask"].combine_chunks().flatten().to_numpy() for t in tables]).astype(np.int8)
    rows = len(tokens) // row_len
    if len(tokens) != rows * row_len or not rows:
        sys.exit(f"bench: {out} holds {len(tokens)} tokens, not rows of {row_len}")
    # A row is one document (or piece), masked but for its first token: it ends after its last 1
    last = row_len - np.argmax(mask.reshape(rows, row_len)[:, ::-1], axis=1)
    digest = hashlib.sha256(tokens.tobytes() + mask.tobytes()).hexdigest()
    return {"files": len(files), "mb": sum(f.stat().st_size for f in files) / 1e6, "rows": rows,
            "tokens": int(last.sum()), "digest": digest}


def run_child(args: argparse.Namespace) -> int:
    """In the child: import the way's libraries, wait for the parent's go, write the rows, report as JSON."""
    write = load(args.child)
    print(f"{SAY}ready", flush=True)
    sys.stdin.readline()
    t0 = time.perf_counter()
    write(Path(args.corpus), Path(args.out), args.seq_len, Path(args.tokenizer))
    print(SAY + json.dumps({"seconds": time.perf_counter() - t0}), flush=True)
    return 0


def load(way: str):
    """The way's writer, its libraries imported (transformers' tokenizer classes too: it imports them lazily)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401

    if way == "shardrun":
        import shardrun.datasets.finetune  # noqa: F401

        return write_shardrun
    import datasets  # optional: pip install 'shardrun[bench]'

    datasets.disable_progress_bars()
    return write_datasets


def write_shardrun(corpus: Path, out: Path, seq_len: int, tokenizer: Path) -> None:
    """`shardrun data prepare CORPUS --out OUT --seq-len N --tokenizer T --no-pack --workers 2`."""
    from shardrun.datasets import finetune

    finetune.prepare_documents([corpus], out, seq_len, tokenizer, fmt=finetune.RecordFormat(kind="text"),
                               pack_rows=False, workers=WORKERS)


def write_datasets(corpus: Path, out: Path, seq_len: int, tokenizer: Path) -> None:
    """load_dataset("json"), a batched map on 2 processes to the rows, to_parquet."""
    import datasets
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer))
    row_len = seq_len + 1
    ds = datasets.load_dataset("json", data_files=str(corpus), split="train",
                               cache_dir=str(out.parent / "hf-cache"))
    features = datasets.Features({"tokens": datasets.List(datasets.Value("int32"), length=row_len),
                                  "loss_mask": datasets.List(datasets.Value("int8"), length=row_len)})
    rows = ds.map(document_rows, batched=True, num_proc=WORKERS, remove_columns=ds.column_names,
                  features=features, fn_kwargs={"tok": tok, "row_len": row_len})
    out.mkdir()
    rows.to_parquet(str(out / "part-00000.parquet"), batch_size=ROW_GROUP_ROWS)


def document_rows(batch: dict, tok, row_len: int) -> dict:
    """The anchor's map: what shardrun's --format text --no-pack makes of each document, in datasets' terms."""
    eos = tok.eos_token_id
    head = [tok.bos_token_id] if tok.bos_token_id not in (None, eos) else []
    tail = [eos] if eos is not None else []
    tokens, masks = [], []
    for ids in tok(batch["text"], add_special_tokens=False)["input_ids"]:
        ids = head + ids + tail
        offset = 0
        while True:  # pieces of row_len overlapping by one, as shardrun cuts a document longer than a row
            piece = ids[offset:offset + row_len]
            pad = row_len - len(piece)
            tokens.append(piece + [tok.pad_token_id] * pad)
            masks.append([0] + [1] * (len(piece) - 1) + [0] * pad)
            if offset + len(piece) >= len(ids):
                break
            offset += len(piece) - 1
    return {"tokens": tokens, "loss_mask": masks}


# -- results -------------------------------------------------------------------------------------


def summarize(results: dict[str, list[dict]]) -> list[dict]:
    """Per way: its speeds and the medians of the rest; shardrun's median over the anchor's."""
    rows = []
    for way, reps in results.items():
        speeds = [r["tokens"] / r["seconds"] for r in reps]
        rows.append({"way": way, "speeds": speeds, "median": statistics.median(speeds),
                     "files": reps[0]["files"], "mb": reps[0]["mb"],
                     **{k: statistics.median(r[k] for r in reps) for k in ("seconds", "start_s", "peak_mb")}})
    anchor = next(r["median"] for r in rows if r["way"] == "datasets")
    for r in rows:
        r["vs_anchor"] = r["median"] / anchor
    return rows


def format_table(rows: list[dict]) -> str:
    header = ["way", "M tokens/s (median)", "min - max", "vs datasets", "seconds", "files written", "MB on disk",
              "peak memory (MB)", "process start (s)"]
    return table(header, [[r["way"], *spread(r["speeds"], 2, 1e6), f"{r['vs_anchor']:.2f}", f"{r['seconds']:.1f}",
                           str(r["files"]), f"{r['mb']:.1f}", f"{r['peak_mb']:.0f}", f"{r['start_s']:.1f}"]
                          for r in rows])


def findings(rows: list[dict]) -> list[str]:
    """The issue's goal, checked: shardrun at least as fast as the anchor."""
    ratio = next(r["vs_anchor"] for r in rows if r["way"] == "shardrun")
    return [f"shardrun / datasets = {ratio:.2f}: {'meets' if ratio >= 1 else 'misses'} the goal of 1.0"]


if __name__ == "__main__":
    sys.exit(main())
