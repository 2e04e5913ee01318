"""`shardrun data prepare`: text, prompt/completion and chat records to loss-masked, packed token shards, with a
tiny tokenizer trained here (no downloads)."""

import gzip
import hashlib
import inspect
import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shardrun import cli
from shardrun.datasets import finetune
from shardrun.datasets.finetune import RecordFormat, chat_tokens, encode_record, pack, prepare_documents
from shardrun.driver.model_check import tokenizer_name
from shardrun.errors import UserError

pytest.importorskip("transformers")

CORPUS = ["hello world, the user asks and the assistant answers.", "system prompt: be brief", "Question? Answer!"]
TURN = "<|im_start|>{{ m['role'] }}\n"
PLAIN_TEMPLATE = "{% for m in messages %}" + TURN + "{{ m['content'] }}<|im_end|>\n{% endfor %}" \
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
GENERATION_TEMPLATE = "{% for m in messages %}" + TURN + "{% if m['role'] == 'assistant' %}{% generation %}" \
                      "{{ m['content'] }}<|im_end|>{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>" \
                      "{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
CHAT = [{"role": "system", "content": "be brief"},
        {"role": "user", "content": "hello world?"},
        {"role": "assistant", "content": "the answer"},
        {"role": "user", "content": "and then?"},
        {"role": "assistant", "content": "hello again"}]


def _save_tokenizer(folder, template):
    """A byte-level BPE trained on CORPUS, with <eos>, <pad> and a chat template, saved as a model folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<eos>", "<|im_start|>", "<|im_end|>"],
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                            chat_template=template).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizers_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    return {"plain": _save_tokenizer(root / "plain", PLAIN_TEMPLATE),
            "generation": _save_tokenizer(root / "generation", GENERATION_TEMPLATE)}


@pytest.fixture(scope="module")
def tok(tokenizers_dir):
    return finetune.DocumentTokenizer.load(tokenizers_dir["plain"])


def _write_jsonl(path, records):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def _columns(out):
    """Every column of the shards, rows in file order, as (rows, seq_len + 1) arrays."""
    table = pa.concat_tables(pq.read_table(f) for f in sorted(out.glob("*.parquet")))
    return {name: table.column(name).combine_chunks().flatten().to_numpy().reshape(table.num_rows, -1)
            for name in table.column_names}


def _documents(cols, pad_id):
    """The (tokens, mask) of each document in a packed output, split where position_ids restart."""
    docs = []
    for tokens, mask, positions in zip(cols["tokens"], cols["loss_mask"], cols["position_ids"], strict=True):
        real = (positions > 0) | (tokens != pad_id)  # padding: the pad id at position 0
        starts = np.flatnonzero((positions == 0) & real).tolist()
        ends = starts[1:] + [int(np.flatnonzero(real).max()) + 1]
        docs += [(tokens[a:b].tolist(), mask[a:b].tolist()) for a, b in zip(starts, ends, strict=True)]
    return docs


def test_text_documents_end_with_eos_and_count_every_token(tok):
    ids, mask = encode_record(tok, RecordFormat(), {"text": "hello world"})
    assert ids == tok.hf.encode("hello world", add_special_tokens=False) + [tok.eos_id]
    assert mask == [1] * len(ids)
    assert encode_record(tok, RecordFormat(), "hello world") == (ids, mask)  # a text file's record is its text


def test_prompt_tokens_get_no_loss(tok):
    fmt = RecordFormat(kind="prompt-completion", prompt_field="q", completion_field="a")
    ids, mask = encode_record(tok, fmt, {"q": "Question?", "a": " Answer!"})
    prompt, completion = tok.hf.encode("Question?"), tok.hf.encode(" Answer!")
    assert ids == prompt + completion + [tok.eos_id]
    assert mask == [0] * len(prompt) + [1] * (len(completion) + 1)


@pytest.mark.parametrize("template", ["plain", "generation"])
def test_chat_renders_as_apply_chat_template_with_loss_on_assistant_turns_only(tokenizers_dir, template):
    hf = finetune.DocumentTokenizer.load(tokenizers_dir[template]).hf
    ids, mask = chat_tokens(hf, CHAT)
    assert ids == hf.apply_chat_template(CHAT, tokenize=True)["input_ids"]
    learned = hf.decode([i for i, m in zip(ids, mask, strict=True) if m])
    # The assistant's text and its end of turn; no system or user text, no role header.
    assert learned.replace("\n", "") == "the answer<|im_end|>hello again<|im_end|>"


def test_bad_records_say_why(tok):
    chat = RecordFormat(kind="chat")
    pairs = RecordFormat(kind="prompt-completion")
    cases = [(pairs, {"prompt": "q"}, "no field 'completion'"),
             (pairs, {"prompt": "q", "completion": "  "}, "empty 'completion'"),
             (pairs, {"prompt": 3, "completion": "a"}, "is a int, not a string"),
             (chat, {"messages": [{"role": "user", "content": "hi"}]}, "no assistant turn"),
             (chat, {"messages": "hi"}, "no list of messages"),
             (RecordFormat(), {"text": ""}, "empty text")]
    for fmt, record, why in cases:
        with pytest.raises(finetune.BadRecord, match=why):
            encode_record(tok, fmt, record)


def test_pack_fills_rows_in_order_and_cuts_only_longer_documents():
    p = pack(np.array([3, 2, 4, 13, 2]), row_len=6)
    segments = list(zip(p.start.tolist(), p.length.tolist(), p.row.tolist(), p.column.tolist(), strict=True))
    # 3 + 2 share row 0; 4 opens row 1; 13 is cut into 6, 6, 3 overlapping by one (starts 9, 14, 19);
    # its last piece shares row 4 with the next document.
    assert segments == [(0, 3, 0, 0), (3, 2, 0, 3), (5, 4, 1, 0), (9, 6, 2, 0), (14, 6, 3, 0), (19, 3, 4, 0),
                        (22, 2, 4, 3)]
    assert (p.rows, p.cut) == (5, 1)
    unpacked = pack(np.array([3, 2, 4]), row_len=6, packed=False)
    assert unpacked.row.tolist() == [0, 1, 2] and unpacked.column.tolist() == [0, 0, 0]


def test_packed_rows_hold_every_document_once_in_order(tmp_path, tok, tokenizers_dir):
    texts = [f"hello world {'the user asks ' * (i % 4)}{i}" for i in range(40)]
    src = _write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts])
    done = prepare_documents([src], tmp_path / "out", 24, tokenizers_dir["plain"], rows_per_file=5, row_group_rows=2)
    cols = _columns(tmp_path / "out")
    assert len(done.files) > 1 and cols["tokens"].shape == (done.rows, 25)
    docs = _documents(cols, tok.pad_id)
    expected = [encode_record(tok, RecordFormat(), t)[0] for t in texts]
    assert [d[0] for d in docs] == expected
    assert all(m == [0] + [1] * (len(m) - 1) for _, m in docs)  # a document's first token has no token before it
    assert done.documents == 40 and done.cut == 0
    assert done.tokens == sum(map(len, expected)) == cols["tokens"].size - (cols["tokens"] == tok.pad_id).sum()
    assert done.loss_tokens == cols["loss_mask"].sum() == done.tokens - 40
    assert 0.5 < done.efficiency <= 1


def test_unpacked_rows_hold_one_document_each_padded(tmp_path, tok, tokenizers_dir):
    records = [{"prompt": "Question?", "completion": " Answer!"}, {"prompt": "hello", "completion": " world"}]
    src = _write_jsonl(tmp_path / "pairs.jsonl", records)
    done = prepare_documents([src], tmp_path / "out", 16, tokenizers_dir["plain"],
                             fmt=RecordFormat(kind="prompt-completion"), pack_rows=False)
    cols = _columns(tmp_path / "out")
    assert set(cols) == {"tokens", "loss_mask"} and done.rows == 2
    for row, mask, record in zip(cols["tokens"], cols["loss_mask"], records, strict=True):
        ids, want = encode_record(tok, RecordFormat(kind="prompt-completion"), record)
        assert row.tolist() == ids + [tok.pad_id] * (17 - len(ids))
        assert mask.tolist() == [0] + want[1:] + [0] * (17 - len(ids))
    meta = pq.read_schema(done.files[0]).metadata
    assert meta[b"shardrun.packed"] == b"false" and meta[b"shardrun.format"] == b"prompt-completion"


def test_a_document_longer_than_a_row_is_cut_and_counted(tmp_path, tok, tokenizers_dir):
    long = "hello world the user asks and the assistant answers " * 3
    src = _write_jsonl(tmp_path / "long.jsonl", [{"text": long}, {"text": "hello"}])
    done = prepare_documents([src], tmp_path / "out", 8, tokenizers_dir["plain"])
    ids = encode_record(tok, RecordFormat(), long)[0]
    rows = _columns(tmp_path / "out")["tokens"]
    assert done.cut == 1 and len(ids) > 9
    assert rows[0].tolist() == ids[:9] and rows[1].tolist() == ids[8:17]  # pieces overlap by one token


def test_output_is_byte_identical_for_any_number_of_workers(tmp_path, monkeypatch, tokenizers_dir):
    monkeypatch.setattr(finetune, "MIN_BYTES_PER_WORKER", 1)
    monkeypatch.setattr(finetune, "MAX_PART_BYTES", 300)  # the big file is read in byte ranges
    src = tmp_path / "src"
    src.mkdir()
    _write_jsonl(src / "a.jsonl", [{"messages": CHAT}] * 3)
    _write_jsonl(src / "b.jsonl", [{"messages": CHAT[:3 + i % 3]} for i in range(30)])
    outs = []
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        prepare_documents([src], out, 32, tokenizers_dir["generation"], fmt=RecordFormat(kind="chat"),
                          rows_per_file=4, row_group_rows=2, workers=workers)
        outs.append({f.name: f.read_bytes() for f in sorted(out.iterdir())})
    assert len(outs[0]) > 2 and outs[0] == outs[1]


def test_jsonl_byte_ranges_keep_their_line_numbers(tmp_path):
    src = _write_jsonl(tmp_path / "d.jsonl", [{"text": f"document {i}"} for i in range(50)])
    parts = finetune.input_parts([src], part_bytes=100)
    assert len(parts) > 5
    records = [r for p in parts for r in finetune.read_records(p, RecordFormat())]
    assert [where for where, _ in records] == [f"{src}:{n}" for n in range(1, 51)]
    assert [r["text"] for _, r in records] == [f"document {i}" for i in range(50)]


def test_text_files_jsonl_gz_and_parquet_inputs(tmp_path, tok, tokenizers_dir):
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("hello world")
    with gzip.open(src / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "the user asks"}) + "\n")
    pq.write_table(pa.table({"body": ["Question?", "Answer!"]}), src / "c.parquet")
    done = prepare_documents([src], tmp_path / "out", 64, tokenizers_dir["plain"], fmt=RecordFormat(text_field="body"))
    docs = _documents(_columns(tmp_path / "out"), tok.pad_id)
    assert [d[0] for d in docs] == [encode_record(tok, RecordFormat(), t)[0]
                                    for t in ("hello world", "the user asks", "Question?", "Answer!")]
    assert done.documents == 4


def test_chat_from_parquet_lists_of_structs(tmp_path, tokenizers_dir):
    pq.write_table(pa.table({"messages": [CHAT, CHAT[:3]]}), tmp_path / "chats.parquet")
    done = prepare_documents([tmp_path / "chats.parquet"], tmp_path / "out", 128, tokenizers_dir["plain"],
                             fmt=RecordFormat(kind="chat"))
    assert done.documents == 2 and 0 < done.loss_tokens < done.tokens


BAD = [{"prompt": "q", "completion": "a"},
       "{not json",
       {"prompt": "q"},
       {"prompt": "q", "completion": ""},
       {"prompt": "hello", "completion": " world"}]


def _run(*argv):
    return cli.main(["data", "prepare", *map(str, argv)])


def test_a_bad_record_fails_the_prepare_naming_its_file_and_line(tmp_path, capsys, tokenizers_dir):
    src = _write_jsonl(tmp_path / "pairs.jsonl", BAD)
    assert _run(src, "--out", tmp_path / "out", "--seq-len", 16, "--tokenizer", tokenizers_dir["plain"],
                "--format", "prompt-completion") == 2
    err = capsys.readouterr().err
    assert f"{src}:2: bad record: not valid JSON" in err and "--on-bad-record skip" in err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


def test_skipped_bad_records_are_counted_and_named(tmp_path, capsys, tokenizers_dir):
    src = _write_jsonl(tmp_path / "pairs.jsonl", BAD)
    assert _run(src, "--out", tmp_path / "out", "--seq-len", 16, "--tokenizer", tokenizers_dir["plain"],
                "--format", "prompt-completion", "--on-bad-record", "skip", "--no-pack") == 0
    out, err = capsys.readouterr()
    assert f"skipped bad record {src}:3: no field 'completion'" in err
    assert f"skipped bad record {src}:4: empty 'completion'" in err
    assert "2 documents, 2 rows" in out and "3 bad records" in out and "0 documents cut" in out
    assert "packing efficiency" in out and "in the loss" in out


def test_a_chat_without_an_assistant_turn_is_a_bad_record(tmp_path, capsys, tokenizers_dir):
    src = _write_jsonl(tmp_path / "chats.jsonl", [{"messages": CHAT}, {"messages": CHAT[:2]}])
    assert _run(src, "--out", tmp_path / "out", "--seq-len", 64, "--tokenizer", tokenizers_dir["plain"],
                "--format", "chat") == 2
    assert f"{src}:2: bad record: no assistant turn" in capsys.readouterr().err


def test_metadata_names_the_tokenizer_as_the_model_check_does(tmp_path, tok, tokenizers_dir):
    src = _write_jsonl(tmp_path / "docs.jsonl", [{"text": "hello world"}])
    done = prepare_documents([src], tmp_path / "out", 16, tokenizers_dir["plain"])
    meta = pq.read_schema(done.files[0]).metadata
    digest = hashlib.sha256((tokenizers_dir["plain"] / "tokenizer.json").read_bytes()).hexdigest()
    assert meta[b"shardrun.tokenizer"].decode() == tokenizer_name(str(tokenizers_dir["plain"]))
    assert meta[b"shardrun.tokenizer"].decode().endswith(f"sha256:{digest}")
    assert int(meta[b"shardrun.vocab_size"]) == tok.vocab_size == len(tok.hf)
    assert meta[b"shardrun.seq_len"] == b"16" and meta[b"shardrun.format"] == b"text"
    assert meta[b"shardrun.packed"] == b"true"


def test_a_bare_tokenizer_json_works_for_text_but_not_chat(tmp_path, tokenizers_dir):
    src = _write_jsonl(tmp_path / "docs.jsonl", [{"text": "hello world"}])
    tokenizer_json = tokenizers_dir["plain"] / "tokenizer.json"
    done = prepare_documents([src], tmp_path / "out", 16, tokenizer_json)
    assert done.documents == 1
    with pytest.raises(UserError, match="no chat template"):
        prepare_documents([src], tmp_path / "chat", 16, tokenizer_json, fmt=RecordFormat(kind="chat"))


def test_records_formats_need_records_not_text_files(tmp_path, tokenizers_dir):
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(UserError, match="reads records from JSONL"):
        prepare_documents([tmp_path / "a.txt"], tmp_path / "out", 16, tokenizers_dir["plain"],
                          fmt=RecordFormat(kind="prompt-completion"))


def test_cli_defaults_are_the_modules():
    args = cli.build_parser().parse_args(["data", "prepare", "x", "--out", "o", "--seq-len", "8", "--tokenizer", "t"])
    fmt = RecordFormat()
    assert (args.format, args.text_field, args.prompt_field, args.completion_field, args.messages_field) == \
           (fmt.kind, fmt.text_field, fmt.prompt_field, fmt.completion_field, fmt.messages_field)
    defaults = inspect.signature(prepare_documents).parameters
    for name in ("rows_per_file", "row_group_rows", "compression", "workers", "on_bad_record", "held_out",
                 "held_out_dir"):
        assert getattr(args, name) == defaults[name].default, name
    assert args.pack == defaults["pack_rows"].default


def test_a_parquet_file_without_the_column_is_named(tmp_path, tokenizers_dir):
    pq.write_table(pa.table({"body": ["hello"]}), tmp_path / "a.parquet")
    with pytest.raises(UserError, match=r"a.parquet: no column 'text' \(it has body\)"):
        prepare_documents([tmp_path / "a.parquet"], tmp_path / "out", 16, tokenizers_dir["plain"], workers=1)
    assert not (tmp_path / "out").exists()


def test_the_stream_leaves_masked_tokens_out_of_the_targets_and_hands_on_the_positions(tmp_path, tokenizers_dir):
    import torch

    from shardrun.config import DataSpec
    from shardrun.datasets import Stream, build_index

    records = [{"prompt": f"Question {i}? " * (1 + i % 3), "completion": f"Answer {i}!"} for i in range(40)]
    src = _write_jsonl(tmp_path / "pc.jsonl", records)
    prepare_documents([src], tmp_path / "out", 24, tokenizers_dir["plain"], fmt=RecordFormat(kind="prompt-completion"),
                      row_group_rows=4)
    cols = _columns(tmp_path / "out")
    spec = DataSpec(paths=[str(tmp_path / "out")], shuffle_window=1)
    index = build_index(spec)
    assert set(index.schema) == {"tokens", "loss_mask", "position_ids"}
    rows = len(cols["tokens"])
    stream = Stream(spec, index, rank=0, world_size=1, micro_batch_size=rows, grad_accum_steps=1)
    try:
        batch = stream.next_batch()
    finally:
        stream.close()
    # shuffle_window 1 keeps each row group's rows together; match the batch's rows to the file's by content
    tokens, mask, positions = (torch.tensor(cols[c]).long() for c in ("tokens", "loss_mask", "position_ids"))
    order = [next(i for i in range(rows) if torch.equal(batch["inputs"][r], tokens[i, :-1])) for r in range(rows)]
    tokens, mask, positions = tokens[order], mask[order], positions[order]
    assert torch.equal(batch["targets"], tokens[:, 1:].masked_fill(mask[:, 1:] == 0, -100))
    assert torch.equal(batch["position_ids"], positions[:, :-1])
    assert (batch["targets"] == -100).any() and (batch["targets"] != -100).any()


# A few hundred documents of different lengths, ten of them three times over.
HELD_OUT_TEXTS = [f"hello world {i} {'the user asks ' * (i % 5)}answer {i * 7}" for i in range(270)] + \
                 [f"Question {i}? Answer!" for i in range(10)] * 3


def _split_documents(out, pad_id):
    return Counter((tuple(ids), tuple(mask)) for ids, mask in _documents(_columns(out), pad_id))


def test_held_out_and_training_documents_together_are_every_document_once(tmp_path, tok, tokenizers_dir):
    src = _write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in HELD_OUT_TEXTS])
    prepare_documents([src], tmp_path / "all", 64, tokenizers_dir["plain"], rows_per_file=16)
    done = prepare_documents([src], tmp_path / "train", 64, tokenizers_dir["plain"], rows_per_file=16,
                             held_out=0.2)
    train, held = (_split_documents(tmp_path / d, tok.pad_id) for d in ("train", "train-eval"))
    assert train + held == _split_documents(tmp_path / "all", tok.pad_id)
    assert done.cut == done.held_out.cut == 0  # so the documents recovered are the documents
    assert done.held_out_dir == tmp_path / "train-eval"
    assert done.documents + done.held_out.documents == len(HELD_OUT_TEXTS)
    assert done.held_out.documents == held.total() and abs(done.held_out.documents - 0.2 * len(HELD_OUT_TEXTS)) < 25
    assert done.held_out.files == sorted((tmp_path / "train-eval").glob("*.parquet"))
    assert done.held_out.rows == len(_columns(tmp_path / "train-eval")["tokens"])
    # duplicates are never split: a document in the held-out folder has no copy in the training folder
    assert not set(train) & set(held)
    assert sorted(n for n in (train + held).values() if n > 1) == [3] * 10


def test_both_folders_have_the_same_metadata(tmp_path, tokenizers_dir):
    src = _write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": t, "completion": " Answer!"} for t in HELD_OUT_TEXTS])
    done = prepare_documents([src], tmp_path / "out", 32, tokenizers_dir["plain"], pack_rows=False,
                             fmt=RecordFormat(kind="prompt-completion"), held_out=0.3,
                             held_out_dir=tmp_path / "eval" / "pc")
    train, held = (pq.read_schema(f).metadata for f in (done.files[0], done.held_out.files[0]))
    assert train == held and held[b"shardrun.packed"] == b"false" and held[b"shardrun.seq_len"] == b"32"
    assert held[b"shardrun.format"] == b"prompt-completion"
    assert set(_columns(tmp_path / "eval" / "pc")) == {"tokens", "loss_mask"}


def test_the_held_out_split_is_byte_identical_for_any_number_of_workers(tmp_path, monkeypatch, tokenizers_dir):
    monkeypatch.setattr(finetune, "MIN_BYTES_PER_BATCHED_WORKER", 1)  # text: batches, in a pool of 2 too
    monkeypatch.setattr(finetune, "MAX_PART_BYTES", 500)  # parts and tasks differ with the workers
    src = _write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in HELD_OUT_TEXTS])
    outs = []
    for workers in (1, 2):
        prepare_documents([src], tmp_path / f"out{workers}", 24, tokenizers_dir["plain"], rows_per_file=8,
                          workers=workers, held_out=0.25)
        outs.append({(split, f.name): f.read_bytes() for split in ("", "-eval")
                     for f in sorted((tmp_path / f"out{workers}{split}").iterdir())})
    assert len(outs[0]) > 4 and any(split for split, _ in outs[0]) and outs[0] == outs[1]


def test_the_summary_line_counts_the_held_out_documents(tmp_path, capsys, tokenizers_dir):
    src = _write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in HELD_OUT_TEXTS])
    assert _run(src, "--out", tmp_path / "train", "--seq-len", 64, "--tokenizer", tokenizers_dir["plain"],
                "--held-out", 0.1, "--workers", 1) == 0
    line = capsys.readouterr().out
    cols = _columns(tmp_path / "train-eval")
    assert line.count("\n") == 1 and "0 documents cut" in line
    assert f"; held out: {len(_documents(cols, 0))} documents, {len(cols['tokens'])} rows, " in line
    assert line.rstrip().endswith(f"tokens in {tmp_path / 'train-eval'}")


@pytest.mark.parametrize("share", ["0", "0.6", "1", "-0.1", "nan"])
def test_a_held_out_share_out_of_range_exits_2_before_any_work(tmp_path, capsys, monkeypatch, share):
    monkeypatch.setattr(finetune.DocumentTokenizer, "load", lambda *a, **k: pytest.fail("loaded the tokenizer"))
    assert _run("docs.jsonl", "--out", tmp_path / "out", "--seq-len", 16, "--tokenizer", "tok",
                "--held-out", share) == 2
    assert "--held-out is the share of the documents to hold out: above 0 and at most 0.5" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_held_out_options_that_cannot_work_exit_2(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit) as e:
        _run("docs.jsonl", "--out", tmp_path / "out", "--seq-len", 16, "--tokenizer", "t", "--held-out", "some")
    assert e.value.code == 2 and "--held-out: invalid float value: 'some'" in capsys.readouterr().err
    monkeypatch.setattr(finetune.DocumentTokenizer, "load", lambda *a, **k: pytest.fail("loaded the tokenizer"))
    args = ("docs.jsonl", "--out", tmp_path / "out", "--seq-len", 16, "--tokenizer", "t")
    assert _run(*args, "--held-out-dir", tmp_path / "eval") == 2
    assert "--held-out-dir goes with --held-out SHARE" in capsys.readouterr().err
    assert _run(*args, "--held-out", 0.1, "--held-out-dir", tmp_path / "out" / "eval") == 2
    assert "neither inside the other" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_an_existing_held_out_folder_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(finetune.DocumentTokenizer, "load", lambda *a, **k: pytest.fail("loaded the tokenizer"))
    (tmp_path / "out-eval").mkdir()
    assert _run("docs.jsonl", "--out", tmp_path / "out", "--seq-len", 16, "--tokenizer", "t", "--held-out", 0.1) == 2
    assert f"{tmp_path / 'out-eval'} already exists; remove it or choose another --held-out-dir" in \
           capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["out-eval"]


def test_a_split_left_empty_writes_neither_folder(tmp_path, capsys, tokenizers_dir):
    src = _write_jsonl(tmp_path / "docs.jsonl", [{"text": "hello world"}])
    assert _run(src, "--out", tmp_path / "out", "--seq-len", 16, "--tokenizer", tokenizers_dir["plain"],
                "--held-out", 0.01) == 2
    assert "--held-out 0.01 held out none of the 1 document" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["docs.jsonl"]


def test_input_of_only_bad_records_skipped_says_there_are_no_documents(tmp_path, capsys, tokenizers_dir):
    src = _write_jsonl(tmp_path / "pairs.jsonl", ["{not json", {"prompt": "q"}])
    assert _run(src, "--out", tmp_path / "out", "--seq-len", 16, "--tokenizer", tokenizers_dir["plain"],
                "--format", "prompt-completion", "--on-bad-record", "skip") == 2
    assert f"no documents in {src} (2 bad records skipped)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
