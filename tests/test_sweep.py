"""Sweep planning (FLOPs, whole batches, schedule horizon, shapes), resume, failures, plan changes, holdout."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from lmjax.config import ConfigError, ModelConfig, MoEConfig, load_config
from lmjax.scaling import plan as planlib
from lmjax.scaling.fit import ScalingLaw
from lmjax.scaling.report import run_fit
from lmjax.scaling.sweep import (
    Executor, InProcessExecutor, LocalExecutor, SweepError, sweep_command, write_plan,
)
from lmjax.train.optim import make_schedule

DENSE_TINY = Path(__file__).resolve().parents[1] / "configs" / "dense_tiny.yaml"


def write_sweep(path: Path, sweep: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def reference_flops_per_token(shape: dict, vocab: int, seq: int) -> float:
    """Chinchilla appendix F, written out here: 3 x forward FLOPs of a sequence / seq (SwiGLU: 3 matrices)."""
    d, layers, heads, ff = shape["d_model"], shape["n_layers"], shape["n_heads"], shape["d_ff"]
    head = shape["head_dim"] or d // heads
    kv_heads = shape["n_kv_heads"] or heads
    q, kv = heads * head, kv_heads * head
    attention = 2 * seq * d * (q + 2 * kv) + 2 * seq * seq * q + 3 * heads * seq * seq + 2 * seq * seq * q + 2 * seq * q * d
    forward = 2 * seq * vocab * d + layers * (attention + 2 * seq * 3 * d * ff) + 2 * seq * d * vocab
    return 3 * forward / seq


def reference_llama_params(d: int, layers: int, heads: int, kv_heads: int, ff: int, vocab: int) -> int:
    """Tied-embedding LLaMA-style decoder: table, per layer attention + SwiGLU + 2 RMSNorm scales, final norm."""
    head = d // heads
    return vocab * d + layers * (2 * d * heads * head + 2 * d * kv_heads * head + 3 * d * ff + 2 * d) + d


# ----------------------------------------------------------------------------- planning


@pytest.fixture(scope="module")
def planned(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plan")
    sweep_file = write_sweep(folder / "sweep.yaml", {
        "sweep_dir": str(folder / "sweep"),
        "base": str(DENSE_TINY),
        "budgets": [1.0e12, 1.0e13, 1.0e14],
        "sizes": [{"params": 1.0e6}, {"params": 3.0e6},
                  {"d_model": 128, "n_layers": 2, "n_heads": 4, "d_ff": 384},  # keeps the base's 2 kv heads
                  {"params": 3.0e7}],  # too large for 1e12: a few steps only, must be dropped
        "lr_grid": [1.0e-3, 3.0e-3],
    })
    sweep, base_dir = planlib.load_sweep(sweep_file)
    plan = planlib.plan_sweep(sweep, base_dir)
    write_plan(plan)
    return plan, json.loads((folder / "sweep" / "plan.json").read_text())


def test_every_run_spends_its_budget_in_whole_batches(planned):
    plan, saved = planned
    base = yaml.safe_load(DENSE_TINY.read_text())
    vocab, seq, batch = base["model"]["vocab_size"], base["data"]["seq_len"], base["data"]["global_batch_size"]
    assert len(saved["runs"]) == len(plan.runs) >= 2 * 3 * 3 - 2
    for entry in saved["runs"]:
        assert entry["tokens"] == entry["steps"] * batch * seq  # whole batches
        flops = entry["tokens"] * reference_flops_per_token(entry["shape"], vocab, seq)
        assert abs(flops / entry["budget"] - 1) <= 0.01, entry["name"]
        config = load_config(DENSE_TINY, [*entry["overrides"]])
        assert config.train.steps == entry["steps"] and config.optim.lr == entry["lr"]
        assert config.run_dir == str(Path(saved["sweep_dir"]) / "runs" / entry["name"])
        assert entry["warmup_steps"] == min(100, round(0.05 * entry["steps"]))
    # The explicit shape keeps the base's grouped-query attention; the lr grid doubles every size.
    explicit = [e for e in saved["runs"] if (e["shape"]["d_model"], e["shape"]["n_layers"], e["shape"]["d_ff"]) == (128, 2, 384)]
    assert len(explicit) == 6 and {e["shape"]["n_kv_heads"] for e in explicit} == {2}
    assert {(e["budget"], e["lr"]) for e in saved["runs"]} == {(c, lr) for c in (1e12, 1e13, 1e14) for lr in (1e-3, 3e-3)}


def test_too_large_size_for_a_budget_is_dropped_with_a_warning(planned):
    plan, saved = planned
    largest = max(e["params_total"] for e in saved["runs"])
    assert largest > 2.5e7
    assert not [e for e in saved["runs"] if e["budget"] == 1e12 and e["params_total"] == largest]
    assert any("dropped C=1e12" in w and "sizes[3]" in w for w in plan.warnings)


def test_schedule_decays_to_ten_percent_over_exactly_the_run(planned):
    plan, _ = planned
    for run in plan.runs[:4]:
        cfg, steps, warmup, peak = run.config, run.steps, run.warmup_steps, run.lr
        schedule = make_schedule(cfg)
        assert cfg.optim.schedule == "cosine" and cfg.optim.warmup_steps == warmup
        # schedule(i - 1) is the lr of update i (optax passes the count of updates done so far).
        np.testing.assert_allclose(float(schedule(steps - 1)), 0.1 * peak, rtol=1e-5)  # the horizon is the run
        assert float(schedule(steps - 2)) > 0.1 * peak * (1 + 1e-4)  # ... and not shorter
        t = (warmup + steps) // 2
        cosine = 0.1 * peak + 0.9 * peak * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (steps - warmup)))
        np.testing.assert_allclose(float(schedule(t - 1)), cosine, rtol=1e-5)


@pytest.mark.parametrize("vocab", [1024, 2048])
def test_target_params_give_a_shape_within_tolerance(vocab):
    """Within 5% (the default param_tolerance) from 5e6 parameters; within 10% from 1e6, where one
    width step (a 32-wide head) of a few-layer model moves the count by more than 5%."""
    rules = planlib.ShapeRules()  # aspect 32 (x/÷ 2), head_dim 32, SwiGLU d_ff = 8/3 d to a multiple of 64
    base = ModelConfig(vocab_size=vocab, n_kv_heads=2)
    for target in np.geomspace(1e6, 3e8, 16):
        model = planlib.shape_for_params(float(target), base, rules, "total")
        d, layers, heads = model.d_model, model.n_layers, model.n_heads
        count = reference_llama_params(d, layers, heads, model.kv_heads, model.d_ff, vocab)
        assert abs(count / target - 1) <= (0.05 if target >= 5e6 else 0.1), (target, model)
        assert 16 <= d / layers <= 64 and d == 32 * heads and model.kv_heads == heads
        assert model.d_ff % 64 == 0 and abs(model.d_ff - 8 / 3 * d) <= 32


def test_param_conventions_count_the_head_as_documented():
    tied = ModelConfig(vocab_size=1000, d_model=64, n_layers=2, n_heads=2, d_ff=128)
    untied = ModelConfig(vocab_size=1000, d_model=64, n_layers=2, n_heads=2, d_ff=128, tie_embeddings=False)
    body = reference_llama_params(64, 2, 2, 2, 128, 0)
    assert planlib.count_params(tied, "total") == body + 64_000
    assert planlib.count_params(tied, "non_embedding") == body
    assert planlib.count_params(tied, "non_embedding_with_head") == body + 64_000
    assert planlib.count_params(untied, "total") == body + 128_000
    assert planlib.count_params(untied, "non_embedding_with_head") == body + 64_000
    assert planlib.count_params(tied, "active") == body + 64_000
    # MoE, 4 experts of width 32, top-2, in both layers: a token uses the router [64, 4] and two
    # experts, i.e. a SwiGLU of width 64; the model holds all four (width 128).
    moe = ModelConfig(family="moe", vocab_size=1000, d_model=64, n_layers=2, n_heads=2, d_ff=128,
                      moe=MoEConfig(n_experts=4, top_k=2, d_ff_expert=32))
    router = 2 * 64 * 4
    assert planlib.count_params(moe, "active") == reference_llama_params(64, 2, 2, 2, 64, 1000) + router
    assert planlib.count_params(moe, "total") == reference_llama_params(64, 2, 2, 2, 128, 1000) + router


@pytest.mark.parametrize("change, message", [
    ({"budgts": [1e12]}, "did you mean 'budgets'"),
    ({"sizes": [{"params": 1e6, "d_model": 64}]}, "either params or explicit model keys"),
    ({"sizes": [{"d_modle": 64}]}, "sizes[0].d_modle"),
    ({"sizes": {"1e12": [{"params": 1e6}]}}, "no sizes for budget(s) 1e13"),
    ({"param_convention": "embedding"}, "expected one of total"),
    ({"budgets": [1e12, 1e13], "predict": {"holdout_largest": True}}, "needs >= 3 budgets"),
])
def test_bad_sweep_configs_name_the_key(tmp_path, change, message):
    sweep = {"sweep_dir": str(tmp_path / "s"), "base": str(DENSE_TINY), "budgets": [1e12, 1e13],
             "sizes": [{"params": 1e6}], **change}
    with pytest.raises(ConfigError) as err:
        planlib.plan_sweep(*planlib.load_sweep(write_sweep(tmp_path / "s.yaml", sweep)))
    assert message in str(err.value)


def test_a_changed_plan_is_refused_and_plan_only_writes_nothing(tmp_path, capsys):
    sweep_file = write_sweep(tmp_path / "s.yaml", {
        "sweep_dir": str(tmp_path / "s"), "base": str(DENSE_TINY), "budgets": [1e12, 1e13],
        "sizes": [{"params": 1e6}, {"params": 2e6}],
    })
    assert sweep_command(str(sweep_file), [], plan_only=True) == 0
    assert not (tmp_path / "s").exists()
    assert "C1e12_N" in capsys.readouterr().out
    first = planlib.plan_sweep(*planlib.load_sweep(sweep_file))
    write_plan(first)
    write_plan(first)  # the same plan again: accepted
    changed = planlib.plan_sweep(*planlib.load_sweep(sweep_file, ["budgets=[1e12, 2e13]"]))
    with pytest.raises(SweepError, match=r"different plan \(budgets\[1\]: "):
        write_plan(changed)
    with pytest.raises(SweepError, match="different plan"):
        sweep_command(str(sweep_file), ["base_overrides.optim.weight_decay=0.0"], plan_only=False)


# ----------------------------------------------------------------------------- running: resume and failures


@pytest.fixture(scope="module")
def tiny_sweep(data_cache):
    """2 budgets x 3 tiny explicit shapes, 13 to 66 steps each (flops tolerance widened for so few steps)."""
    def make(folder: Path, **extra) -> Path:
        return write_sweep(folder / "sweep.yaml", {
            "sweep_dir": str(folder / "sweep"),
            "base": {
                "model": {"vocab_size": 512, "n_kv_heads": None},
                "data": {"seq_len": 32, "global_batch_size": 16, "max_documents": 60, "val_fraction": 0.1,
                         "cache_dir": str(data_cache)},
                "train": {"log_every": 5, "eval_every": 0, "eval_batches": 1, "checkpoint_every": 8},
                "logging": {"wandb": "off", "progress": False},
            },
            "budgets": [4.0e9, 8.0e9],
            "sizes": [{"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64},
                      {"d_model": 48, "n_layers": 1, "n_heads": 2, "d_ff": 96},
                      {"d_model": 64, "n_layers": 2, "n_heads": 2, "d_ff": 128}],
            "schedule": {"min_steps": 8, "flops_tolerance": 0.05},
            "fit": {"bootstrap": 0},
            **extra,
        })
    return make


def final_losses(sweep_dir: Path) -> dict[str, float]:
    return {p.parent.name: json.loads(p.read_text())["final_eval_loss"] for p in sorted(sweep_dir.glob("runs/*/summary.json"))}


class KilledAfter(InProcessExecutor):
    """Finishes `finished` runs, leaves the next one as a kill after a mid-run checkpoint would, stops."""

    def __init__(self, finished: int):
        super().__init__(devices=jax.devices()[:1])
        self.finished = finished

    def execute(self, runs):
        assert not super().execute(runs[: self.finished + 1])
        partial = runs[self.finished].run_dir
        (partial / "summary.json").unlink()
        steps = sorted(int(p.name) for p in (partial / "checkpoints").iterdir() if p.name.isdigit())
        assert len(steps) >= 2, steps
        for step in steps[1:]:  # the resumed run must start from its first checkpoint
            shutil.rmtree(partial / "checkpoints" / str(step))
        raise KeyboardInterrupt


class Spy(InProcessExecutor):
    def __init__(self):
        super().__init__(devices=jax.devices()[:1])
        self.given: list[str] = []

    def execute(self, runs):
        self.given += [run.name for run in runs]
        return super().execute(runs)


@pytest.mark.slow  # minutes of runs: in .ci/run's second pass, out of the README's 15-minute suite
def test_interrupted_sweep_resumes_to_the_same_results_without_retraining(tmp_path, tiny_sweep, capsys):
    whole = tiny_sweep(tmp_path / "whole")
    assert sweep_command(str(whole), [], plan_only=False, executor=InProcessExecutor(jax.devices()[:1])) == 0
    expected = final_losses(tmp_path / "whole" / "sweep")
    assert len(expected) == 6

    interrupted = tiny_sweep(tmp_path / "interrupted")
    sweep_dir = tmp_path / "interrupted" / "sweep"
    assert sweep_command(str(interrupted), [], plan_only=False, executor=KilledAfter(1)) == 130
    done = {name: (sweep_dir / "runs" / name / "summary.json").stat().st_mtime_ns for name in final_losses(sweep_dir)}
    assert len(done) == 1
    spy = Spy()
    assert sweep_command(str(interrupted), [], plan_only=False, executor=spy) == 0
    assert sorted(spy.given) == sorted(set(expected) - set(done))  # the half-finished run included
    for name, mtime in done.items():
        assert (sweep_dir / "runs" / name / "summary.json").stat().st_mtime_ns == mtime  # not retrained
    assert final_losses(sweep_dir) == expected  # bit for bit, the resumed half-finished run included
    fits = [json.loads((tmp_path / d / "sweep" / "fit.json").read_text()) for d in ("whole", "interrupted")]
    assert fits[0]["n_runs"] == 6 and fits[0] == fits[1]
    # runs.csv holds the fitted runs: refitting from it alone gives the same fit.
    refit = run_fit(sweep_dir / "runs.csv", out_dir=tmp_path / "refit", seed=0, bootstrap=0)
    assert refit["approach3"]["a"]["value"] == pytest.approx(fits[1]["approach3"]["a"]["value"], rel=1e-9)
    assert refit["n_runs"] == 6
    assert "1 of 6 runs already finished" in capsys.readouterr().out


def test_a_failing_run_does_not_stop_the_others(tmp_path, tiny_sweep, capsys):
    # lr 1e30 diverges to a non-finite loss within a few steps; the subprocess exits non-zero.
    sweep_file = tiny_sweep(tmp_path, budgets=[4.0e9], sizes=[{"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64}],
                            lr_grid=[1.0e30, 3.0e-3])
    assert sweep_command(str(sweep_file), [], plan_only=False, executor=LocalExecutor()) == 1
    runs = tmp_path / "sweep" / "runs"
    failed, good = sorted(runs.iterdir(), key=lambda p: "lr1e30" not in p.name)
    assert "lr1e30" in failed.name and not (failed / "summary.json").exists()
    assert json.loads((good / "summary.json").read_text())["status"] == "completed"
    err = capsys.readouterr().err
    assert f"failed: {failed.name}: exit code 1" in err and "non-finite loss" in err


# ----------------------------------------------------------------------------- held-out prediction


# Chinchilla's fitted law (Hoffmann et al. 2022, eq. 10) stands in for training in the prediction test.
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28


class LawExecutor(Executor):
    """Writes each run's summary.json with the loss of a known L(N, D) instead of training."""

    def execute(self, runs):
        for run in runs:
            from lmjax import flops

            counts = flops.param_counts(run.config.model)
            loss = E + A / counts["total"] ** ALPHA + B / run.tokens ** BETA
            summary = {"status": "completed", "final_eval_loss": loss, "params_total": counts["total"],
                       "params_non_embedding": counts["non_embedding"], "params_output_head": counts["output_head"],
                       "tokens": run.tokens, "train_flops": run.flops}
            (run.run_dir / "summary.json").write_text(json.dumps(summary))
        return {}


def test_holdout_prediction_recovers_the_largest_budget(tmp_path):
    sweep_file = write_sweep(tmp_path / "s.yaml", {
        "sweep_dir": str(tmp_path / "s"), "base": str(DENSE_TINY), "budgets": [1e16, 1e17, 1e18],
        "sizes": [{"params": p} for p in (1e7, 2e7, 4e7, 8e7, 1.6e8)],
        "predict": {"holdout_largest": True}, "fit": {"bootstrap": 0},
    })
    assert sweep_command(str(sweep_file), [], plan_only=False, executor=LawExecutor()) == 0
    prediction = json.loads((tmp_path / "s" / "prediction.json").read_text())
    plan = json.loads((tmp_path / "s" / "plan.json").read_text())
    held = [e for e in plan["runs"] if e["budget"] == 1e18]
    losses = {e["name"]: E + A / e["params_total"] ** ALPHA + B / e["tokens"] ** BETA for e in held}
    best = min(losses, key=losses.get)
    assert prediction["measured_run"] == best and prediction["measured_loss"] == pytest.approx(losses[best])
    assert prediction["C"] == 1e18
    # Fitted on the two smaller budgets only (the largest is held out), the noise-free law comes back.
    holdout = list(csv_rows(tmp_path / "s" / "holdout" / "runs.csv"))
    assert len(holdout) == 10 and all(float(r["budget"]) < 1e18 for r in holdout)
    assert prediction["predicted_loss_at_measured_run"] == pytest.approx(losses[best], rel=2e-3)
    # The optimum of the law at this compute is at most the best grid point, and close to it.
    assert -0.01 < prediction["relative_error"] <= 1e-3
    # The prediction again, from the files alone: the law of holdout/fit.json, minimised by brute
    # force along C = 6ND at the held-out budget in 6ND units (C x 6 / k, k the FLOPs per
    # parameter-token of the measured run's summary), against the measured run's own summary.
    fit = json.loads((tmp_path / "s" / "holdout" / "fit.json").read_text())
    assert fit["n_runs"] == 10 and Path(prediction["fit"]) == tmp_path / "s" / "holdout" / "fit.json"
    law = ScalingLaw(**{k: fit["approach3"][k]["value"] for k in ("E", "A", "B", "alpha", "beta")})
    summary = json.loads((tmp_path / "s" / "runs" / best / "summary.json").read_text())
    k = summary["train_flops"] / (summary["params_total"] * summary["tokens"])
    c_6nd = 1e18 * 6 / k
    n_line = np.geomspace(prediction["predicted_N"] / 10, prediction["predicted_N"] * 10, 200001)
    line_loss = law.loss(n_line, c_6nd / (6 * n_line))
    n_opt, loss_opt = n_line[line_loss.argmin()], line_loss.min()
    assert prediction["C_6ND"] == pytest.approx(c_6nd, rel=1e-9)
    assert prediction["predicted_N"] == pytest.approx(n_opt, rel=1e-3)
    assert prediction["predicted_D"] == pytest.approx(c_6nd / (6 * n_opt), rel=1e-3)
    assert prediction["predicted_loss"] == pytest.approx(loss_opt, rel=1e-9)
    assert prediction["measured_loss"] == summary["final_eval_loss"]
    assert (prediction["measured_N"], prediction["measured_D"]) == (summary["params_total"], summary["tokens"])
    assert prediction["predicted_loss_at_measured_run"] == pytest.approx(
        law.loss(summary["params_total"], summary["tokens"]), rel=1e-12)
    assert prediction["relative_error"] == pytest.approx(
        (loss_opt - summary["final_eval_loss"]) / summary["final_eval_loss"], rel=1e-6, abs=1e-9)
    # The IsoFLOP minima law, again from the files: a line through the smaller budgets' parabola
    # minima (holdout/fit.json) in log loss against log C, read at the held-out budget.
    minima = [(b["C"], b["loss_min"]) for b in fit["isoflop"]["budgets"]]
    slope, intercept = np.polyfit(np.log([c for c, _ in minima]), np.log([m for _, m in minima]), 1)
    minima_law_loss = math.exp(intercept + slope * math.log(1e18))
    assert prediction["minima_law_loss"] == pytest.approx(minima_law_loss, rel=1e-9)
    assert prediction["minima_law_relative_error"] == pytest.approx(
        (minima_law_loss - summary["final_eval_loss"]) / summary["final_eval_loss"], rel=1e-6, abs=1e-9)
    assert prediction["minima_law_ci_low"] is None  # no bootstrap here
    # The same check from the sweep's table alone: `lmjax fit runs.csv --holdout-largest`.
    from lmjax.cli import main

    assert main(["fit", str(tmp_path / "s" / "runs.csv"), "--out", str(tmp_path / "refit"), "--bootstrap", "0",
                 "--holdout-largest"]) == 0
    again = json.loads((tmp_path / "refit" / "prediction.json").read_text())
    assert again.pop("fit") == str(tmp_path / "refit" / "holdout" / "fit.json")
    assert again == {k: v for k, v in prediction.items() if k != "fit"}


def csv_rows(path: Path):
    import csv

    with path.open() as handle:
        yield from csv.DictReader(handle)


def reference_encoder_flops_per_token(d: int, layers: int, heads: int, ff: int, vocab: int, seq: int) -> float:
    """Appendix F for a BERT-style encoder, written out here: the decoder's terms (GELU MLP: 2
    matrices, attention over all T x T scores) plus the MLM head's D x D transform."""
    attention = 2 * seq * d * 3 * d + 2 * seq * seq * d + 3 * heads * seq * seq + 2 * seq * seq * d + 2 * seq * d * d
    forward = 2 * seq * vocab * d + layers * (attention + 2 * seq * 2 * d * ff) + 2 * seq * d * d + 2 * seq * d * vocab
    return 3 * forward / seq


@pytest.mark.slow  # minutes of runs: in .ci/run's second pass, out of the README's 15-minute suite
def test_sweep_over_encoder_sizes_plans_counts_runs_and_fits(tmp_path, tiny_sweep, capsys):
    sweep_file = tiny_sweep(tmp_path)
    sweep = yaml.safe_load(sweep_file.read_text())
    sweep["base"] = str(DENSE_TINY.parent / "bert_tiny.yaml")
    sweep["base_overrides"] = {
        "model.vocab_size": 512, "model.max_seq_len": 32, "data.seq_len": 32, "data.global_batch_size": 16,
        "data.max_documents": 60, "data.val_fraction": 0.1, "data.cache_dir": yaml.safe_load(sweep_file.read_text())["base"]["data"]["cache_dir"],
        "train.log_every": 5, "train.eval_every": 0, "train.eval_batches": 1, "train.checkpoint_every": 100,
        "logging.wandb": "off", "logging.progress": False,
    }
    write_sweep(sweep_file, sweep)
    assert sweep_command(str(sweep_file), [], plan_only=False, executor=InProcessExecutor(devices=jax.devices()[:1])) == 0
    plan = json.loads((tmp_path / "sweep" / "plan.json").read_text())
    assert len(plan["runs"]) == 6
    for entry in plan["runs"]:
        run_dir = tmp_path / "sweep" / "runs" / entry["name"]
        summary = json.loads((run_dir / "summary.json").read_text())
        model = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]
        assert summary["objective"] == "mlm" and model["family"] == "encoder"
        per_token = reference_encoder_flops_per_token(model["d_model"], model["n_layers"], model["n_heads"], model["d_ff"], 512, 32)
        assert summary["flops_per_token"] == pytest.approx(per_token, rel=1e-12)
        assert summary["train_flops"] == pytest.approx(entry["budget"], rel=0.05)
    fit = json.loads((tmp_path / "sweep" / "fit.json").read_text())
    assert fit["n_runs"] == 6
    assert "skipped" not in fit["approach3"]


@pytest.mark.parametrize("path", sorted((DENSE_TINY.parent / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_committed_sweeps_plan_within_their_budgets(path):
    """Every sweep in configs/sweeps/ plans as committed: every budget gets runs, and each run's
    counted FLOPs are its budget within the schedule's tolerance."""
    sweep, base_dir = planlib.load_sweep(path)
    plan = planlib.plan_sweep(sweep, base_dir)
    assert {run.budget for run in plan.runs} == set(sweep.budgets)
    for run in plan.runs:
        assert abs(run.flops / run.budget - 1) <= sweep.schedule.flops_tolerance, run.name
