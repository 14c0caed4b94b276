"""Seq2seq data: JSONL pairs, their packing into encoder/decoder rows, `data.val_paths`, and the
SFT set of documented stdlib functions (`lmjax data sft-from-corpus`).

Expected rows come from a hand-worked example and from a plain per-pair reference built here; the
SFT records are checked against `textwrap.dedent` of each function's lines and against `ast`.
"""

import ast
import hashlib
import json
import random
import re
import textwrap

import numpy as np
import pytest

from lmjax import cli
from lmjax.config import Config, load_config, replace
from lmjax.data.corpus import DataError, builtin_corpus_files, is_validation, load_corpus
from lmjax.data.functions import validation_path
from lmjax.data.seq2seq import PairSplit, Seq2SeqRows, build_pair_data, load_pairs

EOS, PAD = 3, 0
WORDS = "alpha beta gamma delta value index count total result item node tree graph batch token".split()


def make_split(pairs, seq_len, target_len, pack=True, overlong="truncate"):
    def stream(seqs):
        tokens = np.array([t for s in seqs for t in s], np.int32)
        return tokens, np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64)

    return PairSplit(*stream([p[0] for p in pairs]), *stream([p[1] for p in pairs]), seq_len, target_len, pack, overlong)


# ----------------------------------------------------------------------------- packing

HAND_PAIRS = [  # (input + eos, target + eos); rows of 6 encoder and 4 decoder tokens
    ([10, 11, 3], [50, 3]),
    ([20, 3], [60, 3]),  # fits beside pair 0: 5 <= 6 and 4 <= 4
    ([30, 3], [70, 3]),  # 7 > 6 encoder tokens: a new row
    ([40, 41, 42, 43, 44, 45, 46, 3], [80, 3]),  # input of 8 > 6: over-long
    ([90, 3], [91, 92, 93, 94, 3]),  # target of 5 > 4: over-long
    ([95, 3], [96, 3]),
    ([97, 3], [98, 3]),
]


def test_packing_hand_checked():
    split = make_split(HAND_PAIRS, seq_len=6, target_len=4)
    assert split.packing.row_offsets.tolist() == [0, 2, 3, 4, 5, 7]  # rows [0 1] [2] [3] [4] [5 6]
    assert (split.packing.truncated, split.packing.dropped) == (2, 0)
    assert split.num_pairs == 7 and split.num_tokens == 21 + 17
    batch = split.rows(np.array([0, 2, 3]), pad_id=PAD)
    assert batch["encoder_tokens"].tolist() == [[10, 11, 3, 20, 3, 0], [40, 41, 42, 43, 44, 3], [90, 3, 0, 0, 0, 0]]
    assert batch["encoder_segment_ids"].tolist() == [[1, 1, 1, 2, 2, 0], [1] * 6, [1, 1, 0, 0, 0, 0]]
    assert batch["encoder_positions"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5], [0, 1, 0, 0, 0, 0]]
    assert batch["targets"].tolist() == [[50, 3, 60, 3], [80, 3, 0, 0], [91, 92, 93, 3]]
    assert batch["decoder_tokens"].tolist() == [[0, 50, 0, 60], [0, 80, 0, 0], [0, 91, 92, 93]]
    assert batch["decoder_segment_ids"].tolist() == [[1, 1, 2, 2], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["decoder_positions"].tolist() == [[0, 1, 0, 1], [0, 1, 0, 0], [0, 1, 2, 3]]
    assert batch["loss_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert {k: v.dtype for k, v in batch.items()} == {**{k: np.int32 for k in batch}, "loss_mask": np.float32}

    dropped = make_split(HAND_PAIRS, 6, 4, overlong="drop")
    assert (dropped.packing.truncated, dropped.packing.dropped) == (0, 2)
    assert [dropped.packing.example_index[a:b].tolist() for a, b in zip(dropped.packing.row_offsets, dropped.packing.row_offsets[1:])] == [
        [0, 1], [2, 5], [6]
    ]
    single = make_split(HAND_PAIRS, 6, 4, pack=False)
    assert single.num_rows == 7 and single.packing.row_offsets.tolist() == list(range(8))


def reference_rows(pairs, seq_len, target_len, pack, overlong, pad_id):
    """Per-pair lists, packed with a plain loop: the expected batch of every row, in order."""
    kept = []
    for inp, tgt in pairs:
        if len(inp) > seq_len or len(tgt) > target_len:
            if overlong == "drop":
                continue
            inp = inp if len(inp) <= seq_len else inp[: seq_len - 1] + [EOS]
            tgt = tgt if len(tgt) <= target_len else tgt[: target_len - 1] + [EOS]
        kept.append((inp, tgt))
    rows = []
    for inp, tgt in kept:
        if rows and pack and sum(len(i) for i, _ in rows[-1]) + len(inp) <= seq_len and sum(len(t) for _, t in rows[-1]) + len(tgt) <= target_len:
            rows[-1].append((inp, tgt))
        else:
            rows.append([(inp, tgt)])

    def side(row, width, part, fill):
        values = [v for k, pair in enumerate(row) for v in part(k, pair)]
        return values + [fill] * (width - len(values))

    return [{
        "encoder_tokens": side(row, seq_len, lambda k, p: p[0], pad_id),
        "encoder_segment_ids": side(row, seq_len, lambda k, p: [k + 1] * len(p[0]), 0),
        "encoder_positions": side(row, seq_len, lambda k, p: list(range(len(p[0]))), 0),
        "targets": side(row, target_len, lambda k, p: p[1], pad_id),
        "decoder_tokens": side(row, target_len, lambda k, p: [pad_id] + p[1][:-1], pad_id),
        "decoder_segment_ids": side(row, target_len, lambda k, p: [k + 1] * len(p[1]), 0),
        "decoder_positions": side(row, target_len, lambda k, p: list(range(len(p[1]))), 0),
        "loss_mask": side(row, target_len, lambda k, p: [1.0] * len(p[1]), 0.0),
    } for row in rows]


@pytest.mark.parametrize("pack", [True, False])
@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_rows_match_per_pair_reference(pack, overlong):
    rng = random.Random(1)
    pairs = [([rng.randint(4, 99) for _ in range(rng.randint(0, 12))] + [EOS], [rng.randint(4, 99) for _ in range(rng.randint(1, 8))] + [EOS])
             for _ in range(200)]
    split = make_split(pairs, 10, 6, pack, overlong)
    expected = reference_rows(pairs, 10, 6, pack, overlong, pad_id=7)
    assert split.num_rows == len(expected)
    order = np.array([5, 0, 5, len(expected) - 1, 3])  # any order, repeats allowed (eval wraps around)
    batch = Seq2SeqRows(Config().seq2seq).batch(split, np.concatenate([[1, 2], order]), slice(2, None), 10, 7, (0, 0))
    for key, value in batch.items():
        assert value.tolist() == [expected[r][key] for r in order], key
    too_long = sum(len(i) > 10 or len(t) > 6 for i, t in pairs)
    assert too_long > 0 and (split.packing.truncated, split.packing.dropped) == ((too_long, 0) if overlong == "truncate" else (0, too_long))


# ----------------------------------------------------------------------------- reading


def pair_config(paths, cache_dir, *overrides):
    return load_config(None, [
        "model.family=t5", "model.style=t5", "train.objective=seq2seq", "model.vocab_size=512",
        f"data.paths=[{','.join(str(p) for p in paths)}]", f"data.cache_dir={cache_dir}",
        "data.seq_len=48", "seq2seq.target_len=24", "data.val_fraction=0.2", "data.global_batch_size=4", *overrides,
    ])


@pytest.mark.parametrize("line, message", [
    ('{"input": "a"}', "missing key 'target' (seq2seq.target_key); expected a JSON object with string fields 'input'"),
    ('{"target": "b"}', "missing key 'input' (seq2seq.input_key)"),
    ('{"input": "a", "target": 3}', "key 'target' (seq2seq.target_key) holds a number"),
    ('{"input": "a", "target": "  \\n"}', "key 'target' (seq2seq.target_key) is empty"),
    ('{"input": "a", "target": ', "invalid JSON"),
    ('["a", "b"]', "got an array; expected a JSON object with string fields 'input' (seq2seq.input_key) and 'target'"),
])
def test_bad_records_name_file_line_and_key(tmp_path, line, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"input": "x", "target": "y"}) + "\n\n" + line + "\n")
    with pytest.raises(DataError) as error:
        load_pairs(pair_config([path], tmp_path))
    text = str(error.value)
    assert text.startswith(f"{path}:3: ") and message in text and "\n" not in text


def test_non_jsonl_and_empty_files(tmp_path):
    (tmp_path / "notes.txt").write_text("plain text\n")
    with pytest.raises(DataError, match=r"notes.txt: train.objective=seq2seq reads JSONL files .* got a '.txt' file"):
        load_pairs(pair_config([tmp_path / "notes.txt"], tmp_path))
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"data.paths: no records in 1 file\(s\)"):
        load_pairs(pair_config([tmp_path / "empty.jsonl"], tmp_path))


# ----------------------------------------------------------------------------- val_paths


def test_val_paths_are_the_validation_split(tmp_path):
    for name in ("a", "b", "held"):
        (tmp_path / f"{name}.txt").write_text(f"document {name}\n")
    plain = replace(Config(), **{"data.paths": [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]}).data
    corpus = load_corpus(plain)
    before = hashlib.sha256()  # the fingerprint as computed before val_paths existed
    for doc in corpus.documents:
        before.update(f"{doc.name}\0{hashlib.sha256(doc.text.encode()).hexdigest()}\n".encode())
    assert corpus.fingerprint == before.hexdigest()[:16] and corpus.val_documents is None

    with_val = load_corpus(replace(plain, val_paths=(str(tmp_path / "held.*"),)))
    train, val = with_val.split(0.99)  # the fraction is unused: every data.paths document trains
    assert [d.text for d in train] == ["document a\n", "document b\n"] and [d.text for d in val] == ["document held\n"]
    assert with_val.fingerprint != corpus.fingerprint
    assert load_corpus(replace(plain, max_documents=1, val_paths=(str(tmp_path / "held.txt"),))).split(0.5)[0][0].text == "document a\n"
    with pytest.raises(DataError, match=r"b.txt is in both data.paths and data.val_paths"):
        load_corpus(replace(plain, val_paths=(str(tmp_path / "b.txt"),)))
    with pytest.raises(DataError, match=r"data.val_paths: the glob '.*\*.md' matches no files"):
        load_corpus(replace(plain, val_paths=(str(tmp_path / "*.md"),)))


# ----------------------------------------------------------------------------- end to end


def write_pairs(path, n, seed):
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 12))]
        records.append({"input": " ".join(words), "target": " ".join(reversed(words)) + " done"})
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records


def test_build_pair_data_end_to_end(tmp_path, data_cache):
    records = write_pairs(tmp_path / "train.jsonl", 120, seed=0)
    data = build_pair_data(pair_config([tmp_path / "train.jsonl"], data_cache))
    val_records = [r for r in records if is_validation(r["input"], 0.2)]
    assert data.stats["documents"] == {"train": 120 - len(val_records), "val": len(val_records)} and val_records
    assert data.stats["overlong"] == {"train": {"truncated": 0, "dropped": 0}, "val": {"truncated": 0, "dropped": 0}}
    assert data.stats["rows"]["train"] == data.train.num_rows and data.stats["skipped"] == {}
    assert data.stats["tokens"]["train"] == data.train.num_tokens and data.layout.decoder_len(48) == 24
    # Validation rows decode back to the held-out pairs, in file order.
    batch = data.eval_batches(1)[0]
    tok = data.tokenizer
    first_input = batch["encoder_tokens"][0][batch["encoder_segment_ids"][0] == 1]
    first_target = batch["targets"][0][batch["decoder_segment_ids"][0] == 1]
    assert first_input[-1] == first_target[-1] == tok.eos_id
    assert tok.decode(first_input[:-1]) == val_records[0]["input"] and tok.decode(first_target[:-1]) == val_records[0]["target"]
    # Training batches: seeded, and the same rows whatever the number of hosts.
    one, (h0, h1) = data.train_iterator(), (data.train_iterator(0, 2), data.train_iterator(1, 2))
    for _ in range(2):
        full, a, b = next(one), next(h0), next(h1)
        assert full["decoder_tokens"].shape == (4, 24)
        for key in full:
            np.testing.assert_array_equal(np.concatenate([a[key], b[key]]), full[key])
    for iterator in (one, h0, h1):
        iterator.close()

    (tmp_path / "held").mkdir()
    held = write_pairs(tmp_path / "held" / "val.jsonl", 5, seed=1)
    with_files = build_pair_data(pair_config([tmp_path / "train.jsonl"], data_cache, f"data.val_paths=[{tmp_path}/held/*.jsonl]"))
    assert with_files.stats["documents"] == {"train": 120, "val": 5} and with_files.fingerprint != data.fingerprint
    row = with_files.eval_batches(1)[0]
    assert with_files.tokenizer.decode(row["targets"][0][row["decoder_segment_ids"][0] == 1][:-1]) == held[0]["target"]

    no_val = build_pair_data(pair_config([tmp_path / "train.jsonl"], data_cache, "data.val_fraction=0.0001"))
    with pytest.raises(DataError, match=r"no input hashed into data.val_fraction \(0.0001\); raise it or give data.val_paths"):
        no_val.eval_batches(1)
    short = pair_config([tmp_path / "train.jsonl"], data_cache, "seq2seq.target_len=2", "seq2seq.overlong=drop")
    with pytest.raises(DataError, match=r"no training rows: all \d+ pairs are longer than a row .* seq2seq.overlong=drop"):
        build_pair_data(short)


# ----------------------------------------------------------------------------- sft-from-corpus


def doc_lines(node):
    """The docstring's lines without their indentation, which the prompt's dedent changes."""
    return [line.strip() for line in ast.get_docstring(node, clean=False).strip().splitlines()]


def test_sft_from_corpus_records_are_function_sources(tmp_path, capsys):
    out = tmp_path / "sft" / "fns.jsonl"
    assert cli.main(["data", "sft-from-corpus", "--out", str(out), "--max-files", "20", "--val-fraction", "0.3"]) == 0
    printed = capsys.readouterr().out.splitlines()
    train = [json.loads(line) for line in out.read_text().splitlines()]
    val = [json.loads(line) for line in validation_path(out).read_text().splitlines()]
    assert validation_path(out).name == "fns.val.jsonl"
    assert printed[1] == f"train: {len(train)} records -> {out}" and printed[2].startswith(f"val: {len(val)} records")
    assert len(train) > 50 and val

    root, files = builtin_corpus_files()
    sources, functions = {}, {}
    for path in files[:20]:
        name = path.relative_to(root).as_posix()
        try:
            sources[name] = path.read_text(encoding="utf-8")
            tree = ast.parse(sources[name])
        except (UnicodeDecodeError, SyntaxError, ValueError):
            continue
        for n in ast.walk(tree):
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
                functions[name, n.lineno] = n
    split_of = {}
    for split, records in (("train", train), ("val", val)):
        for record in records:
            name, line = record["source"].rsplit(":", 1)
            assert split_of.setdefault(name, split) == split  # no file in both splits
            assert (split == "val") == is_validation(name, 0.3)
            node = functions[name, int(line)]
            lines = re.findall(r".*?(?:\r\n|\r|\n)|.+$", sources[name], re.S)
            expected = textwrap.dedent("".join(lines[node.lineno - 1 : node.end_lineno]))
            blank = re.compile(r"(?m)^[ \t]+$")  # dedent empties whitespace-only lines; so may the extractor
            assert blank.sub("", record["prompt"] + record["response"]) == blank.sub("", expected)
            assert re.match(r"(async\s+)?def\s", record["prompt"]) and record["response"].strip()
            function = ast.parse(record["prompt"] + record["response"]).body[0]
            assert function.name == node.name and len(function.body) == len(node.body)
            prompt_only = ast.parse(record["prompt"]).body[0]  # the prompt ends with the docstring
            assert len(prompt_only.body) == 1 and doc_lines(prompt_only) == doc_lines(node)

    assert cli.main(["data", "sft-from-corpus", "--out", str(out), "--max-files", "2"]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "already exist" in error and "--force" in error
    assert cli.main(["data", "sft-from-corpus", "--out", str(out), "--max-files", "20", "--force"]) == 0
    assert cli.main(["data", "sft-from-corpus", "--out", str(tmp_path / "fns.txt")]) == 2
    assert "expected a .jsonl file name" in capsys.readouterr().err
