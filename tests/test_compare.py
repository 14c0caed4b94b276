"""`lmjax compare`: the compute multiplier between two synthetic sweeps of known laws, plain-run curves,
bad inputs, and the closed-form frontier against a brute-force minimisation."""

import csv
import json
import math

import numpy as np
import pytest

from lmjax import cli
from lmjax.scaling.compare import compute_reaching, frontier_loss, tokens_per_param
from lmjax.scaling.fit import ScalingLaw

# Sweep A's law; sweep B is A evaluated at (c N, c D): B at compute C matches A at c^2 C, so B reaches
# A's frontier loss with exactly c^2 times less compute at any C.
LAW_A = ScalingLaw(E=1.7, A=400.0, B=1500.0, alpha=0.34, beta=0.28)
C_FACTOR = 1.5
LAW_B = ScalingLaw(E=LAW_A.E, A=LAW_A.A * C_FACTOR**-LAW_A.alpha, B=LAW_A.B * C_FACTOR**-LAW_A.beta,
                   alpha=LAW_A.alpha, beta=LAW_A.beta)
TRUE_MULTIPLIER = C_FACTOR**2
BUDGETS = (1e18, 1e19, 1e20, 1e21)  # C = 6ND


def isoflop_grid(law: ScalingLaw, seed: int, noise: float = 1e-3) -> list[dict]:
    """4 budgets x 5 sizes centred on the law's own optimum, multiplicative noise from a fixed seed."""
    rng = np.random.default_rng(seed)
    rows = []
    for budget in BUDGETS:
        n_opt, _ = law.compute_optimal(budget)
        for n in n_opt * np.geomspace(1 / 4, 4, 5):
            d = budget / (6 * n)
            loss = float(law.loss(n, d)) * math.exp(rng.normal(0, noise))
            rows.append({"name": f"C{budget:.0e}_N{n:.4g}", "params": n, "tokens": d, "loss": loss,
                         "flops": 6 * n * d, "budget": budget})
    return rows


def write_csv(path, rows):
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_sweep_dir(path, rows):
    """A sweep directory as `lmjax sweep` leaves it: plan.json and runs/<name>/summary.json."""
    plan = {"runs": [{"name": r["name"], "budget": r["budget"]} for r in rows]}
    (path / "runs").mkdir(parents=True)
    (path / "plan.json").write_text(json.dumps(plan))
    for r in rows:
        (path / "runs" / r["name"]).mkdir()
        (path / "runs" / r["name"] / "summary.json").write_text(json.dumps({
            "status": "completed", "final_eval_loss": r["loss"], "params_total": r["params"],
            "params_non_embedding": r["params"], "params_output_head": 0, "tokens": r["tokens"],
            "train_flops": r["flops"]}))
    return path


def write_run_dir(path, params, steps, tokens_per_step, final_loss, flops_per_token):
    """A finished plain run: summary.json and metrics.jsonl (train records every 5 steps, eval every 10)."""
    path.mkdir(parents=True)
    lines = []
    for step in range(5, steps + 1, 5):
        lines.append({"step": step, "loss": final_loss + 3.0 / step, "tokens": step * tokens_per_step})
        if step % 10 == 0:
            lines.append({"step": step, "eval_loss": final_loss + 2.0 / step})
    lines.append({"step": steps, "loss": "nan"})  # a non-finite value is logged as a string
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 9')  # cut short
    (path / "summary.json").write_text(json.dumps({
        "status": "completed", "steps": steps, "final_train_loss": final_loss + 0.1,
        "final_eval_loss": final_loss + 2.0 / steps, "params_total": params, "params_non_embedding": params // 2,
        "params_output_head": 0, "tokens": steps * tokens_per_step, "flops_per_token": flops_per_token,
        "train_flops": flops_per_token * steps * tokens_per_step}))
    return path


def test_frontier_closed_form_matches_brute_force():
    law = {k: np.float64(getattr(LAW_A, k)) for k in ("E", "A", "B", "alpha", "beta")}
    n_line = np.geomspace(1e5, 1e13, 400001)
    for C in (1e17, 1e20, 1e23):
        brute = LAW_A.loss(n_line, C / (6 * n_line)).min()
        assert float(frontier_loss(law, C)) == pytest.approx(brute, rel=1e-9)
        assert float(compute_reaching(law, brute)) == pytest.approx(C, rel=1e-5)
        n_opt = n_line[np.argmin(LAW_A.loss(n_line, C / (6 * n_line)))]
        assert float(tokens_per_param(law, C)) == pytest.approx(C / (6 * n_opt**2), rel=1e-3)
    assert np.isinf(compute_reaching(law, LAW_A.E)) and np.isinf(compute_reaching(law, LAW_A.E - 0.1))
    # The true multiplier of the test's construction, from the laws alone.
    law_b = {k: np.float64(getattr(LAW_B, k)) for k in ("E", "A", "B", "alpha", "beta")}
    for C in (1e19, 1e21):
        assert C / float(compute_reaching(law_b, frontier_loss(law, C))) == pytest.approx(TRUE_MULTIPLIER, rel=1e-9)


def test_compare_recovers_known_compute_multiplier(tmp_path, capsys):
    source_a = write_csv(tmp_path / "a.csv", isoflop_grid(LAW_A, seed=1))
    source_b = write_sweep_dir(tmp_path / "sweep_b", isoflop_grid(LAW_B, seed=2))
    out = tmp_path / "cmp"
    assert cli.main(["compare", f"A={source_a}", str(source_b), "--out", str(out), "--bootstrap", "50"]) == 0

    result = json.loads((out / "compare.json").read_text())
    assert result["compute_convention"] == "6ND"
    assert [s["label"] for s in result["sources"]] == ["A", "sweep_b"]
    assert [s["read_as"] for s in result["sources"]] == ["CSV", "sweep directory"]
    assert result["reference_compute"] == pytest.approx(1e21)  # A's largest budget; flops = 6ND here
    (m,) = result["multipliers"]
    assert (m["reference"], m["other"], m["reachable"]) == ("A", "sweep_b", True)
    x = m["multiplier"]
    print(f"multiplier {x['value']:.4f} [{x['ci_low']:.4f}, {x['ci_high']:.4f}], truth {TRUE_MULTIPLIER}")
    assert x["ci_low"] <= TRUE_MULTIPLIER <= x["ci_high"]
    assert x["value"] == pytest.approx(TRUE_MULTIPLIER, rel=0.05)
    assert x["ci_high"] / x["ci_low"] < 2  # an interval that says something
    assert m["target_loss"]["value"] == pytest.approx(float(frontier_loss(
        {k: getattr(LAW_A, k) for k in ("E", "A", "B", "alpha", "beta")}, 1e21)), rel=2e-3)
    for s in result["sources"]:
        assert s["fit"]["approach3"]["alpha"]["value"] == pytest.approx(LAW_A.alpha, abs=0.1)

    report = (out / "report.md").read_text()
    assert f"{x['value']:.3g}x less compute" in report and "sweep_b reaches A's frontier loss" in report
    assert "![loss_vs_compute](loss_vs_compute.png)" in report and "![isoflop](isoflop.png)" in report
    assert sorted(p.name for p in out.iterdir()) == ["compare.json", "isoflop.png", "loss_vs_compute.png", "report.md"]
    assert "less compute" in capsys.readouterr().out

    # --at moves the reference; the construction's multiplier is the same at every compute.
    assert cli.main(["compare", f"A={source_a}", str(source_b), "--out", str(out), "--bootstrap", "0",
                     "--at", "3e20"]) == 0  # a previous compare output: overwritten
    again = json.loads((out / "compare.json").read_text())
    assert again["reference_compute"] == 3e20 and again["reference_compute_from"] == "--at"
    assert again["multipliers"][0]["multiplier"]["value"] == pytest.approx(TRUE_MULTIPLIER, rel=0.05)
    assert again["multipliers"][0]["multiplier"]["ci_low"] is None


def test_compare_plain_runs_draws_loss_curves(tmp_path):
    run_a = write_run_dir(tmp_path / "small", params=1000, steps=40, tokens_per_step=256, final_loss=4.0,
                          flops_per_token=9000.0)
    run_b = write_run_dir(tmp_path / "big", params=4000, steps=20, tokens_per_step=512, final_loss=3.5,
                          flops_per_token=30000.0)
    out = tmp_path / "new" / "cmp"
    assert cli.main(["compare", str(run_a), str(run_b), "--out", str(out)]) == 0
    assert {"loss_vs_tokens.png", "loss_vs_flops.png"} <= {p.name for p in out.iterdir()}
    assert not (out / "isoflop.png").exists()
    result = json.loads((out / "compare.json").read_text())
    assert result["multipliers"] == [] and result["reference_compute"] is None
    small = result["sources"][0]
    assert (small["kind"], small["tokens"], small["final_eval_loss"]) == ("run", 40 * 256, 4.0 + 2.0 / 40)
    assert small["train_flops"] == 9000.0 * 40 * 256
    assert small["compute_6nd"] == 6 * 1000 * 40 * 256
    assert "| small |" in (out / "report.md").read_text()


def test_compare_bad_inputs_exit_2_and_write_nothing(tmp_path, capsys):
    csv_path = write_csv(tmp_path / "a.csv", isoflop_grid(LAW_A, seed=1))
    neither = tmp_path / "neither"
    neither.mkdir()
    (neither / "notes.txt").write_text("not a run")
    foreign = tmp_path / "fit_out"
    foreign.mkdir()
    (foreign / "report.md").write_text("a fit's report")
    cases = (
        [str(tmp_path / "missing"), str(csv_path)],
        [str(csv_path), str(neither)],
        [f"same={csv_path}", f"same={csv_path}"],
        [str(csv_path), "--at", "-1"],
    )
    for sources in cases:
        out = tmp_path / "out"
        assert cli.main(["compare", *sources, "--out", str(out), "--bootstrap", "0"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: "), err
        assert not out.exists()
    assert cli.main(["compare", str(csv_path), "--out", str(foreign), "--bootstrap", "0"]) == 2
    assert "not written by lmjax compare" in capsys.readouterr().err
    assert sorted(p.name for p in foreign.iterdir()) == ["report.md"]
    assert (foreign / "report.md").read_text() == "a fit's report"
