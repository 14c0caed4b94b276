"""`lmjax fit`: read runs, fit both Chinchilla approaches, write fit.json, report.md and the plots."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lmjax.fileio import write_json_atomic
from lmjax.scaling.fit import FitResult, fit_scaling_laws
from lmjax.scaling.plots import PLOT_NAMES, write_plots
from lmjax.scaling.runs import RunTable, load_run_table

# Chinchilla Table 2 (Approaches 2 and 3) and Table 3 (about 20 tokens per parameter).
PUBLISHED = {"a": "0.49 / 0.46", "b": "0.51 / 0.54", "tokens_per_param": "about 20 (Table 3)"}


def run_fit(source: str | os.PathLike | list, out_dir: str | os.PathLike | None = None,
            param_convention: str = "total", seed: int = 0, bootstrap: int = 200,
            table: RunTable | None = None) -> dict:
    """Fits the runs of `source`; writes fit.json, report.md and the four PNGs; returns fit.json's dict.

    out_dir defaults to the sweep or run directory, or the CSV's folder. `table`: the source's runs
    when the caller has loaded them already (`load_run_table(source, param_convention)`).
    """
    return fit_and_report(source, out_dir, param_convention, seed, bootstrap, table)[1]


def fit_and_report(source: str | os.PathLike | list, out_dir: str | os.PathLike | None = None,
                   param_convention: str = "total", seed: int = 0, bootstrap: int = 200,
                   table: RunTable | None = None) -> tuple[FitResult, dict]:
    """`run_fit`, also returning the fit itself (its bootstrap samples give a prediction's interval)."""
    table = table if table is not None else load_run_table(source, param_convention)
    result = fit_scaling_laws(table.runs, param_convention=param_convention, seed=seed, bootstrap=bootstrap)
    out = Path(out_dir) if out_dir is not None else table.default_out_dir
    out.mkdir(parents=True, exist_ok=True)
    fit = result.to_json()
    if any(r.seed_losses for r in table.runs):
        fit["seed_aggregate"] = table.seed_aggregate
    write_json_atomic(out / "fit.json", fit, indent=2)
    write_plots(result, out)
    (out / "report.md").write_text(render_report(result, fit, table, source, bootstrap))
    return result, fit


def format_estimate(estimate: dict | None, digits: int = 3) -> str:
    """A fit.json estimate as text: '0.512 [0.49, 0.53]' (value [95% interval]), '0.512' without an
    interval, 'n/a' without a value."""
    if not estimate or estimate.get("value") is None:
        return "n/a"
    text = f"{estimate['value']:.{digits}g}"
    if estimate.get("ci_low") is not None:
        text += f" [{estimate['ci_low']:.{digits}g}, {estimate['ci_high']:.{digits}g}]"
    return text


def _approach2_tokens_per_param(result: FitResult) -> dict | None:
    """D_opt / N_opt of Approach 2 at the largest budget, with its bootstrap interval."""
    if isinstance(result.approach2, str):
        return None
    for j, budget in enumerate(result.approach2.budgets):
        if budget.C == result.largest_budget and budget.N_opt is not None:
            samples = result.approach2_samples
            ratio = samples["D_opt"][:, j] / samples["N_opt"][:, j] if samples else np.empty(0)
            ratio = ratio[np.isfinite(ratio)]
            low, high = np.percentile(ratio, [2.5, 97.5]) if ratio.size else (None, None)
            return {"value": budget.D_opt / budget.N_opt, "ci_low": low, "ci_high": high}
    return None


def _noise_lines(result: FitResult, seed_aggregate: str) -> list[str]:
    """How noisy the fitted losses are: seeds aggregated per point, and the eval's standard error."""
    lines = []
    averaged = [r for r in result.runs if r.seed_losses]
    if averaged:
        spreads = [r.seed_spread for r in averaged]
        lines.append(f"- Seeds: {len(averaged)} of {len(result.runs)} points are the {seed_aggregate} of "
                     f"{min(len(r.seed_losses) for r in averaged)}-{max(len(r.seed_losses) for r in averaged)} seeds; "
                     f"the seeds' loss std is {np.median(spreads):.4f} (median; max {max(spreads):.4f}).")
    stderrs = [r.loss_stderr for r in result.runs if r.loss_stderr is not None and not r.seed_losses]
    if stderrs:
        lines.append(f"- Eval noise: the standard error of a run's final eval loss is {np.median(stderrs):.4f} "
                     f"(median over {len(stderrs)} runs; max {max(stderrs):.4f}).")
    return lines


def render_report(result: FitResult, fit: dict, table: RunTable, source, bootstrap: int) -> str:
    approach2, approach3 = fit["isoflop"], fit["approach3"]
    lines = [
        "# Scaling-law fit", "",
        f"- Source: `{source}`. Parameter convention for N: **{result.param_convention}** (Pearce & Song 2024: "
        "the convention changes small-scale tokens per parameter severalfold; compare fits only within one).",
        f"- Runs in the fit: {len(result.runs)}; skipped (not completed or missing): {len(table.skipped)}; "
        f"dropped as a worse learning rate at the same budget and size: {table.n_lr_dropped}.",
        (f"- Confidence intervals: 2.5/97.5 percentiles of {bootstrap} bootstrap resamples of the runs "
         "(Approach 2 resamples within each budget)." if bootstrap else "- No bootstrap: no confidence intervals."),
        "- Compute: both approaches' exponents are against C = 6ND (Approach 3's allocation is derived under it; "
        "Approach 2's lines are fitted against each budget's 6 N_opt D_opt)"
        + (f"; against the budgets as counted, Approach 2 gives a = {format_estimate(approach2['a_counted'])}, "
           f"b = {format_estimate(approach2['b_counted'])}." if "a_counted" in approach2 else "."),
        *_noise_lines(result, table.seed_aggregate),
        *[f"- Skipped {name}: {reason}." for name, reason in table.skipped.items()], "",
        "## Compute-optimal scaling, N_opt ∝ C^a and D_opt ∝ C^b", "",
        "| quantity | Approach 2 (IsoFLOP) | Approach 3 (parametric) | Chinchilla A2 / A3 |",
        "|---|---|---|---|",
    ]
    comparisons = (
        ("a", approach2.get("a"), approach3.get("a"), PUBLISHED["a"]),
        ("b", approach2.get("b"), approach3.get("b"), PUBLISHED["b"]),
        (f"tokens per parameter at C = {result.largest_budget:.2g}", _approach2_tokens_per_param(result),
         approach3.get("tokens_per_param"), PUBLISHED["tokens_per_param"]),
    )
    lines += [f"| {label} | {format_estimate(isoflop)} | {format_estimate(parametric)} | {published} |"
              for label, isoflop, parametric, published in comparisons]
    for name, part in (("Approach 2", approach2), ("Approach 3", approach3)):
        if "skipped" in part:
            lines += ["", f"{name} was not fitted: {part['skipped']}."]
    if "skipped" not in approach3:
        lines += ["", "## Approach 3: L(N, D) = E + A / N^alpha + B / D^beta", "",
                  "Huber (delta 1e-3) on log loss, summed over runs, L-BFGS from 4500 grid starts "
                  "(Hoffmann et al. 2022, appendix D.2). Compute-optimal allocation under C = 6ND.", "",
                  "| E | A | B | alpha | beta |", "|---|---|---|---|---|",
                  "| " + " | ".join(format_estimate(approach3[k]) for k in ("E", "A", "B", "alpha", "beta")) + " |"]
    if "skipped" not in approach2:
        lines += ["", "## Approach 2: IsoFLOP minima", "",
                  "A parabola of loss vs log N per budget; D_opt = C / (k N_opt), k the runs' own FLOPs per "
                  "parameter-token (6 without FLOP counts).", "",
                  "| C | runs | N_opt | D_opt | loss at minimum | warning |", "|---|---|---|---|---|---|"]
        for budget in approach2["budgets"]:
            loss_min = "n/a" if budget["loss_min"] is None else f"{budget['loss_min']:.4f}"
            lines.append(f"| {budget['C']:.3g} | {budget['n_runs']} | {format_estimate(budget['N_opt'])} | "
                         f"{format_estimate(budget['D_opt'])} | {loss_min} | {budget['warning'] or ''} |")
        law = approach2["minima_law"]
        lines += ["", f"The minima as a power law in compute (as counted): loss_min = A_min C^-gamma_min with "
                      f"A_min = {format_estimate(law['A'], 4)}, gamma_min = {format_estimate(law['gamma'])}."]
    lines += ["", "## Where Approach 2 is biased", "",
              "A parabola in log N is only an approximation of the IsoFLOP profile, which is asymmetric "
              "(E + A/N^alpha + B/D^beta at fixed C). Its minimum is pulled toward the side of the grid with "
              "more or farther points, so a wide grid or one off-centre relative to the true optimum biases "
              "N_opt, and a bias that grows with C biases the exponent a. A minimum at or outside the edge "
              "of the sampled sizes is an extrapolation: extend the grid on that side. Approach 3 uses every "
              "run and does not depend on grid placement, so a disagreement between the two points to the grid."]
    if "skipped" not in approach2:
        flagged = [f"- Flagged: C = {b['C']:.3g}: {b['warning']}." for b in approach2["budgets"] if b["warning"]]
        clean = "- No budget flagged: every parabola opens upward, its minimum inside the sampled sizes."
        lines += [""] + (flagged or [clean])
    lines += ["", "## Plots", ""] + [f"![{name[:-4]}]({name})" for name in PLOT_NAMES]
    return "\n".join(lines) + "\n"
