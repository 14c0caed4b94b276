"""Test setup: 8 fake CPU devices for mesh tests, a persistent compilation cache, no wandb.

The environment must be set before jax is imported anywhere, so it happens at import time here.
"""

import os
import pathlib

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Eigen's matmuls and XLA's default 256-bit vectors on every CPU (the `lmjax` command picks XLA's
# default YNNPACK and 512-bit vectors where the CPU has AVX-512, `set_cpu_xla_defaults`): the
# recorded reference curve (tests/data/dense_tiny_curve.json) was computed with them, and `lmjax`
# subprocesses inherit XLA_FLAGS, so in-process runs and commands keep matching bit for bit
# whatever the CPU.
os.environ["XLA_FLAGS"] += " --xla_cpu_experimental_ynn_fusion_type= --xla_cpu_prefer_vector_width=256"

import jax  # noqa: E402

_CACHE = pathlib.Path(os.environ.get("LMJAX_TEST_CACHE", pathlib.Path.home() / ".cache" / "lmjax" / "jax_test_cache"))
_CACHE.mkdir(parents=True, exist_ok=True)
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory) -> pathlib.Path:
    """One tokenizer/packed-data cache for the whole session (built once, reused by every test)."""
    return tmp_path_factory.mktemp("lmjax_data_cache")


@pytest.fixture(scope="session")
def tiny_overrides(data_cache) -> list[str]:
    """A tiny LLaMA-style run on a slice of the built-in corpus: seconds per run on 2 CPU cores.

    Sizes divide over data=2 x fsdp=2 x tensor=2 so the same overrides serve the mesh tests.
    """
    return [
        "model.vocab_size=512",
        "model.d_model=64",
        "model.n_layers=2",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        "model.d_ff=128",
        "data.seq_len=32",
        "data.global_batch_size=16",
        "data.max_documents=60",
        "data.val_fraction=0.1",
        f"data.cache_dir={data_cache}",
        "optim.warmup_steps=2",
        "train.steps=6",
        "train.log_every=1",
        "train.eval_every=0",
        "train.eval_batches=1",
        "train.checkpoint_every=3",
        "logging.wandb=off",
        "logging.progress=false",
    ]


@pytest.fixture(scope="session")
def check_host_independent_and_resumable():
    """A check for any task's data: the global batches of 1 host equal 2 hosts' slices side by side,
    and an iterator restored from a saved state gives the same next batches. Returns that state."""
    import numpy as np

    def check(data, batches: int = 3) -> dict:
        one = data.train_iterator(0, 1)
        halves = [data.train_iterator(h, 2) for h in range(2)]
        for _ in range(batches):
            batch, parts = next(one), [next(it) for it in halves]
            for key in batch:
                np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), batch[key])
        state = one.get_state()
        expected = [next(one) for _ in range(2)]
        resumed = data.train_iterator(0, 1)
        resumed.set_state(state)
        for batch in expected:
            got = next(resumed)
            for key in batch:
                np.testing.assert_array_equal(got[key], batch[key])
        for it in (one, resumed, *halves):
            it.close()
        return state

    return check
