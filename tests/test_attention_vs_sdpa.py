"""experiments/bench/attention_vs_sdpa.py: it checks lmjax's attention against PyTorch's SDPA (output and
gradients) before it times anything, and that check fails on a wrong result."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch  # noqa: F401  (the tool compares against it; the test extra, which CI installs: a missing install must fail, not skip)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "bench" / "attention_vs_sdpa.py"


def test_it_times_attention_that_matches_torch(tmp_path):
    out = tmp_path / "attention.json"
    result = subprocess.run([sys.executable, str(SCRIPT), "--batch", "2", "--seq-len", "96", "--heads", "2",
                             "--head-dim", "16", "--rounds", "2", "--out", str(out)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    jax_variants = {"lmjax_blockwise", "lmjax_blockwise_xla", "jax_dot_product_attention"}  # the first: the CPU kernel
    assert set(report["variants"]) == jax_variants | {"torch_sdpa"}
    assert all(len(v["times_ms"]) == 2 for v in report["variants"].values())
    assert report["variants"]["torch_sdpa"]["ratio_to_torch"] == 1.0
    errors = report["max_abs_difference_from_torch"]
    assert set(errors) == jax_variants and all(0 <= e < 1e-4 for e in errors.values())


def test_the_check_fails_on_a_wrong_gradient():
    spec = importlib.util.spec_from_file_location("bench_attention_vs_sdpa", SCRIPT)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    reference = [np.ones((2, 3), np.float32) for _ in range(4)]
    wrong = [a.copy() for a in reference]
    wrong[2][1, 1] += 1e-3  # dk off in one entry
    assert tool.check_against_torch({"torch_sdpa": reference, "ok": [a.copy() for a in reference]}) == {"ok": 0.0}
    with pytest.raises(SystemExit, match="wrong differs from PyTorch's SDPA by 1.00e-03"):
        tool.check_against_torch({"torch_sdpa": reference, "wrong": wrong})
