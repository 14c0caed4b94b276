"""Config and CLI errors: one line naming the key, a non-zero exit, no traceback."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import yaml

from lmjax import cli
from lmjax.config import Config, load_config, replace


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["train.stesp=3"], "unknown config key 'train.stesp'; did you mean 'train.steps'?"),
        (["modle.d_model=3"], "unknown config key 'modle'; did you mean 'model'?"),
        (["train.steps=abc"], "train.steps: expected an integer, got 'abc'"),
        (["logging.progress=maybe"], "logging.progress: expected true or false, got 'maybe'"),
        (["model.style=bert"], "model.style: expected one of llama, gpt2, got 'bert'"),
        (["model.d_model=100", "model.n_heads=3"], "model.n_heads (3) must divide model.d_model (100)"),
        (["model.n_heads=4", "model.n_kv_heads=3"], "model.n_kv_heads (3) must divide model.n_heads (4)"),
        (["mesh.data=3"], "mesh: data=3 x fsdp=1 x tensor=1 x expert=1 = 3 devices, but 8 are available"),
        (["mesh.data=8", "data.global_batch_size=12"], "data.global_batch_size (12) / train.microbatches (1) = 12 must be divisible by the data-parallel size data*fsdp*expert = 8"),
        (["mesh.data=-1", "mesh.fsdp=-1"], "mesh: only one axis may be -1"),
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


@pytest.mark.parametrize("path", sorted(str(p) for p in pathlib.Path("configs").glob("*.yaml")))
def test_shipped_configs_load(path):
    load_config(path)
