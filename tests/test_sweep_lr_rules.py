"""Sweep learning-rate rules (fixed, grid, mup), seeds and the final-eval size, against a known loss law.

`LawExecutor` stands in for training: each run's loss is a known L(N, D) plus a penalty
(log(lr / lr_best(N)))^2 around a per-size best learning rate and a per-seed offset, so what the
rules must choose, and what the fit must average, is known in advance.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from lmjax import flops
from lmjax.config import ConfigError
from lmjax.scaling import lr_rules
from lmjax.scaling import plan as planlib
from lmjax.scaling.sweep import Executor, sweep_command

DENSE_TINY = Path(__file__).resolve().parents[1] / "configs" / "dense_tiny.yaml"
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28
GRID = [1.0e-3, 3.0e-3, 1.0e-2]
SEED_OFFSET = {None: 0.0, 0: -0.01, 1: 0.01}


def best_lr(params_total: int) -> float:
    """The grid value nearest to 3e-3 x (N / 2e6)^-1, as a per-size optimum shrinking with width."""
    ideal = 3.0e-3 * (params_total / 2.0e6) ** -1.0
    return min(GRID, key=lambda lr: abs(math.log(lr / ideal)))


class LawExecutor(Executor):
    """Writes each run's summary.json from the known law instead of training; records what it was given."""

    def __init__(self):
        self.calls: list[list[str]] = []

    def execute(self, runs):
        self.calls.append([run.name for run in runs])
        for run in runs:
            counts = flops.param_counts(run.config.model)
            lr, seed = run.config.optim.lr, run.seed
            loss = (E + A / counts["total"] ** ALPHA + B / run.tokens ** BETA
                    + 0.05 * math.log(lr / best_lr(counts["total"])) ** 2 + SEED_OFFSET[seed])
            summary = {"status": "completed", "final_eval_loss": loss, "params_total": counts["total"],
                       "params_non_embedding": counts["non_embedding"], "params_output_head": counts["output_head"],
                       "tokens": run.tokens, "train_flops": run.flops}
            (run.run_dir / "summary.json").write_text(json.dumps(summary))
        return {}


def write_sweep(folder: Path, **extra) -> Path:
    sweep = {
        "sweep_dir": str(folder / "sweep"), "base": str(DENSE_TINY), "budgets": [1.0e13, 4.0e13],
        # The middle size exists only at the larger budget: its rate is interpolated.
        "sizes": {"1.0e13": [{"params": 1.0e6}, {"params": 2.0e6}, {"params": 4.0e6}],
                  "4.0e13": [{"params": 1.0e6}, {"params": 2.0e6}, {"params": 2.8e6}, {"params": 4.0e6}]},
        "lr_grid": GRID, "fit": {"bootstrap": 0}, **extra,
    }
    path = folder / "sweep.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(sweep, sort_keys=False))
    return path


def test_grid_rule_tunes_each_size_at_the_smallest_budget_then_reuses_it(tmp_path, capsys):
    sweep_file = write_sweep(tmp_path, lr_rule="grid")
    assert sweep_command(str(sweep_file), [], plan_only=True) == 0
    assert capsys.readouterr().out.count("pending") == 4  # the larger budget waits for the tuning runs
    executor = LawExecutor()
    assert sweep_command(str(sweep_file), [], plan_only=False, executor=executor) == 0
    tuning, rest = executor.calls
    assert len(tuning) == 3 * len(GRID) and all(name.startswith("C1e13_") for name in tuning)
    assert len(rest) == 4 and all(name.startswith("C4e13_") for name in rest)

    plan = json.loads((tmp_path / "sweep" / "plan.json").read_text())
    choice = {size["params_total"]: size["best_lr"] for size in plan["lr_choice"]["sizes"]}
    assert plan["lr_rule"] == "grid" and len(choice) == 3
    assert all(lr == best_lr(n) for n, lr in choice.items())
    assert len(set(choice.values())) >= 2  # the optimum moves with size: one rate for all would miss
    tuned = sorted(choice)
    for entry in (e for e in plan["runs"] if e["budget"] == 4.0e13):
        config = yaml.safe_load((Path(entry["run_dir"]) / "config.yaml").read_text())
        assert config["optim"]["lr"] == entry["lr"]
        if entry["params_total"] in choice:
            assert entry["lr_source"] == "tuned" and entry["lr"] == choice[entry["params_total"]]
        else:  # log-linear between the two tuned neighbours
            assert entry["lr_source"] == "interpolated"
            n = entry["params_total"]
            low, high = max(t for t in tuned if t < n), min(t for t in tuned if t > n)
            w = math.log(n / low) / math.log(high / low)
            assert entry["lr"] == pytest.approx(math.exp((1 - w) * math.log(choice[low]) + w * math.log(choice[high])))
    out = capsys.readouterr().out
    assert "learning rates chosen at C=1e13" in out

    # A rerun finds every run done, the plan (with its choice) the same, and fits again.
    again = LawExecutor()
    assert sweep_command(str(sweep_file), [], plan_only=False, executor=again) == 0
    assert again.calls == []
    fit = json.loads((tmp_path / "sweep" / "fit.json").read_text())
    assert fit["n_runs"] == 3 + 4  # the best rate per tuned size, and the reused ones


def test_power_law_fit_recovers_a_known_law_from_parabolic_losses():
    # Each size's loss is an exact parabola in log lr around lr* = 0.5 N^-0.4; the grid brackets every
    # vertex, so the smoothed rates are the vertices and the line through them is the law itself.
    grid = [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2]
    law = lambda n: 0.5 * n ** -0.4  # noqa: E731
    losses = {(n, 64): {lr: [3.0 + 0.2 * math.log(lr / law(n)) ** 2] for lr in grid} for n in (1e4, 3e4, 1e5, 3e5)}
    choice = lr_rules.choose("grid", 1e12, losses, fit="power_law")
    for size in choice.sizes:
        assert size.smoothed_lr == pytest.approx(law(size.params_total), rel=1e-6)
        assert size.best_lr in grid and size.best_lr != pytest.approx(size.smoothed_lr)  # the grid alone is coarser
    coefficient, exponent = choice.power_law()
    assert (coefficient, exponent) == (pytest.approx(0.5, rel=1e-6), pytest.approx(-0.4, rel=1e-6))
    assert choice.lr_for(2e5) == (pytest.approx(law(2e5), rel=1e-6), "power_law")  # any size, tuned or not
    # No minimum inside the grid (a loss falling toward the edge): the grid's best rate, not an extrapolation.
    edge = lr_rules.TunedSize(1000, 16, {lr: 4.0 - lr for lr in grid})
    assert edge.smoothed_lr == 1.6e-2


def test_power_law_rule_gives_every_larger_run_the_fitted_rate(tmp_path):
    sweep_file = write_sweep(tmp_path, lr_rule="grid", lr_fit="power_law")
    assert sweep_command(str(sweep_file), [], plan_only=False, executor=LawExecutor()) == 0
    plan = json.loads((tmp_path / "sweep" / "plan.json").read_text())
    fit = plan["lr_choice"]["fit"]
    assert plan["lr_fit"] == "power_law" and fit["kind"] == "power_law" and fit["exponent"] < 0  # smaller rate for larger N
    for entry in (e for e in plan["runs"] if e["budget"] == 4.0e13):
        assert entry["lr_source"] == "power_law"
        assert entry["lr"] == pytest.approx(fit["coefficient"] * entry["params_total"] ** fit["exponent"])
        assert yaml.safe_load((Path(entry["run_dir"]) / "config.yaml").read_text())["optim"]["lr"] == entry["lr"]
    # A per_size plan keeps the plan.json keys it always had (sweep dirs made before lr_fit still resume).
    per_size = write_sweep(tmp_path / "per_size", lr_rule="grid")
    assert sweep_command(str(per_size), [], plan_only=False, executor=LawExecutor()) == 0
    saved = json.loads((tmp_path / "per_size" / "sweep" / "plan.json").read_text())
    assert "lr_fit" not in saved and "fit" not in saved["lr_choice"]


def test_seeds_run_every_point_and_the_fit_averages_them(tmp_path):
    sweep_file = write_sweep(tmp_path, seeds=[0, 1], lr_grid=[3.0e-3])
    executor = LawExecutor()
    assert sweep_command(str(sweep_file), [], plan_only=False, executor=executor) == 0
    (names,) = executor.calls
    assert len(names) == 2 * 7 and sum(name.endswith("_s1") for name in names) == 7
    plan = json.loads((tmp_path / "sweep" / "plan.json").read_text())
    for entry in plan["runs"]:
        config = yaml.safe_load((Path(entry["run_dir"]) / "config.yaml").read_text())
        assert config["seed"] == entry["seed"] == int(entry["name"][-1])
        assert config["train"]["final_eval_tokens"] == 1_000_000  # the sweep's eval_tokens default
    fit = json.loads((tmp_path / "sweep" / "fit.json").read_text())
    assert fit["n_runs"] == 7  # one point per setting, the seeds' mean
    budget = next(b for b in fit["isoflop"]["budgets"] if b["C"] == 1.0e13)
    assert budget["n_runs"] == 3
    runs_csv = (tmp_path / "sweep" / "runs.csv").read_text().splitlines()
    assert runs_csv[0].endswith("loss_stderr,seed") and len(runs_csv) == 1 + 14  # every seed's run kept
    assert "Seeds: 7 of 7 points are the mean of 2-2 seeds" in (tmp_path / "sweep" / "report.md").read_text()


def test_mup_rule_tunes_at_the_base_width_and_transfers(tmp_path):
    sweep_file = write_sweep(tmp_path, lr_rule="mup")
    sweep, base_dir = planlib.load_sweep(sweep_file)
    plan = planlib.plan_sweep(sweep, base_dir)
    tuning = [run for run in plan.runs if run.lr_source == "grid"]
    narrowest = min(run.config.model.d_model for run in plan.runs)
    assert len(tuning) == len(GRID) and {run.config.model.d_model for run in tuning} == {narrowest}
    assert all(run.budget == 1.0e13 for run in tuning)
    assert len(plan.pending) == len(plan.runs) - len(GRID)
    for run in plan.runs:
        assert run.config.model.parameterization == "mup" and run.config.model.mup_base_width == narrowest
    executor = LawExecutor()
    assert sweep_command(str(sweep_file), [], plan_only=False, executor=executor) == 0
    saved = json.loads((tmp_path / "sweep" / "plan.json").read_text())
    (tuned,) = saved["lr_choice"]["sizes"]
    assert tuned["d_model"] == narrowest
    others = [e for e in saved["runs"] if e["lr_source"] != "grid"]
    assert {e["lr_source"] for e in others} == {"transferred"} and {e["lr"] for e in others} == {tuned["best_lr"]}


@pytest.mark.parametrize("change, message", [
    ({"lr_rule": "grid", "lr_grid": [1e-3]}, "give >= 2 learning rates"),
    ({"lr_rule": "sometimes"}, "lr_rule"),
    ({"lr_rule": "grid", "lr_fit": "spline"}, "lr_fit: expected one of per_size, power_law"),
    ({"lr_rule": "fixed", "lr_fit": "power_law"}, "lr_fit power_law fits the rates lr_rule grid tunes"),
    ({"seeds": [0, 0]}, "seeds: expected distinct"),
    ({"seeds": [0, 1], "fit": {"seed_aggregate": "best"}}, "fit.seed_aggregate: expected one of mean, median, got 'best'"),
    ({"eval_tokens": -1}, "eval_tokens"),
    ({"lr_rule": "mup", "base_overrides": {"model.mup_base_width": 100}}, "no size there has that d_model"),
])
def test_bad_lr_rules_seeds_and_eval_tokens_name_the_key(tmp_path, change, message):
    with pytest.raises(ConfigError, match=message):
        planlib.plan_sweep(*planlib.load_sweep(write_sweep(tmp_path, **change)))
