"""experiments/bench/ab_steps.py: its variants are parsed into environment and lmjax overrides, and
bad ones (and bad options) give one line before any child process starts."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("bench_ab_steps", ROOT / "experiments" / "bench" / "ab_steps.py")
ab_steps = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ab_steps)


def test_a_variant_is_its_environment_and_lmjax_overrides():
    assert ab_steps.parse_variant(["cores2", "env:JAX_NUM_CPU_DEVICES=2", "mesh.fsdp=2", "env:XLA_FLAGS=--a=b c"]) == {
        "name": "cores2", "env": {"JAX_NUM_CPU_DEVICES": "2", "XLA_FLAGS": "--a=b c"}, "overrides": ["mesh.fsdp=2"]}
    assert ab_steps.parse_variant(["peer"]) == {"name": "peer", "env": {}, "overrides": []}
    with pytest.raises(ValueError, match="expected env:VAR=VALUE, got 'env:NOVALUE'"):
        ab_steps.parse_variant(["x", "env:NOVALUE"])
    with pytest.raises(ValueError, match="got 'fast'"):
        ab_steps.parse_variant(["x", "fast"])
    with pytest.raises(ValueError, match="variant peer .* takes no lmjax overrides"):
        ab_steps.parse_variant(["peer", "model.remat=none"])


@pytest.mark.parametrize("args, expected", [
    (["--variant", "a"], "expected at least two --variant with distinct names, got ['a']"),
    (["--variant", "a", "--variant", "a"], "expected at least two --variant with distinct names, got ['a', 'a']"),
    (["--variant", "a", "--variant", "b", "model.d_model=x"], "b: model.d_model: expected an integer, got 'x'"),
    (["--variant", "a", "--variant", "b", "--rounds", "0"], "--rounds must be >= 1, got 0"),
])
def test_bad_variants_are_one_line_before_any_child_starts(args, expected):
    result = subprocess.run([sys.executable, "experiments/bench/ab_steps.py", *args], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].endswith(expected)
