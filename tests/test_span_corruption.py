"""T5 span corruption: lengths, noise masks, sentinels and the row layout.

Each test compares against something computed independently: a transcription of T5's
`random_spans_helper` loop, the exact distribution of a uniformly random split of n tokens into
S spans, an inverse that rebuilds the original tokens, the raw windows of the packed stream, and a
one-host, uninterrupted run.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

from lmjax.config import SpanCorruptionConfig, TokenizerConfig, load_config
from lmjax.data import DataError, TokenizerError, build_data
from lmjax.data.span_corruption import (
    SpanCorruptionRows,
    corrupt,
    lengths,
    noise_mask,
    sentinel_ids,
    sentinel_tokens,
    span_corruption_lengths,
)

T5 = [
    "model.family=t5", "model.style=t5", "model.vocab_size=512", "train.objective=span_corruption",
    "data.tokenizer.sentinels=100", "data.seq_len=64", "data.max_documents=60", "data.val_fraction=0.1",
]


def t5_random_spans_helper(inputs_length, noise_density, mean_noise_span_length):
    """t5/data/preprocessors.py, random_spans_helper, extra_tokens_per_span_inputs = _targets = 1."""

    def _tokens_length_to_inputs_length_targets_length(tokens_length):
        num_noise_tokens = int(round(tokens_length * noise_density))
        num_nonnoise_tokens = tokens_length - num_noise_tokens
        num_noise_spans = int(round(num_noise_tokens / mean_noise_span_length))
        return num_nonnoise_tokens + num_noise_spans + 1, num_noise_tokens + num_noise_spans + 1

    tokens_length = inputs_length - 1
    while _tokens_length_to_inputs_length_targets_length(tokens_length + 1)[0] <= inputs_length:
        tokens_length += 1
    inputs_length, targets_length = _tokens_length_to_inputs_length_targets_length(tokens_length)
    if noise_density == 0.5 and targets_length > inputs_length:
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


def uncorrupt(inputs, targets, is_sentinel, eos_id):
    """The original tokens: each sentinel of the inputs filled with what follows it in the targets."""
    assert inputs[-1] == eos_id and targets[-1] == eos_id
    spans, current = {}, None
    for token in targets[:-1]:
        if is_sentinel(token):
            current = spans.setdefault(int(token), [])
        else:
            current.append(int(token))
    assert all(spans.values())  # every span is non-empty
    out = []
    for token in inputs[:-1]:
        out.extend(spans.pop(int(token)) if is_sentinel(token) else [int(token)])
    assert not spans  # every span of the targets has its sentinel in the inputs
    return out


# ----------------------------------------------------------------------------- lengths and masks


def test_lengths_are_t5s_helper():
    assert span_corruption_lengths(512, 0.15, 3.0) == (568, 114)  # T5's documented case
    for density, mean in ((0.15, 3.0), (0.15, 2.0), (0.3, 3.0), (0.5, 3.0), (0.5, 8.0), (0.05, 10.0)):
        for inputs_length in (128, 129, 200, 333, 512, 1024):
            assert span_corruption_lengths(inputs_length, density, mean) == t5_random_spans_helper(inputs_length, density, mean)


def test_too_short_rows_fail_in_one_line_naming_the_shortest_that_fits():
    with pytest.raises(DataError) as error:
        span_corruption_lengths(8, 0.15, 3.0)
    message = str(error.value)
    assert "\n" not in message and "data.seq_len" in message and "span_corruption.noise_density" in message
    shortest = int(re.search(r"data.seq_len >= (\d+)", message).group(1))
    raw, targets = span_corruption_lengths(shortest, 0.15, 3.0)  # it fits ...
    mask = noise_mask(raw, 0.15, 3.0, np.random.default_rng(0))
    inputs, _ = corrupt(np.arange(10, 10 + raw), mask, np.arange(100, 110), 3)
    assert len(inputs) <= shortest and mask.any()
    with pytest.raises(DataError):  # ... and one less does not
        span_corruption_lengths(shortest - 1, 0.15, 3.0)


def test_noise_masks_follow_t5s_counts_and_split_spans_uniformly():
    n, spans = 30, 10  # 15% of 200 tokens, mean span 3
    noise_lengths, nonnoise_lengths = [], []
    for seed in range(3):
        for row in range(2000):
            mask = noise_mask(200, 0.15, 3.0, np.random.default_rng((seed, row)))
            assert not mask[0] and mask[-1]  # starts with text, ends with noise
            run_starts = np.flatnonzero(np.diff(np.concatenate([[-1], mask.astype(int)])))
            runs = np.diff(np.concatenate([run_starts, [200]]))
            assert mask.sum() == n and len(runs) == 2 * spans
            nonnoise_lengths.extend(runs[0::2])
            noise_lengths.extend(runs[1::2])
    assert abs(np.sum(noise_lengths) / (200 * 6000) - 0.15) < 1e-9 and abs(np.mean(noise_lengths) - 3.0) < 1e-9
    # All splits of n tokens into S non-empty spans are equally likely: P(a span has k tokens) =
    # C(n - k - 1, S - 2) / C(n - 1, S - 1).
    for observed, total in ((np.array(noise_lengths), n), (np.array(nonnoise_lengths), 200 - n)):
        for k in range(1, 8):
            p = math.comb(total - k - 1, spans - 2) / math.comb(total - 1, spans - 1)
            assert abs((observed == k).mean() - p) < 4 * math.sqrt(p * (1 - p) / observed.size), (total, k)
    # Other lengths: the measured density and mean span length stay near the settings.
    rng = np.random.default_rng(1)
    masks = [noise_mask(int(length), 0.15, 3.0, rng) for length in rng.integers(50, 400, 2000)]
    noise = sum(int(m.sum()) for m in masks)
    n_spans = sum(int((np.diff(m.astype(int)) == 1).sum()) for m in masks)
    assert abs(noise / sum(m.size for m in masks) - 0.15) < 0.005 and abs(noise / n_spans - 3.0) < 0.1
    # However short the example or dense the noise: some text first, noise last.
    for density, mean in ((0.15, 3.0), (0.8, 5.0), (0.02, 1.0)):
        for length in range(2, 60):
            mask = noise_mask(length, density, mean, rng)
            assert mask.size == length and not mask[0] and mask[-1]
    assert noise_mask(1, 0.15, 3.0, rng).tolist() == [False]


def test_corruption_replaces_each_span_by_one_sentinel_and_inverts():
    tokens = np.arange(10, 18)
    mask = np.array([0, 0, 1, 1, 0, 0, 1, 1], bool)
    inputs, targets = corrupt(tokens, mask, np.array([100, 101, 102]), 3)
    assert inputs.tolist() == [10, 11, 100, 14, 15, 101, 3]
    assert targets.tolist() == [100, 12, 13, 101, 16, 17, 3]
    raw, targets_len = span_corruption_lengths(64, 0.15, 3.0)
    sentinels = np.arange(1000, 1100)
    rng = np.random.default_rng(0)
    for length in [raw] * 200 + list(range(1, raw)):
        tokens = rng.integers(4, 1000, length)
        inputs, targets = corrupt(tokens, noise_mask(length, 0.15, 3.0, rng), sentinels, 3)
        assert uncorrupt(inputs, targets, lambda t: t >= 1000, 3) == tokens.tolist()
        is_sentinel = inputs >= 1000
        assert not (is_sentinel[1:] & is_sentinel[:-1]).any()
        assert len(inputs) <= 64 and len(targets) <= targets_len
        if length == raw:  # a full row: T5's lengths exactly
            assert len(targets) == targets_len and len(inputs) == 64
    with pytest.raises(DataError, match="data.tokenizer.sentinels"):
        corrupt(np.arange(10, 14), np.array([0, 1, 0, 1], bool), np.array([100]), 3)  # 2 spans, 1 sentinel


# ----------------------------------------------------------------------------- the row layout


@pytest.fixture(scope="module")
def t5_data(data_cache):
    cfg = load_config(None, T5 + [f"data.cache_dir={data_cache}"])
    return cfg, build_data(cfg, lambda tokenizer: SpanCorruptionRows(cfg.span_corruption, tokenizer, cfg.seed))


def test_sentinels_follow_the_special_tokens(t5_data):
    _, data = t5_data
    tokenizer = data.tokenizer
    special = list(TokenizerConfig().special_tokens)  # the MLM and chat markers, ids 4, 5, ...
    first = 4 + len(special)
    assert [tokenizer.piece(i) for i in range(4, first)] == special
    assert [tokenizer.piece(i) for i in range(first, first + 100)] == sentinel_tokens(100)
    assert sentinel_ids(tokenizer, 100).tolist() == list(range(first, first + 100))


def test_rows_are_corrupted_windows_of_the_stream(t5_data):
    cfg, data = t5_data
    layout, tokenizer, pad = data.layout, data.tokenizer, data.tokenizer.pad_id
    raw, targets_len = lengths(cfg.span_corruption, 64)
    assert layout.decoder_len(64) == targets_len == 14
    n_rows = layout.num_rows(data.train, 64)
    assert n_rows == math.ceil(data.train.num_tokens / raw) > 100
    # Rows at the start, rows holding the eos of a document (not the split's last), the last rows.
    document_ends = (data.train.doc_offsets[1:9] - 1) // raw
    rows = np.concatenate([np.arange(16), document_ends, np.arange(n_rows - 8, n_rows)])
    batch = layout.batch(data.train, rows, slice(None), 64, pad, (0, 5))
    assert batch["encoder_tokens"].shape == (32, 64) and batch["targets"].shape == (32, targets_len)
    assert all(v.dtype == np.int32 for k, v in batch.items() if k != "loss_mask") and batch["loss_mask"].dtype == np.float32
    sentinel_pieces = {i for i in range(tokenizer.vocab_size) if re.fullmatch(r"<extra_id_\d+>", tokenizer.piece(i))}
    crossed_documents = 0
    for i, r in enumerate(rows):
        window = data.train.tokens[r * raw : (r + 1) * raw].tolist()
        n_in, n_tg = batch["encoder_segment_ids"][i].sum(), batch["decoder_segment_ids"][i].sum()
        inputs, targets = batch["encoder_tokens"][i, :n_in], batch["targets"][i, :n_tg]
        assert uncorrupt(inputs, targets, lambda t: int(t) in sentinel_pieces, tokenizer.eos_id) == window
        crossed_documents += tokenizer.eos_id in window[:-1]
        if len(window) == raw:
            assert n_tg == targets_len and n_in == 64  # T5's lengths fill both rows
        for prefix in ("encoder", "decoder"):
            segments, positions = batch[f"{prefix}_segment_ids"][i], batch[f"{prefix}_positions"][i]
            n = segments.sum()
            assert segments.tolist() == [1] * n + [0] * (len(segments) - n)
            assert positions.tolist() == list(range(n)) + [0] * (len(segments) - n)
        assert (batch["encoder_tokens"][i, n_in:] == pad).all() and (batch["targets"][i, n_tg:] == pad).all()
        expected_decoder = [pad] + targets[:-1].tolist() + [pad] * (targets_len - n_tg)
        assert batch["decoder_tokens"][i].tolist() == expected_decoder  # T5: decoder starts at pad
        assert batch["loss_mask"][i].tolist() == [1.0] * n_tg + [0.0] * (targets_len - n_tg)
    assert len(data.train.tokens[(n_rows - 1) * raw :]) < raw  # the last window was short here
    assert crossed_documents > 0  # eos between documents stays a token
    # The key picks the noise: the same key, the same batch; another key, other masks.
    again = layout.batch(data.train, rows, slice(None), 64, pad, (0, 5))
    other = layout.batch(data.train, rows, slice(None), 64, pad, (0, 6))
    assert all((again[k] == batch[k]).all() for k in batch) and not (other["targets"] == batch["targets"]).all()


def test_batches_are_host_independent_and_resume_exactly(t5_data, check_host_independent_and_resumable):
    cfg, data = t5_data
    state = check_host_independent_and_resumable(data)
    assert state["span_corruption.noise_density"] == 0.15
    evals = [data.eval_batches(1, h, 2)[0] for h in range(2)]
    for key, value in data.eval_batches(1)[0].items():
        np.testing.assert_array_equal(np.concatenate([e[key] for e in evals]), value)


def test_missing_sentinels_fail_in_one_line(t5_data, data_cache):
    cfg, data = t5_data
    # 2048 encoder tokens need 114 spans: more than the tokenizer's 100 sentinels.
    with pytest.raises(TokenizerError, match="'<extra_id_100>'.*data.tokenizer.sentinels >= 114"):
        data.layout.num_rows(data.train, 2048)
    plain = build_data(load_config(None, ["model.vocab_size=512", "data.max_documents=60", f"data.cache_dir={data_cache}"]))
    with pytest.raises(TokenizerError) as error:
        sentinel_ids(plain.tokenizer, 3)
    message = str(error.value)
    assert "\n" not in message and "'<extra_id_0>'" in message and str(plain.tokenizer.path) in message
    assert "data.tokenizer.sentinels" in message
    with pytest.raises(TokenizerError, match="<extra_id_0>"):
        SpanCorruptionRows(SpanCorruptionConfig(), plain.tokenizer, 0).num_rows(plain.train, 64)
