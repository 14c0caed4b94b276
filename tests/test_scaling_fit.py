"""Scaling-law fits: recovery of a known law, input validation, run-directory loading, fit.json contract."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

from lmjax.scaling import fit as fitlib
from lmjax.scaling.report import run_fit
from lmjax.scaling.runs import FitInputError, RunRecord, load_run_table

# Chinchilla's Approach 3 law (Hoffmann et al. 2022, eq. 10).
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28
A_TRUE, B_TRUE = BETA / (ALPHA + BETA), ALPHA / (ALPHA + BETA)
BUDGETS = (1e18, 1e19, 1e20, 1e21)


def chinchilla_loss(n, d):
    return E + A / n**ALPHA + B / d**BETA


def brute_force_n_opt(budget, flops_per_param_token=6.0):
    n_line = np.geomspace(1e6, 1e11, 40001)
    return n_line[np.argmin(chinchilla_loss(n_line, budget / (flops_per_param_token * n_line)))]


def isoflop_runs(noise=0.002, seed=0, width=4.0):
    """7 sizes per budget centred on 20 tokens/parameter (off-centre: the true optimum is ~50)."""
    rng = np.random.default_rng(seed)
    runs = []
    for budget in BUDGETS:
        for n in math.sqrt(budget / 120) * np.geomspace(1 / width, width, 7):
            d = budget / (6 * n)
            loss = chinchilla_loss(n, d) * math.exp(rng.normal(0, noise))
            runs.append(RunRecord(f"C{budget:.0e}_N{n:.3g}", n, d, loss, budget=budget))
    return runs


def write_csv(path, rows, columns):
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)
    return path


# ----------------------------------------------------------------------------- the fits


def test_huber_objective_matches_reference_and_finite_differences():
    from scipy.special import huber, logsumexp

    rng = np.random.default_rng(1)
    log_n, log_d = np.log(rng.uniform(1e7, 1e9, 9)), np.log(rng.uniform(1e9, 1e11, 9))
    log_loss = np.log(chinchilla_loss(np.exp(log_n), np.exp(log_d))) + rng.normal(0, 2e-3, 9)
    theta = np.array([6.1, 5.9, 0.5, 0.33, 0.29])
    terms = np.stack([theta[0] - theta[3] * log_n, theta[1] - theta[4] * log_d, np.full(9, theta[2])])
    reference = huber(1e-3, logsumexp(terms, axis=0) - log_loss).sum()
    value, grad = fitlib.huber_objective(theta[None], log_n[None], log_d[None], log_loss[None])
    assert value[0] == pytest.approx(reference, rel=1e-12)
    step = 1e-7
    for i in range(5):
        shift = np.eye(5)[i] * step
        up, _ = fitlib.huber_objective((theta + shift)[None], log_n[None], log_d[None], log_loss[None])
        down, _ = fitlib.huber_objective((theta - shift)[None], log_n[None], log_d[None], log_loss[None])
        assert grad[0, i] == pytest.approx((up[0] - down[0]) / (2 * step), rel=1e-5, abs=1e-12)


def test_approach3_recovers_chinchilla_law():
    n, d = (m.ravel() for m in np.meshgrid(np.geomspace(1e7, 3e9, 6), np.geomspace(1e8, 1e12, 6)))
    loss = chinchilla_loss(n, d) * np.exp(np.random.default_rng(0).normal(0, 1e-3, n.size))
    law = fitlib.fit_approach3(n, d, loss).law
    # With 0.1% noise on 36 runs, seeds 0-2 land within 0.2% (E), 2.5% (A, B), 0.0015 (alpha, beta,
    # a); the tolerances are ~4x that. A and B are loose because they trade off against alpha, beta.
    assert law.E == pytest.approx(E, rel=0.01)
    assert law.A == pytest.approx(A, rel=0.10)
    assert law.B == pytest.approx(B, rel=0.10)
    assert law.alpha == pytest.approx(ALPHA, abs=0.01)
    assert law.beta == pytest.approx(BETA, abs=0.01)
    assert law.a == pytest.approx(A_TRUE, abs=0.01)
    assert law.b == pytest.approx(B_TRUE, abs=0.01)
    # Compute-optimal allocation by brute force along the iso-FLOP curve of the true law.
    assert law.compute_optimal(1e21)[0] == pytest.approx(brute_force_n_opt(1e21), rel=0.15)


def test_a_law_with_a_negative_exponent_has_no_compute_optimum():
    # alpha < 0: the loss grows with N, so no (N, D) split is optimal; (-0.1 * A) ** (1 / 0.2) in floats
    # would be complex and was cast to a real number with a ComplexWarning.
    import warnings

    law = fitlib.ScalingLaw(E=1.0, A=400.0, B=400.0, alpha=-0.1, beta=0.3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert math.isnan(law.G) and math.isnan(law.tokens_per_param(1e20))
        assert all(math.isnan(x) for x in law.compute_optimal(1e20))
    healthy = fitlib.ScalingLaw(E=1.0, A=400.0, B=400.0, alpha=0.3, beta=0.3)
    n_opt, d_opt = healthy.compute_optimal(6e20)  # alpha = beta, A = B: N_opt = D_opt = sqrt(C / 6)
    assert n_opt == pytest.approx(1e10) and d_opt == pytest.approx(1e10)


def test_approach2_recovers_exponents_from_off_centre_grids():
    fit = fitlib.fit_approach2(isoflop_runs())
    # Looser than Approach 3's 0.01: a parabola only approximates the asymmetric IsoFLOP profile, the
    # grids are off-centre by ~2.5x, and the exponent is a line through only 4 noisy minima.
    assert fit.a == pytest.approx(A_TRUE, abs=0.02)
    assert fit.b == pytest.approx(B_TRUE, abs=0.02)
    for budget in fit.budgets:
        assert budget.N_opt == pytest.approx(brute_force_n_opt(budget.C), rel=0.15)
        assert budget.D_opt == pytest.approx(budget.C / (6 * budget.N_opt), rel=1e-12)  # no FLOP counts: k = 6
        assert budget.warning is None


def test_isoflop_uses_run_flops_and_flags_edge_minima():
    runs = []
    # Grids relative to the optimum: centred; lowest loss at the top edge (the parabola's minimum just
    # inside it); far below the optimum (the minimum extrapolated past the largest size).
    for budget, relative_sizes in ((1e18, np.geomspace(0.5, 2, 4)), (1e19, np.geomspace(0.125, 1.1, 4)),
                                   (1e20, np.geomspace(1 / 60, 1 / 15, 4))):
        for n in brute_force_n_opt(budget, 6.6) * relative_sizes:
            d = budget / (6.6 * n)
            runs.append(RunRecord("r", n, d, chinchilla_loss(n, d), flops=6.6 * n * d, budget=budget))
    centred, edge, outside = fitlib.fit_approach2(runs).budgets
    assert centred.D_opt == pytest.approx(1e18 / (6.6 * centred.N_opt), rel=1e-9)
    assert centred.warning is None
    assert "edge" in edge.warning
    assert "outside" in outside.warning


def test_isoflop_minima_law_recovers_a_known_frontier_and_predicts_a_new_budget():
    """Each budget's profile is an exact parabola in log N whose minimum loss is 7 C^-0.05 (chosen
    here, not a Chinchilla law): the parabolas' minima and the power law through them come back
    exactly, and so does the loss at a budget outside the fit."""
    a_min, gamma = 7.0, 0.05
    runs = []
    for budget in BUDGETS:
        log_n_opt = math.log(1e6) + 0.5 * math.log(budget / 1e18)  # off the grids' centres
        for n in np.geomspace(2e5, 2e8, 5) * math.sqrt(budget / 1e18):
            loss = a_min * budget**-gamma + 0.08 * (math.log(n) - log_n_opt) ** 2
            runs.append(RunRecord("r", n, budget / (6 * n), loss, budget=budget))
    result = fitlib.fit_scaling_laws(runs, bootstrap=50)
    for budget in result.approach2.budgets:
        assert budget.loss_min == pytest.approx(a_min * budget.C**-gamma, rel=1e-9)
    law = result.to_json()["isoflop"]["minima_law"]
    assert law["compute"] == "counted"
    assert law["A"]["value"] == pytest.approx(a_min, rel=1e-6)
    assert law["gamma"]["value"] == pytest.approx(gamma, rel=1e-6)
    held_out = result.minima_loss(1e22)
    assert held_out["value"] == pytest.approx(a_min * 1e22**-gamma, rel=1e-6)
    # Exact data: every resample with a minimum at >= 2 budgets gives the same law.
    assert held_out["ci_low"] == pytest.approx(held_out["value"], rel=1e-6)
    assert held_out["ci_high"] == pytest.approx(held_out["value"], rel=1e-6)


def test_bootstrap_is_deterministic_and_covers_truth():
    fit = fitlib.fit_approach2(isoflop_runs())
    first = fitlib.bootstrap_approach2(fit, 100, np.random.default_rng(3))
    again = fitlib.bootstrap_approach2(fit, 100, np.random.default_rng(3))
    np.testing.assert_array_equal(first["a"], again["a"])
    low, high = np.nanpercentile(first["a"], [2.5, 97.5])
    assert low < A_TRUE < high and high - low < 0.1
    np.testing.assert_array_equal(first["minima_gamma"], again["minima_gamma"])
    # The law's loss at the largest budget, from each resample, brackets the full-data fit's.
    log_c = math.log(max(BUDGETS))
    low, high = np.nanpercentile(np.exp(first["minima_log_a"] - first["minima_gamma"] * log_c), [2.5, 97.5])
    assert low < fit.minima_loss(max(BUDGETS)) < high


def test_bootstrap_survives_degenerate_resamples():
    # Real runs (the three smaller budgets of experiments/chinchilla_cpu) on which one resample's
    # optimum has log A ~ 300: exp(A) overflowed and used to crash the fit. Such a sample must
    # drop out of A's interval while its exponents count, and every finite sample must agree with
    # ScalingLaw's own formulas.
    runs = load_run_table(Path(__file__).parent / "data" / "chinchilla_cpu_three_budgets.csv").runs
    result = fitlib.fit_scaling_laws(runs, bootstrap=200)
    samples = result.approach3_samples
    assert (~np.isfinite(samples["A"])).sum() >= 1 and np.isfinite(samples["a"]).all()
    finite = np.flatnonzero(np.isfinite(samples["A"]) & np.isfinite(samples["B"]))
    for i in finite[:20]:
        law = fitlib.ScalingLaw(*(samples[k][i] for k in ("E", "A", "B", "alpha", "beta")))
        assert samples["tokens_per_param"][i] == pytest.approx(law.tokens_per_param(result.largest_budget_6nd), rel=1e-6)
        assert samples["a"][i] == pytest.approx(law.a)
    estimate = result.to_json()["approach3"]["A"]
    assert np.isfinite(estimate["ci_high"]) and estimate["ci_low"] <= estimate["value"] <= estimate["ci_high"]


# ----------------------------------------------------------------------------- bad input


def test_csv_missing_columns(tmp_path):
    path = write_csv(tmp_path / "runs.csv", [[1e8, 3.0]], ["params", "loss"])
    with pytest.raises(FitInputError, match="missing column.*tokens"):
        load_run_table(path)


@pytest.mark.parametrize("bad, message", [("-5", "row 2.*column 'tokens'.*positive"),
                                          ("abc", "row 2.*column 'tokens'.*not a number")])
def test_csv_bad_values(tmp_path, bad, message):
    path = write_csv(tmp_path / "runs.csv", [[1e8, 1e9, 3.0], [2e8, bad, 2.9]], ["params", "tokens", "loss"])
    with pytest.raises(FitInputError, match=message):
        load_run_table(path)


def test_missing_file(tmp_path):
    with pytest.raises(FitInputError, match="no such file"):
        load_run_table(tmp_path / "nope.csv")


def test_too_few_runs_names_both_approaches():
    runs = [RunRecord(f"r{i}", 1e8 * (i + 1), 1e9, 3.0 - 0.1 * i, budget=1e18) for i in range(5)]
    with pytest.raises(FitInputError, match="Approach 3.*>= 6 runs.*Approach 2.*>= 2 budgets"):
        fitlib.fit_scaling_laws(runs, bootstrap=0)


def test_approach2_skipped_without_budgets_while_approach3_remains_fittable(tmp_path):
    n, d = (m.ravel() for m in np.meshgrid(np.geomspace(1e7, 1e9, 3), np.geomspace(1e9, 1e11, 3)))
    runs = [RunRecord("r", a, b, chinchilla_loss(a, b)) for a, b in zip(n, d)]  # 9 distinct computes
    reason = fitlib.fit_approach2(runs)
    assert isinstance(reason, str) and "Approach 2 needs >= 3 sizes" in reason
    # Approach 2 skipped, the whole fit still fits Approach 3 on the same runs: noise-free, a 3 x 3
    # grid of 9 runs pins down its 5 parameters, so the true law comes back to rounding error.
    result = fitlib.fit_scaling_laws(runs, bootstrap=20)
    assert result.approach2 == reason
    law = result.approach3.law
    for fitted, true in ((law.E, E), (law.A, A), (law.B, B), (law.alpha, ALPHA), (law.beta, BETA)):
        assert fitted == pytest.approx(true, rel=1e-6)
    assert law.a == pytest.approx(A_TRUE, rel=1e-6) and law.b == pytest.approx(B_TRUE, rel=1e-6)
    assert law.compute_optimal(1e21)[0] == pytest.approx(brute_force_n_opt(1e21), rel=1e-3)
    # ... and so does fit.json and the report, with Approach 2 marked as skipped.
    rows = [[r.params, r.tokens, r.loss] for r in runs]
    fit = run_fit(write_csv(tmp_path / "runs.csv", rows, ["params", "tokens", "loss"]), bootstrap=20)
    assert fit["isoflop"] == {"skipped": reason}
    assert fit["approach3"]["alpha"]["value"] == pytest.approx(ALPHA, rel=1e-6)
    low, high = fit["approach3"]["a"]["ci_low"], fit["approach3"]["a"]["ci_high"]
    assert low <= A_TRUE * (1 + 1e-9) and high >= A_TRUE * (1 - 1e-9)  # the interval holds the truth (to rounding)
    report = (tmp_path / "report.md").read_text()
    assert f"Approach 2 was not fitted: {reason}." in report and "Approach 3 was not fitted" not in report


# ----------------------------------------------------------------------------- run directories


def write_run(run_dir, loss, params, tokens, status="completed", tied=True, **extra):
    run_dir.mkdir(parents=True)
    summary = {"status": status, "final_eval_loss": loss, "params_total": params, "params_active": params,
               "params_non_embedding": params - 1000, "params_output_head": 0 if tied else 500,
               "tokens": tokens, "train_flops": 6.2 * params * tokens, **extra}
    (run_dir / "summary.json").write_text(json.dumps(summary))
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": {"vocab_size": 10, "d_model": 20}}))


def test_sweep_directory_selects_best_lr_and_skips_unfinished(tmp_path):
    plan = []
    for budget in (1e15, 1e16):
        for size in (1e5, 2e5, 4e5):
            for lr in (1e-3, 3e-3):
                name = f"C{budget:.0e}_N{size:.0e}_lr{lr:g}"
                plan.append({"name": name, "budget": budget, "params": size, "lr": lr})
                loss = 3.0 - 0.1 * math.log10(size) + (0.05 if lr == 3e-3 else 0.0)
                if name == "C1e+16_N4e+05_lr0.001":
                    write_run(tmp_path / "runs" / name, loss, size, budget / (6 * size), status="failed")
                elif name != "C1e+16_N2e+05_lr0.003":  # planned but never started
                    write_run(tmp_path / "runs" / name, loss, size, budget / (6 * size))
    (tmp_path / "plan.json").write_text(json.dumps({"runs": plan}))
    table = load_run_table(tmp_path)
    by_name = {r.name: r for r in table.runs}
    # Of 12 planned runs: 1 failed, 1 missing; the 10 left hold 6 (budget, size) settings, and at 4
    # of them both LRs finished, so 4 worse-LR runs are dropped. The failed lr=1e-3 run leaves the
    # lr=3e-3 run as the only (hence kept) one at (1e16, 4e5).
    assert sorted(table.skipped) == ["C1e+16_N2e+05_lr0.003", "C1e+16_N4e+05_lr0.001"]
    assert table.n_lr_dropped == 4
    assert len(table.runs) == 6
    assert "C1e+16_N4e+05_lr0.003" in by_name
    assert all(r.lr == 1e-3 for name, r in by_name.items() if name != "C1e+16_N4e+05_lr0.003")
    assert by_name["C1e+15_N1e+05_lr0.001"].budget == 1e15
    assert by_name["C1e+15_N1e+05_lr0.001"].flops == pytest.approx(6.2 * 1e5 * 1e15 / 6e5)
    assert table.default_out_dir == tmp_path


def test_run_dirs_param_conventions(tmp_path):
    write_run(tmp_path / "tied", 3.0, 5000, 1e6, budget=1e12)
    write_run(tmp_path / "untied", 2.9, 5500, 1e6, tied=False, budget=1e12)
    dirs = [tmp_path / "tied", tmp_path / "untied"]
    counts = {convention: [r.params for r in load_run_table(dirs, convention).runs]
              for convention in ("total", "non_embedding", "non_embedding_with_head", "active")}
    assert counts["total"] == counts["active"] == [5000, 5500]  # dense: a token uses every parameter
    assert counts["non_embedding"] == [4000, 4500]
    # Tied: the head is the token table, vocab x d_model = 200 from config.yaml. Untied: flops.py
    # already counts the head inside non_embedding.
    assert counts["non_embedding_with_head"] == [4200, 4500]
    assert load_run_table(tmp_path / "tied").runs[0].budget == 1e12
    with pytest.raises(FitInputError, match="param_convention"):
        load_run_table(dirs, "embedding")
    # An untied run never needs its config.yaml; a tied one does, for the head's size.
    (tmp_path / "untied" / "config.yaml").unlink()
    assert load_run_table(tmp_path / "untied", "non_embedding_with_head").runs[0].params == 4500
    (tmp_path / "tied" / "config.yaml").unlink()
    with pytest.raises(FitInputError, match="tied-embedding run needs model.vocab_size"):
        load_run_table(tmp_path / "tied", "non_embedding_with_head")
    # A summary from before params_active: every convention but active still works.
    write_run(tmp_path / "old", 3.0, 5000, 1e6)
    summary = json.loads((tmp_path / "old" / "summary.json").read_text())
    del summary["params_active"]
    (tmp_path / "old" / "summary.json").write_text(json.dumps(summary))
    assert load_run_table(tmp_path / "old", "non_embedding_with_head").runs[0].params == 4200
    with pytest.raises(FitInputError, match=r"old/summary.json: param_convention 'active' needs params_active"):
        load_run_table(tmp_path / "old", "active")


# ----------------------------------------------------------------------------- run_fit and fit.json


def test_run_fit_writes_contracted_files(tmp_path):
    rows = [[r.params, r.tokens, r.loss, r.budget, r.name] for r in isoflop_runs()]
    source = write_csv(tmp_path / "runs.csv", rows, ["params", "tokens", "loss", "budget", "name"])
    fit = run_fit(source, bootstrap=10)

    estimate = {"value", "ci_low", "ci_high"}
    assert json.loads((tmp_path / "fit.json").read_text()) == fit
    assert set(fit) == {"param_convention", "compute_convention", "n_runs", "approach3", "isoflop"}
    assert fit["param_convention"] == "total" and fit["n_runs"] == 28 and fit["compute_convention"] == "6ND"
    assert set(fit["approach3"]) == {"E", "A", "B", "alpha", "beta", "a", "b", "tokens_per_param"}
    assert all(set(v) == estimate for v in fit["approach3"].values())
    assert set(fit["isoflop"]) == {"budgets", "a", "b", "a_counted", "b_counted", "minima_law"}
    assert all(set(fit["isoflop"][key]) == estimate for key in ("a", "b", "a_counted", "b_counted"))
    minima_law = fit["isoflop"]["minima_law"]
    assert minima_law["compute"] == "counted" and set(minima_law["A"]) == set(minima_law["gamma"]) == estimate
    assert [b["C"] for b in fit["isoflop"]["budgets"]] == list(BUDGETS)
    for budget in fit["isoflop"]["budgets"]:
        assert set(budget) == {"C", "C_6ND", "N_opt", "D_opt", "loss_min", "n_runs", "warning"}
        assert set(budget["N_opt"]) == estimate and set(budget["D_opt"]) == estimate and budget["n_runs"] == 7
        assert budget["N_opt"]["ci_low"] <= budget["N_opt"]["value"] <= budget["N_opt"]["ci_high"]
    for name in ("isoflop.png", "loss_vs_compute.png", "optimal_scaling.png", "contours.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "report.md").read_text()
    assert "Approach 2" in report and "Approach 3" in report and "total" in report

    # predict: C = 6 N D, and no other split of the same compute has a lower fitted loss.
    budget = 3e21
    prediction = fitlib.predict(fit, budget)
    assert 6 * prediction["N_opt"] * prediction["D_opt"] == pytest.approx(budget)
    law = fitlib.ScalingLaw(**{k: fit["approach3"][k]["value"] for k in ("E", "A", "B", "alpha", "beta")})
    for factor in (0.8, 1.25):
        n = prediction["N_opt"] * factor
        assert law.loss(n, budget / (6 * n)) > prediction["loss"]


def test_holdout_largest_without_budgets_is_one_line_error(tmp_path, capsys):
    from lmjax.cli import main

    rows = [[r.params, r.tokens, r.loss] for r in isoflop_runs()]
    source = write_csv(tmp_path / "runs.csv", rows, ["params", "tokens", "loss"])
    assert main(["fit", str(source), "--bootstrap", "0", "--holdout-largest"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("error: --holdout-largest: expected runs with a budget at >= 3 budgets"), error
    assert not (tmp_path / "prediction.json").exists()


def test_budgets_are_grouped_by_a_log_tolerance_not_by_rounding():
    """Hand-made computes: 1.04e15 and 1.06e15 round to different digits but are one budget;
    planned budgets keep their exact value; 3x apart are two budgets."""
    def run(compute=None, budget=None, params=1e6):
        return RunRecord(name="r", params=params, tokens=compute / (6 * params) if compute else 1e6, loss=3.0,
                         flops=compute, budget=budget)

    groups = fitlib.group_by_budget([run(1.04e15), run(1.06e15), run(0.99e15), run(3.1e15), run(2.95e15)])
    assert len(groups) == 2
    (low, low_runs), (high, high_runs) = groups.items()
    assert len(low_runs) == 3 and len(high_runs) == 2
    assert low == pytest.approx(math.exp(np.mean(np.log([0.99e15, 1.04e15, 1.06e15]))), rel=1e-12)
    assert high == pytest.approx(math.sqrt(3.1e15 * 2.95e15), rel=1e-12)
    planned = fitlib.group_by_budget([run(budget=1e17, params=p) for p in (1e6, 2e6, 4e6)] + [run(budget=1e18)])
    assert list(planned) == [1e17, 1e18] and [len(g) for g in planned.values()] == [3, 1]
    # Beyond the tolerance (10%): separate groups, even when rounding would merge them.
    assert len(fitlib.group_by_budget([run(1.00e15), run(1.14e15)])) == 2


# ----------------------------------------------------------------------------- units, seeds and eval noise


def counted_isoflop_runs(noise=0.0):
    """IsoFLOP grids whose budgets are counted FLOPs k(N) N D, with k falling from ~12 to ~6.3 as N
    grows (attention and logits weigh more in small models): the law's optimum is in C = 6ND."""
    rng = np.random.default_rng(0)
    runs = []
    for budget in BUDGETS:
        for n in brute_force_n_opt(budget / 1.5) * np.geomspace(0.4, 2.5, 7):
            k = 6.0 * (1.0 + (2e8 / n) ** 0.5)
            d = budget / (k * n)
            loss = chinchilla_loss(n, d) * math.exp(rng.normal(0, noise))
            runs.append(RunRecord(f"C{budget:.0e}_N{n:.3g}", n, d, loss, flops=k * n * d, budget=budget))
    return runs


def test_approach2_states_exponents_against_6nd():
    runs = counted_isoflop_runs()
    fit = fitlib.fit_approach2(runs)
    # By hand: each budget's optimum along its counted iso-FLOP curve by brute force, then the
    # exponent of N_opt against that optimum's 6 N D and against the counted budget.
    n_line = np.geomspace(1e6, 1e11, 40001)
    k_line = 6.0 * (1.0 + (2e8 / n_line) ** 0.5)
    n_opt = np.array([n_line[np.argmin(chinchilla_loss(n_line, C / (k_line * n_line)))] for C in BUDGETS])
    d_opt = np.array([C / (6.0 * (1.0 + (2e8 / n) ** 0.5) * n) for C, n in zip(BUDGETS, n_opt)])
    a_6nd = np.polyfit(np.log(6 * n_opt * d_opt), np.log(n_opt), 1)[0]
    a_counted = np.polyfit(np.log(BUDGETS), np.log(n_opt), 1)[0]
    assert a_counted - a_6nd > 0.03  # the units matter at this scale
    assert fit.a == pytest.approx(a_6nd, abs=0.01)
    assert fit.a_counted == pytest.approx(a_counted, abs=0.01)
    assert fit.b == pytest.approx(np.polyfit(np.log(6 * n_opt * d_opt), np.log(d_opt), 1)[0], abs=0.01)
    for budget, n in zip(fit.budgets, n_opt):
        assert budget.C_6nd == pytest.approx(6.0 * budget.N_opt * budget.D_opt)
        assert budget.N_opt == pytest.approx(n, rel=0.05)


def test_eval_loss_stderr_is_the_batch_clustered_error():
    from lmjax.evaluate import ratio_stderr

    # Equal tokens per batch: the standard error of the batch means.
    means, tokens = np.array([2.0, 2.5, 3.0, 2.1]), np.full(4, 100.0)
    assert ratio_stderr(means * tokens, tokens) == pytest.approx(np.std(means, ddof=1) / 2)
    # Unequal tokens: by hand, mean = 11/5 = 2.2, residuals 4 - 2.2*1 = 1.8 and 7 - 2.2*4 = -1.8,
    # sqrt(2 / 1 * (1.8^2 + 1.8^2)) / 5 = 3.6 / 5.
    assert ratio_stderr(np.array([4.0, 7.0]), np.array([1.0, 4.0])) == pytest.approx(0.72)
