"""Runs that differ only by seed: one point of the fit, at their mean or median (lmjax.scaling.runs)."""

import json
import math

import numpy as np
import pytest
from test_scaling_fit import isoflop_runs, write_csv  # tests/ is on sys.path (pytest's default import mode)

from lmjax.scaling.runs import FitInputError, load_run_table


def test_seeds_are_averaged_before_the_best_lr_is_kept(tmp_path):
    # Two settings at one budget and size: lr 1e-3 is better on average, lr 3e-3 wins one seed.
    rows = [[1e6, 2e7, loss, 1e14, lr, seed, f"N1e6_lr{lr}_s{seed}"]
            for lr, losses in ((1e-3, (3.00, 3.10)), (3e-3, (2.98, 3.30))) for seed, loss in enumerate(losses)]
    rows += [[2e6, 1e7, 3.2, 1e14, 1e-3, 0, "N2e6"]]
    source = write_csv(tmp_path / "runs.csv", rows, ["params", "tokens", "loss", "budget", "lr", "seed", "name"])
    table = load_run_table(source)
    assert table.n_lr_dropped == 1 and len(table.completed) == 5
    (averaged,) = [r for r in table.runs if r.params == 1e6]
    assert averaged.lr == 1e-3 and averaged.loss == pytest.approx(3.05) and averaged.seed_losses == (3.00, 3.10)
    assert averaged.name == "N1e6_lr0.001"
    assert averaged.seed_spread == pytest.approx(np.std([3.00, 3.10], ddof=1))
    assert averaged.loss_stderr == pytest.approx(np.std([3.00, 3.10], ddof=1) / math.sqrt(2))
    (single,) = [r for r in table.runs if r.params == 2e6]
    assert single.seed_losses == () and single.seed_spread is None


def test_the_median_of_seeds_ignores_one_stalled_seed(tmp_path):
    # Three seeds of one setting, one stalled 0.3 high: the mean moves by 0.1, the median not at all;
    # of two seeds the median is their mean, with the mean's standard error.
    rows = [[1e6, 2e7, loss, 1e14, 1e-3, seed, f"N1e6_s{seed}"] for seed, loss in enumerate((3.00, 3.30, 3.02))]
    columns = ["params", "tokens", "loss", "budget", "lr", "seed", "name"]
    source = write_csv(tmp_path / "runs.csv", rows, columns)
    (mean,) = load_run_table(source).runs
    (median,) = load_run_table(source, seed_aggregate="median").runs
    assert mean.loss == pytest.approx(9.32 / 3) and median.loss == pytest.approx(3.02)
    assert median.seed_losses == mean.seed_losses == (3.00, 3.30, 3.02)
    std = np.std([3.00, 3.30, 3.02], ddof=1)
    assert mean.loss_stderr == pytest.approx(std / math.sqrt(3))
    assert median.loss_stderr == pytest.approx(std / math.sqrt(3) * math.sqrt(math.pi / 2))
    (two,) = load_run_table(write_csv(tmp_path / "two.csv", rows[:2], columns), seed_aggregate="median").runs
    assert two.loss == pytest.approx(3.15) and two.loss_stderr == pytest.approx(np.std([3.0, 3.3], ddof=1) / math.sqrt(2))
    with pytest.raises(FitInputError, match="seed aggregate 'best': expected one of mean, median"):
        load_run_table(source, seed_aggregate="best")


def test_fit_by_the_seeds_median_equals_the_fit_without_the_stalled_seeds(tmp_path):
    # Every setting three times: two seeds at the clean loss, one 0.3 nats high (a stalled run). The
    # median of each setting is its clean loss, so the fit and the held-out prediction by the median
    # must equal those of the clean single-seed table; the mean keeps a third of the stall.
    from lmjax.cli import main

    runs = isoflop_runs()
    columns = ["params", "tokens", "loss", "budget", "name", "seed"]
    clean = write_csv(tmp_path / "clean.csv", [[r.params, r.tokens, r.loss, r.budget, r.name, 0] for r in runs], columns)
    seeded = write_csv(tmp_path / "seeded.csv", [[r.params, r.tokens, r.loss + 0.3 * (seed == i % 3), r.budget,
                                                  f"{r.name}_s{seed}", seed]
                                                 for i, r in enumerate(runs) for seed in range(3)], columns)
    for name, source, aggregate in (("clean", clean, "mean"), ("median", seeded, "median")):
        assert main(["fit", str(source), "--out", str(tmp_path / name), "--bootstrap", "5", "--holdout-largest",
                     "--seed-aggregate", aggregate]) == 0
    fit = {name: json.loads((tmp_path / name / "fit.json").read_text()) for name in ("clean", "median")}
    prediction = {name: json.loads((tmp_path / name / "prediction.json").read_text()) for name in fit}
    assert "seed_aggregate" not in fit["clean"] and "seed_aggregate" not in prediction["clean"]
    assert fit["median"].pop("seed_aggregate") == "median"
    for key, estimate in fit["clean"]["approach3"].items():
        assert fit["median"]["approach3"][key] == pytest.approx(estimate, rel=1e-6), key
    assert fit["median"]["isoflop"]["a"] == pytest.approx(fit["clean"]["isoflop"]["a"], rel=1e-6)
    assert prediction["median"]["seed_aggregate"] == "median"
    for key in ("predicted_loss", "measured_loss", "minima_law_loss"):
        assert prediction["median"][key] == pytest.approx(prediction["clean"][key], rel=1e-6)
    by_mean = load_run_table(seeded).runs  # each setting 0.1 high: the mean keeps a third of the stall
    assert sorted(r.loss for r in by_mean) == pytest.approx(sorted(r.loss + 0.1 for r in runs), rel=1e-9)
