"""Weight-decay mask and learning-rate schedules against hand-computed values."""

from __future__ import annotations

import jax
import pytest

from lmjax.config import load_config
from lmjax.models import build_model
from lmjax.train.optim import decay_mask, make_schedule
from lmjax.train.step import abstract_params

SMALL_GPT2 = ["model.style=gpt2", "model.tie_embeddings=false", "model.n_layers=2", "model.d_model=32",
              "model.n_heads=2", "model.d_ff=64", "model.vocab_size=64", "model.max_seq_len=16", "data.seq_len=16"]


@pytest.mark.parametrize("decay_embeddings", [False, True])
def test_decay_mask_by_parameter_kind(decay_embeddings):
    cfg = load_config(None, SMALL_GPT2 + [f"optim.decay_embeddings={str(decay_embeddings).lower()}"])
    mask = decay_mask(abstract_params(cfg, build_model(cfg.model)), cfg.optim.decay_embeddings)
    flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
    assert flat["['layers']['attention']['query']['kernel']"] is True
    assert flat["['layers']['mlp']['fc_in']['kernel']"] is True
    assert flat["['layers']['attention']['query']['bias']"] is False  # a (heads, head_dim) vector
    assert flat["['layers']['mlp_norm']['scale']"] is False
    assert flat["['final_norm']['bias']"] is False
    for table in ("['embed']['embedding']", "['position_embedding']", "['unembed']"):
        assert flat[table] is decay_embeddings


def _lrs(overrides):
    cfg = load_config(None, overrides)
    schedule = make_schedule(cfg)
    return [float(schedule(count)) for count in range(cfg.train.steps)]  # lr of update 1..steps


def test_cosine_schedule_hand_values():
    lrs = _lrs(["optim.lr=1.0", "optim.warmup_steps=4", "optim.min_lr_ratio=0.1", "train.steps=12"])
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])  # the first update does not use lr 0
    # cosine from 1.0 to 0.1 over updates 5..12: lr = 0.1 + 0.9 * (1 + cos(pi * k / 8)) / 2, k = 1..8
    import math

    expected = [0.1 + 0.9 * (1 + math.cos(math.pi * k / 8)) / 2 for k in range(1, 9)]
    assert lrs[4:] == pytest.approx(expected, rel=1e-5)
    assert lrs[-1] == pytest.approx(0.1)  # the last update reaches the final lr


def test_wsd_and_constant_schedules():
    wsd = _lrs(["optim.lr=2.0", "optim.schedule=wsd", "optim.warmup_steps=2", "optim.decay_fraction=0.25",
                "optim.min_lr_ratio=0.0", "train.steps=8"])
    assert wsd == pytest.approx([1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 1.0, 0.0])
    constant = _lrs(["optim.lr=2.0", "optim.schedule=constant", "optim.warmup_steps=2", "train.steps=5"])
    assert constant == pytest.approx([1.0, 2.0, 2.0, 2.0, 2.0])
