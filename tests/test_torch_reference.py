"""The PyTorch peer of `lmjax bench` (experiments/bench/torch_reference.py, run by peer.py) is the
same model as lmjax's: the same parameter count at the benchmark shape, the same logits when it
is given a tiny lmjax model's parameters, and a train loop that runs."""

import importlib.util
import json
import math
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from lmjax import flops  # noqa: E402
from lmjax.config import Config, DataConfig, ModelConfig, load_config  # noqa: E402
from lmjax.models import build_model  # noqa: E402
from lmjax.train.optim import make_schedule  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "experiments" / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tr, peer = _load("torch_reference"), _load("peer")


def peer_model(cfg: Config):
    """The torch model torch_reference.py builds from the options peer.py derives from `cfg`."""
    torch.manual_seed(0)
    return tr.DecoderLM(tr.parse_args(peer.peer_cli_args(cfg)))


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_param_count_matches_lmjax_at_the_bench_shape(style):
    cfg = load_config(ROOT / "configs" / "bench_cpu.yaml", peer.lmjax_overrides(style, 256, 16, []))
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = peer_model(cfg)
    counts, expected = tr.param_counts(model), flops.param_counts(cfg.model)
    assert counts["total"] == expected["total"]
    assert counts["non_embedding"] == expected["non_embedding"]
    if style == "llama":  # the shape: ~10.6M non-embedding parameters
        assert counts["non_embedding"] == 6 * (4 * 384**2 + 3 * 384 * 1024 + 2 * 384) + 384


def test_peer_refuses_a_config_it_does_not_implement():
    cfg = load_config(ROOT / "configs" / "bench_cpu.yaml", ["model.tie_embeddings=false", "model.sliding_window=64"])
    with pytest.raises(peer.PeerError, match="tie_embeddings; no sliding_window"):
        peer.peer_cli_args(cfg)


def lmjax_to_torch(params: dict, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """A state dict of the peer from lmjax's parameters (scanned layers: leading [n_layers] axis).
    lmjax kernels are [in, out] ([D, heads, H] for q/k/v, [N, H, D] for out), torch's [out, in];
    the peer's qkv is query, key, value stacked on the output axis, its SwiGLU fc_in gate then up."""
    d = cfg.d_model

    def linear(kernel, in_size):
        return np.asarray(kernel).reshape(in_size, -1).T

    layers = params["layers"]
    state = {"embed.weight": params["embed"]["embedding"]}
    if cfg.style == "gpt2":
        state["position_embedding.weight"] = params["position_embedding"]
    for name in ("scale", "bias"):
        if name in params["final_norm"]:
            state[f"final_norm.{'weight' if name == 'scale' else name}"] = params["final_norm"][name]
    for i in range(cfg.n_layers):
        at = {k: jax.tree.map(lambda x: np.asarray(x[i]), v) for k, v in layers["attention"].items()}
        mlp = {k: jax.tree.map(lambda x: np.asarray(x[i]), v) for k, v in layers["mlp"].items()}
        p = f"layers.{i}"
        state[f"{p}.attention.qkv.weight"] = np.concatenate([linear(at[n]["kernel"], d) for n in ("query", "key", "value")])
        state[f"{p}.attention.out.weight"] = linear(at["out"]["kernel"], cfg.n_heads * cfg.head_size)
        if cfg.ffn == "swiglu":
            state[f"{p}.mlp.fc_in.weight"] = np.concatenate([linear(mlp[n]["kernel"], d) for n in ("gate", "up")])
        else:
            state[f"{p}.mlp.fc_in.weight"] = linear(mlp["fc_in"]["kernel"], d)
        state[f"{p}.mlp.down.weight"] = linear(mlp["down"]["kernel"], cfg.d_ff)
        if cfg.use_bias:
            state[f"{p}.attention.qkv.bias"] = np.concatenate([at[n]["bias"].reshape(-1) for n in ("query", "key", "value")])
            state[f"{p}.attention.out.bias"] = at["out"]["bias"]
            state[f"{p}.mlp.fc_in.bias"] = mlp["fc_in"]["bias"]
            state[f"{p}.mlp.down.bias"] = mlp["down"]["bias"]
        for norm in ("attention_norm", "mlp_norm"):
            for name, value in layers[norm].items():
                state[f"{p}.{norm}.{'weight' if name == 'scale' else name}"] = np.asarray(value[i])
    return {k: torch.from_numpy(np.array(v, np.float32)) for k, v in state.items()}


@pytest.mark.parametrize("style,kv_heads", [("llama", None), ("llama", 2), ("gpt2", None)])
def test_peer_logits_match_lmjax_with_ported_parameters(style, kv_heads):
    m = ModelConfig(style=style, vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=kv_heads, d_ff=48, max_seq_len=32)
    cfg = Config(model=m, data=DataConfig(seq_len=16, global_batch_size=2))
    lmjax_model = build_model(m)
    shapes = nn.unbox(jax.eval_shape(lmjax_model.init, jax.random.key(0), jnp.zeros((1, 16), jnp.int32))["params"])
    # Random values for every parameter, none at its init (biases 0 and norm scales 1 would hide a
    # mis-mapped one); the tree's shapes only come from lmjax (no init to compile).
    rng = np.random.default_rng(0)

    def draw(path, shape):
        base = 1.0 if str(getattr(path[-1], "key", "")) == "scale" else 0.0
        return (base + rng.normal(0, 0.1, shape.shape)).astype(np.float32)

    params = jax.tree_util.tree_map_with_path(draw, shapes)
    tokens = rng.integers(0, m.vocab_size, (2, 16))
    expected = np.asarray(jax.jit(lmjax_model.apply)({"params": params}, jnp.asarray(tokens, jnp.int32)))

    model = peer_model(cfg)
    state = lmjax_to_torch(params, m)
    assert set(state) == set(model.state_dict()), "every peer parameter is mapped, and only those"
    model.load_state_dict(state)
    with torch.no_grad():
        got = model(torch.from_numpy(tokens)).numpy()
        loss = model(torch.from_numpy(tokens[:, :-1]), torch.from_numpy(tokens[:, 1:])).item()
    assert np.abs(expected).max() > 0.5, "logits large enough for the comparison to mean something"
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
    # The loss is the mean next-token cross-entropy of those logits (lmjax's token_cross_entropy).
    logits = expected[:, :-1].astype(np.float64)  # causal: the prefix's logits do not see the last token
    log_z = np.log(np.exp(logits).sum(-1))
    target_logit = np.take_along_axis(logits, tokens[:, 1:, None], -1)[..., 0]
    assert loss == pytest.approx(float(np.mean(log_z - target_logit)), abs=1e-5)


@pytest.mark.parametrize("style", ["llama", "gpt2"])
def test_train_loop_runs_and_learns_one_batch(style, tmp_path):
    out = tmp_path / "peer.json"
    tiny = (f"--style {style} --d-model 32 --layers 2 --heads 4 --d-ff 48 --vocab 64 --max-seq-len 32 --seq-len 16 "
            f"--batch 4 --pool 1 --steps 2 --warmup 1 --lr 1e-2 --lr-warmup 0 --compile none --threads 1 --out {out}")
    result = tr.main(tiny.split())
    assert json.loads(out.read_text())["tokens_per_sec"] == result["tokens_per_sec"]
    losses = result["losses"]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0], "the same batch, 3 AdamW steps at lr 1e-2: the loss falls"
    assert result["params"] == result["params_total"] > 0 and result["peak_memory_bytes"] > 0
    for key in ("step_time_s", "step_time_p10_s", "step_time_p90_s", "time_to_first_step_s", "compile_time_s"):
        assert result[key] >= 0


def test_learning_rate_matches_lmjax_schedule():
    cfg = load_config(ROOT / "configs" / "bench_cpu.yaml", ["train.steps=20", "optim.warmup_steps=5"])
    a = tr.parse_args(peer.peer_cli_args(cfg))
    schedule = make_schedule(cfg)
    for step in range(22):
        assert tr.learning_rate(step, a) == pytest.approx(float(schedule(step)), rel=1e-5)


def test_the_peer_runs_on_the_malloc_the_lmjax_command_picks(monkeypatch):
    """peer.py hands the peer the allocator lmjax restarts itself with (only the variables that
    change), or nothing with --peer-malloc system."""
    from lmjax.host_memory import JEMALLOC_CONF

    for var in ("LD_PRELOAD", "MALLOC_CONF", "GLIBC_TUNABLES", "LMJAX_JEMALLOC", "LMJAX_HUGEPAGE_MALLOC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(peer.sys, "platform", "linux")
    monkeypatch.setattr(peer, "find_jemalloc", lambda: "libjemalloc.so.2")
    assert peer.peer_malloc_environment("lmjax") == {"LD_PRELOAD": "libjemalloc.so.2", "MALLOC_CONF": JEMALLOC_CONF}
    assert peer.peer_malloc_environment("system") == {}
    monkeypatch.setenv("LMJAX_JEMALLOC", "off")
    assert peer.peer_malloc_environment("lmjax") == {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
