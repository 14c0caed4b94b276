"""Config and CLI errors: one line naming the key, a non-zero exit, no traceback."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import pytest
import yaml

from lmjax import cli, cpu_peak, host_memory
from lmjax.config import load_yaml, Config, load_config, replace


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.stesp=3"], "unknown config key 'train.stesp'; did you mean 'train.steps'?"),
        (["modle.d_model=3"], "unknown config key 'modle'; did you mean 'model'?"),
        (["train.steps=abc"], "train.steps: expected an integer, got 'abc'"),
        (["logging.progress=maybe"], "logging.progress: expected true or false, got 'maybe'"),
        (["model.style=gpt3"], "model.style: expected one of llama, gpt2, bert, t5, got 'gpt3'"),
        (["model.d_model=100", "model.n_heads=3"], "model.n_heads (3) must divide model.d_model (100)"),
        (["model.n_heads=4", "model.n_kv_heads=3"], "model.n_kv_heads (3) must divide model.n_heads (4)"),
        (["mesh.data=3"], "mesh: data=3 x fsdp=1 x tensor=1 x expert=1 = 3 devices, but 8 are available"),
        (["mesh.data=8", "data.global_batch_size=12"], "data.global_batch_size (12) / train.microbatches (1) = 12 must be divisible by the data-parallel size data*fsdp*expert = 8"),
        (["mesh.data=-1", "mesh.fsdp=-1"], "mesh: only one axis may be -1"),
        (["mesh.cpu_devices=0"], "mesh.cpu_devices must be a positive number of devices or null, got 0"),
    ],
)
def test_config_errors_name_the_key(overrides, expected, tmp_path, capsys):
    rc = cli.main(["train", "configs/dense_tiny.yaml", f"run_dir={tmp_path / 'run'}", *overrides])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and expected in err, err
    assert err.count("\n") == 1
    assert not (tmp_path / "run").exists()  # rejected before anything was written


def test_cli_error_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lmjax.cli", "train", "configs/dense_tiny.yaml", "model.n_kv_heads=3", f"run_dir={tmp_path}/r"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == "error: model.n_kv_heads (3) must divide model.n_heads (4)"


def test_missing_config_and_bad_yaml(tmp_path, capsys):
    assert cli.main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_model: [1,\n")
    assert cli.main(["train", str(bad)]) == 2
    assert "invalid YAML" in capsys.readouterr().err


def test_overrides_and_yaml_round_trip(tmp_path):
    cfg = load_config("configs/dense_tiny.yaml", ["train.steps=7", "optim.lr=3e-4", "data.paths=[a.txt, b/*.jsonl]"])
    assert cfg.train.steps == 7 and cfg.optim.lr == pytest.approx(3e-4) and cfg.data.paths == ("a.txt", "b/*.jsonl")
    assert cfg.model.d_model == yaml.safe_load(open("configs/dense_tiny.yaml"))["model"]["d_model"]
    path = tmp_path / "config.yaml"
    from lmjax.config import save_config

    save_config(cfg, path)
    assert load_config(path) == cfg
    assert replace(cfg, **{"train.steps": 9}).train.steps == 9
    assert Config().mesh.expert == 1


def test_changed_config_on_existing_run_dir_is_refused(tmp_path, tiny_overrides, capsys):
    run = tmp_path / "run"
    args = ["train", "configs/dense_tiny.yaml", *tiny_overrides, f"run_dir={run}", "train.steps=2"]
    assert cli.main(args) == 0
    saved = (run / "config.yaml").read_text()
    assert cli.main(args + ["model.d_ff=256"]) == 2
    err = capsys.readouterr().err
    assert "holds a run with model.d_ff=128, this config has 256" in err
    assert (run / "config.yaml").read_text() == saved  # nothing saved was overwritten


def llama_params_by_hand(vocab, d, layers, heads, kv_heads, d_ff, tied, experts=0, top_k=0):
    """(total, active) of a LLaMA-style decoder, written out: token table, untied head, per layer
    q/k/v/o projections + SwiGLU (3 matrices; MoE: a router [d, experts] + `experts` SwiGLUs, of
    which a token uses top_k) + 2 RMSNorm scales, final RMSNorm. No biases."""
    head = d // heads
    attention = d * heads * head + d * kv_heads * head + d * kv_heads * head + heads * head * d
    swiglu = 3 * d * d_ff
    if experts:
        ffn_total, ffn_active = d * experts + experts * swiglu, d * experts + top_k * swiglu
    else:
        ffn_total = ffn_active = swiglu
    outside_layers = vocab * d + (0 if tied else d * vocab) + d
    return (outside_layers + layers * (attention + ffn_total + 2 * d),
            outside_layers + layers * (attention + ffn_active + 2 * d))


def gpt2_params_by_hand(vocab, d, layers, d_ff, positions, tied):
    """GPT-2, written out: token and position tables, per layer LayerNorm (scale + bias), fused qkv
    [d, 3d] + bias, output projection [d, d] + bias, LayerNorm, MLP [d, d_ff] + bias and [d_ff, d] +
    bias; final LayerNorm; the head tied to the token table."""
    per_layer = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d + (d * d_ff + d_ff) + (d_ff * d + d)
    return vocab * d + positions * d + layers * per_layer + 2 * d + (0 if tied else d * vocab)


# Configs named after a published model: the published model's shape, its published parameter counts
# as (count, the unit it was published to: 1 when exact), and the keys in which the config differs
# from it on purpose. Other configs
# (and ones added later, e.g. encoders) are only loaded.
LLAMA2_7B = dict(style="llama", vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, kv_heads=32, d_ff=11008,
                 tie_embeddings=False)
MIXTRAL_8X7B = dict(style="llama", vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, kv_heads=8, d_ff=14336,
                    tie_embeddings=False, experts=8, top_k=2)
TINYLLAMA_1B = dict(style="llama", vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, kv_heads=4, d_ff=5632,
                    tie_embeddings=False)
GPT2_SMALL = dict(style="gpt2", vocab_size=50257, d_model=768, n_layers=12, n_heads=12, kv_heads=12, d_ff=3072,
                  max_seq_len=1024, tie_embeddings=True)
PUBLISHED_MODELS = {
    # LLaMA(-2) 7B (Touvron et al. 2023): 6.74B parameters.
    "dense_7b.yaml": (LLAMA2_7B, {"total": (6_738_415_616, 1)}, ()),
    # Mixtral 8x7B (Mistral AI 2023; Jiang et al. 2024): 46.7B parameters, 12.9B active per token.
    "mixtral_8x7b.yaml": (MIXTRAL_8X7B, {"total": (46.7e9, 1e8), "active": (12.9e9, 1e8)}, ()),
    # TinyLlama 1.1B (Zhang et al. 2024): 1,100,048,384 parameters with its 32000-token vocabulary.
    # The config keeps TinyLlama's shape but a 32768-token vocabulary (lmjax's tokenizer).
    "dense_1b.yaml": (TINYLLAMA_1B, {"total": (1_100_048_384, 1)}, ("vocab_size",)),
    # GPT-2 small (Radford et al. 2019): 124,439,808 parameters with its 50257-token vocabulary; the
    # config uses a 32768-token vocabulary, as its comment says.
    "gpt2_small.yaml": (GPT2_SMALL, {"total": (124_439_808, 1)}, ("vocab_size",)),
}


def published_counts_by_hand(shape: dict) -> dict[str, int]:
    if shape["style"] == "gpt2":
        total = gpt2_params_by_hand(shape["vocab_size"], shape["d_model"], shape["n_layers"], shape["d_ff"],
                                    shape["max_seq_len"], shape["tie_embeddings"])
        return {"total": total, "active": total}
    total, active = llama_params_by_hand(shape["vocab_size"], shape["d_model"], shape["n_layers"], shape["n_heads"],
                                         shape["kv_heads"], shape["d_ff"], shape["tie_embeddings"],
                                         shape.get("experts", 0), shape.get("top_k", 0))
    return {"total": total, "active": active}


def config_shape(model) -> dict:
    shape = {key: getattr(model, key) for key in ("style", "vocab_size", "d_model", "n_layers", "n_heads", "kv_heads",
                                                    "d_ff", "max_seq_len", "tie_embeddings")}
    if model.family == "moe":
        shape.update(experts=model.moe.n_experts, top_k=model.moe.top_k,
                     d_ff=model.moe.d_ff_expert if model.moe.d_ff_expert is not None else model.d_ff)
    return shape


@pytest.mark.parametrize("path", sorted(str(p) for p in pathlib.Path("configs").glob("*.yaml")))
def test_shipped_configs_load(path):
    source = (load_yaml(path).get("train") or {}).get("init_from")
    if source:
        # A run started from another (sft_tiny from dense_tiny, dpo_tiny from sft_tiny) names the
        # run_dir of a shipped config, and loads once that run exists; here it is left out.
        assert source in {load_yaml(p).get("run_dir") for p in pathlib.Path("configs").glob("*.yaml")}, source
        cfg = load_config(path, ["train.init_from=null"])
    else:
        cfg = load_config(path)
    assert isinstance(cfg, Config) and cfg.model.vocab_size > 0
    name = pathlib.Path(path).name
    if name not in PUBLISHED_MODELS:
        return
    from lmjax import flops

    published, published_counts, differences = PUBLISHED_MODELS[name]
    # The hand formula reproduces the published count of the published shape...
    by_hand = published_counts_by_hand(published)
    for key, (count, unit) in published_counts.items():
        assert round(by_hand[key] / unit) == round(count / unit), (key, by_hand[key], count)
    # ... the config has that shape (but for the differences its comment states) ...
    shape = config_shape(cfg.model)
    mismatched = {key: (shape[key], value) for key, value in published.items()
                  if key in shape and key not in differences and shape[key] != value}
    assert not mismatched, f"{name} differs from the published model (config, published): {mismatched}"
    # ... and lmjax counts the config, and the published model, as the hand formula does.
    counts = flops.param_counts(cfg.model)
    config_by_hand = published_counts_by_hand({**published, **{key: shape[key] for key in differences}})
    assert (counts["total"], counts["active"]) == (config_by_hand["total"], config_by_hand["active"])
    published_model = dataclasses.replace(cfg.model, **{key: published[key] for key in differences})
    assert flops.param_counts(published_model)["total"] == by_hand["total"]


def test_dense_125m_has_the_size_its_comment_states():
    """~124M parameters: GPT-2 small's width, depth and heads, GPT-2's vocabulary padded to 50304, tied LLaMA."""
    from lmjax import flops

    model = load_config("configs/dense_125m.yaml").model
    assert (model.style, model.d_model, model.n_layers, model.n_heads, model.vocab_size) == ("llama", 768, 12, 12, 50304)
    total, _ = llama_params_by_hand(50304, 768, 12, 12, 12, model.d_ff, model.tie_embeddings)
    assert flops.param_counts(model)["total"] == total
    assert abs(total / 124e6 - 1) < 0.005


def test_eval_prints_its_result_and_no_library_notices(tmp_path, tiny_overrides):
    run = tmp_path / "run"
    assert cli.main(["train", "configs/dense_tiny.yaml", *tiny_overrides, f"run_dir={run}", "train.steps=2"]) == 0
    result = subprocess.run([sys.executable, "-m", "lmjax.cli", "eval", str(run)], capture_output=True, text=True, check=True)
    # tiny_overrides evaluate one batch: no standard error (it needs two batches)
    assert list(json.loads(result.stdout)) == ["eval_loss", "eval_ppl", "eval_bpb", "eval_tokens", "step"]
    assert "read only" not in result.stderr and "read_only" not in result.stderr, result.stderr


def test_the_command_restarts_once_with_the_chosen_malloc(monkeypatch):
    calls = []
    monkeypatch.setattr(cli.os, "execve", lambda *args: calls.append(args))
    monkeypatch.setattr(cli.sys, "platform", "linux")
    monkeypatch.setattr(host_memory, "find_jemalloc", lambda: None)  # glibc's huge pages
    for var in ("LMJAX_HUGEPAGE_MALLOC", "LMJAX_JEMALLOC", "LD_PRELOAD", "MALLOC_CONF"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    cli.restart_with_tuned_malloc(["bench", "c.yaml", "model.remat=dots"])
    ((executable, argv, env),) = calls
    assert argv == [sys.executable, "-m", "lmjax.cli", "bench", "c.yaml", "model.remat=dots"]
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"  # the user's tunables kept
    for already_set in ({"GLIBC_TUNABLES": env["GLIBC_TUNABLES"]}, {"LMJAX_HUGEPAGE_MALLOC": "off"}):
        with monkeypatch.context() as m:
            for key, value in already_set.items():
                m.setenv(key, value)
            cli.restart_with_tuned_malloc(["bench"])
    assert len(calls) == 1  # the restarted process, or a user who opted out, runs as it is
    monkeypatch.delenv("GLIBC_TUNABLES")
    cli.restart_with_tuned_malloc(["c.yaml", "--steps", "3"], program=["/x/profile_step.py"])  # a script restarts as itself
    assert calls[1][1] == [sys.executable, "/x/profile_step.py", "c.yaml", "--steps", "3"]
    monkeypatch.setattr(host_memory, "find_jemalloc", lambda: "libjemalloc.so.2")  # the system has jemalloc
    cli.restart_with_tuned_malloc(["bench"])
    assert calls[2][2]["LD_PRELOAD"] == "libjemalloc.so.2" and calls[2][2]["MALLOC_CONF"] == host_memory.JEMALLOC_CONF
    assert "GLIBC_TUNABLES" not in calls[2][2]


def test_the_restarted_command_keeps_its_arguments_and_exit_status(tmp_path):
    # A real restart (no allocator chosen yet): the re-executed process parses the same arguments and reports
    # the missing config once, with the user-error status; a restart loop would hit the timeout instead.
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LMJAX_HUGEPAGE_MALLOC", "LD_PRELOAD", "MALLOC_CONF")}
    missing = tmp_path / "no_such.yaml"
    result = subprocess.run([sys.executable, "-m", "lmjax.cli", "eval", str(missing)], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.count("error:") == 1 and str(missing) in result.stderr


RESTARTED = """
import os, sys
from lmjax.cli import dispatch_inline_under_jemalloc, restart_with_tuned_malloc
restart_with_tuned_malloc(sys.argv[1:], program=[os.path.abspath(__file__)])
dispatch_inline_under_jemalloc()  # as the command and the bench tools do
import jax
from lmjax.host_memory import allocator, jemalloc_in_use
print(sys.argv[1:], os.environ.get("LD_PRELOAD"), jemalloc_in_use(), jax.config.values["jax_cpu_enable_async_dispatch"])
print(allocator())
"""


@pytest.mark.skipif(host_memory.find_jemalloc() is None, reason="jemalloc is not installed (apt-get install libjemalloc2)")
def test_a_restart_under_jemalloc_runs_cpu_programs_inline(tmp_path):
    """The real restart where the system has jemalloc: the process runs on it, and dispatches
    single-device CPU programs inline, so a step's temporaries are freed before the next step's
    are taken. With LMJAX_JEMALLOC=off it stays on glibc and jax's asynchronous dispatch."""
    script = tmp_path / "restarted.py"
    script.write_text(RESTARTED)
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LMJAX_HUGEPAGE_MALLOC", "LD_PRELOAD", "MALLOC_CONF")}
    for jemalloc, expected, malloc in (("", f"['a=1'] {host_memory.find_jemalloc()} True False",
                                        f"jemalloc (MALLOC_CONF={host_memory.JEMALLOC_CONF})"),
                                       ("off", "['a=1'] None False True", "glibc (GLIBC_TUNABLES=glibc.malloc.hugetlb=1)")):
        result = subprocess.run([sys.executable, str(script), "a=1"], env=dict(env, LMJAX_JEMALLOC=jemalloc),
                                capture_output=True, text=True, timeout=120, check=True)
        assert result.stdout.splitlines() == [expected, malloc], result.stderr  # as `lmjax bench` records it


def test_cpu_xla_defaults_choose_eigen_without_avx512_and_wide_vectors_with_it(monkeypatch):
    """The CLI's matmul backend and vector width by CPU (experiments/bench/README.md, sixth and
    seventh rounds); a flag the user set wins, and LMJAX_XLA_CPU_DEFAULTS=off keeps XLA's own."""
    monkeypatch.delenv("LMJAX_XLA_CPU_DEFAULTS", raising=False)
    for avx512, flags in ((False, "--foo --xla_cpu_experimental_ynn_fusion_type="),
                          (True, "--foo --xla_cpu_prefer_vector_width=512 --xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED")):
        monkeypatch.setattr(cpu_peak, "cpu_has_avx512", lambda: avx512)
        monkeypatch.setenv("XLA_FLAGS", "--foo")
        cli.set_cpu_xla_defaults()
        assert os.environ["XLA_FLAGS"] == flags
    monkeypatch.setattr(cpu_peak, "cpu_has_avx512", lambda: False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
    cli.set_cpu_xla_defaults()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot"
    monkeypatch.setattr(cpu_peak, "cpu_has_avx512", lambda: True)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_prefer_vector_width=256")
    cli.set_cpu_xla_defaults()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_prefer_vector_width=256 --xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED"
    monkeypatch.setenv("LMJAX_XLA_CPU_DEFAULTS", "off")
    monkeypatch.setenv("XLA_FLAGS", "--foo")
    cli.set_cpu_xla_defaults()
    assert os.environ["XLA_FLAGS"] == "--foo"


def test_cpu_devices_splits_the_cores_into_that_many_devices(tmp_path, tiny_overrides):
    """`mesh.cpu_devices` is applied before JAX starts (here over the 8 devices XLA_FLAGS asks for), the
    mesh spans those devices, and the run is the same data-parallel computation: the losses of the
    first steps equal an in-process run's over this process's 8 devices."""
    from lmjax.evaluate import evaluate_run
    from lmjax.train.loop import train

    overrides = [*tiny_overrides, "train.steps=2", "train.checkpoint_every=2"]
    subprocess.run([sys.executable, "-m", "lmjax.cli", "train", "configs/dense_tiny.yaml", *overrides,
                    "mesh.cpu_devices=2", f"run_dir={tmp_path / 'two'}"], check=True, capture_output=True, text=True)
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["devices"] == 2
    reference = train(load_config("configs/dense_tiny.yaml", [*overrides, f"run_dir={tmp_path / 'eight'}"]))
    assert reference["devices"] == 8
    records = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()] for run in ("two", "eight")]
    losses = [[r["loss"] for r in run if "loss" in r] for run in records]  # the train records, steps 1 and 2
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], rel=1e-5)
    # `lmjax eval` of the run makes its mesh again, over 2 devices (its checkpointer must not start JAX first).
    evaluated = subprocess.run([sys.executable, "-m", "lmjax.cli", "eval", str(tmp_path / "two"), "--batches", "1"],
                               check=True, capture_output=True, text=True)
    eval_loss = json.loads(evaluated.stdout.strip().splitlines()[-1])["eval_loss"]
    assert eval_loss == pytest.approx(evaluate_run(tmp_path / "eight", batches=1)["eval_loss"], rel=1e-5)


def test_cpu_devices_cannot_change_a_started_backend():
    """In a process whose CPU backend has started (8 devices here), the same count passes and another
    is one clear error, not a mesh over other devices than the config asked for."""
    from lmjax.config import ConfigError
    from lmjax.sharding import use_cpu_devices

    use_cpu_devices(load_config("configs/dense_tiny.yaml", ["mesh.cpu_devices=8"]))
    with pytest.raises(ConfigError, match=r"mesh.cpu_devices=2, but JAX's CPU backend already started with 8 devices"):
        use_cpu_devices(load_config("configs/dense_tiny.yaml", ["mesh.cpu_devices=2"]))


def test_dispatch_turns_inline_only_under_jemalloc(monkeypatch):
    import jax

    before = jax.config.values["jax_cpu_enable_async_dispatch"]
    try:
        monkeypatch.setattr(host_memory, "jemalloc_in_use", lambda: False)
        cli.dispatch_inline_under_jemalloc()
        assert jax.config.values["jax_cpu_enable_async_dispatch"] == before
        monkeypatch.setattr(host_memory, "jemalloc_in_use", lambda: True)
        cli.dispatch_inline_under_jemalloc()
        assert jax.config.values["jax_cpu_enable_async_dispatch"] is False
    finally:
        jax.config.update("jax_cpu_enable_async_dispatch", before)
