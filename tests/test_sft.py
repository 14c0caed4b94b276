"""SFT (`train.objective: sft`): chat template, records, packed rows, and training from a pretrained run."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from lmjax.config import ConfigError, load_config
from lmjax.data.chat import ChatTemplate
from lmjax.data.corpus import DataError
from lmjax.data.post_training import build_sft_data
from lmjax.models import build_model
from lmjax.train.loop import train


def function_record(i: int) -> dict:
    return {"prompt": f'def add_{i}(x):\n    """Return x plus {i}."""\n', "response": f"    y = x + {i}\n    return y\n"}


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


@pytest.fixture(scope="module")
def sft_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sft")
    train_records = [function_record(i) for i in range(120)]
    # Chats in the messages format, with a system turn and two assistant turns.
    train_records += [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"{i} + 1?"},
                                    {"role": "assistant", "content": f"{i + 1}"}, {"role": "user", "content": "and + 2?"},
                                    {"role": "assistant", "content": f"{i + 2}"}]} for i in range(40)]
    # Fewer validation examples than one batch has rows: eval still runs, each example once.
    val_records = [function_record(i) for i in range(1000, 1005)]
    return write_jsonl(folder / "train.jsonl", train_records), write_jsonl(folder / "val.jsonl", val_records)


@pytest.fixture(scope="module")
def sft_overrides(tiny_overrides, sft_files):
    overrides = [o for o in tiny_overrides if not o.startswith(("data.max_documents", "data.val_fraction"))]
    return overrides + ["train.objective=sft", f"data.paths=[{sft_files[0]}]", f"data.val_paths=[{sft_files[1]}]", "data.seq_len=64"]


@pytest.fixture(scope="module")
def sft_data(sft_overrides, tmp_path_factory):
    return build_sft_data(load_config(None, sft_overrides + [f"run_dir={tmp_path_factory.mktemp('run')}"]))


def test_chat_template_renders_turns_and_weights_the_assistant_only(sft_data):
    tokenizer = sft_data.tokenizer
    template = ChatTemplate(load_config(None).chat, tokenizer)
    messages = [("system", "S"), ("user", "hi"), ("assistant", "yo"), ("user", "more"), ("assistant", "ok")]
    ids, weights = template.encode(messages)
    expected_ids, expected_weights = [], []
    for role, content in messages:
        content_ids = tokenizer.encode(content)
        expected_ids += [tokenizer.piece_id(f"<|{role}|>"), *content_ids, tokenizer.piece_id("<|end|>")]
        expected_weights += [0] + [int(role == "assistant")] * (len(content_ids) + 1)
    assert ids.tolist() == expected_ids and weights.tolist() == expected_weights
    # A prompt for generation plus a response is exactly the rendered user/assistant conversation.
    prompt, response = template.prompt_ids("hi"), template.response_ids("yo")
    assert prompt + response == template.encode([("user", "hi"), ("assistant", "yo")])[0].tolist()
    assert template.response_text(template.response_ids("x = 1") + [5, 6]) == "x = 1"


def test_sft_rows_train_only_on_response_tokens_and_keep_packed_examples_apart(sft_data, sft_overrides):
    tokenizer, end = sft_data.tokenizer, sft_data.tokenizer.piece_id("<|end|>")
    assistant = tokenizer.piece_id("<|assistant|>")
    batch = next(iter([sft_data.train.rows(np.arange(4), tokenizer.pad_id)]))
    assert batch["tokens"].shape == (4, 64)
    for row in range(4):
        segments, mask = batch["segment_ids"][row], batch["loss_mask"][row]
        assert segments.max() >= 2, "rows should pack several examples"
        for segment in range(1, segments.max() + 1):
            inputs = batch["tokens"][row][segments == segment]
            targets, weights = batch["targets"][row][segments == segment], mask[segments == segment]
            np.testing.assert_array_equal(inputs[1:], targets[:-1])  # targets are the next tokens
            assert batch["positions"][row][segments == segment].tolist() == list(range(len(inputs)))
            # Weighted targets: after each assistant marker up to and including its end-of-turn, nothing else.
            expected, inside = np.zeros(len(targets)), False
            for t, token in enumerate(inputs):
                inside = inside or token == assistant
                expected[t] = inside
                if inside and targets[t] == end:
                    inside = False
            np.testing.assert_array_equal(weights, expected)
        assert mask[segments == 0].sum() == 0
    # Packed examples do not attend to each other: each one's logits equal its logits alone.
    cfg = load_config(None, sft_overrides)
    model = build_model(cfg.model)
    params = model.init(jax.random.key(0), batch["tokens"][:1])["params"]
    packed = model.apply({"params": params}, batch["tokens"][:1], batch["positions"][:1], batch["segment_ids"][:1])
    segments = batch["segment_ids"][0]
    for segment in range(1, segments.max() + 1):
        alone_tokens = batch["tokens"][0][segments == segment][None]
        alone = model.apply({"params": params}, alone_tokens)
        np.testing.assert_allclose(np.asarray(packed[0][segments == segment]), np.asarray(alone[0]), rtol=1e-5, atol=1e-5)


def test_sft_data_is_host_independent_and_resumable(sft_data, check_host_independent_and_resumable):
    check_host_independent_and_resumable(sft_data)


def test_sft_from_a_pretrained_run_trains_and_evaluates_a_small_validation_file(tmp_path, sft_overrides, tiny_overrides, data_cache):
    source = tmp_path / "pretrained"
    train(load_config(None, tiny_overrides + [f"run_dir={source}", "mesh.data=1"]), devices=jax.devices()[:1])
    overrides = [o for o in sft_overrides if not o.startswith("model.")]
    cfg = load_config(None, overrides + [f"run_dir={tmp_path / 'sft'}", f"train.init_from={source}", "train.eval_every=3"])
    summary = train(cfg)
    records = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < losses[0]
    # 5 validation examples pack into one partial row batch: evaluated once each, no wrap-around.
    data = build_sft_data(cfg)
    val_tokens = float(sum(b["loss_mask"].sum() for b in data.eval_batches(cfg.train.eval_batches)))
    assert val_tokens == data.validation.sequences.weights.sum()
    assert [r["eval_tokens"] for r in records if "eval_tokens" in r] == [val_tokens, val_tokens]
    assert summary["init_from_step"] == 6


def test_bad_sft_records_name_file_line_and_key(tmp_path, sft_overrides):
    def build(records, extra=()):
        path = write_jsonl(tmp_path / "bad.jsonl", records)
        overrides = [o for o in sft_overrides if not o.startswith(("data.paths", "data.val_paths"))]
        return build_sft_data(load_config(None, overrides + [f"data.paths=[{path}]", f"run_dir={tmp_path / 'r'}", *extra]))

    good = [function_record(i) for i in range(30)]
    cases = [
        ({"prompt": "p", "response": "  "}, "key 'response' (sft.response_key) is empty"),
        ({"prompt": "p"}, "missing key 'response' (sft.response_key)"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "key 'messages' (sft.messages_key) has no assistant message"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]}, "message 1: the assistant's content is empty"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "message 0: expected {\"role\": one of system, user, assistant"),
    ]
    for record, message in cases:
        with pytest.raises(DataError) as error:
            build(good[:3] + [record] + good[3:])
        text = str(error.value)
        assert text.startswith(f"{tmp_path / 'bad.jsonl'}:4: ") and message in text and "\n" not in text
    long_prompt = {"prompt": "x = 1\n" * 200, "response": "    return 1\n"}
    with pytest.raises(DataError, match=r"bad.jsonl:31: key 'prompt' has a prompt of \d+ tokens .* data.seq_len=64: no response token"):
        build(good + [long_prompt])
    dropped = build(good + [long_prompt], ["sft.overlong=drop", "data.val_fraction=0.0001"])
    assert dropped.stats["overlong"]["train"] == {"truncated": 0, "dropped": 1}
    with pytest.raises(ConfigError, match=r"sft.prompt_key and sft.response_key must differ"):
        load_config(None, sft_overrides + ["sft.response_key=prompt"])
    with pytest.raises(ConfigError, match=r"train.objective=sft needs model.family dense or moe, got t5"):
        load_config("configs/t5_tiny.yaml", ["train.objective=sft"])
