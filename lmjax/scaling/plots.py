"""The four figures of a scaling-law fit, drawn on matplotlib's Agg canvas (no display, no pyplot state).

isoflop.png          loss vs N per budget, fitted parabolas, minima marked (Approach 2)
loss_vs_compute.png  final loss vs compute, with Approach 3's compute-optimal frontier
optimal_scaling.png  N_opt and D_opt vs C: Approach 2 points and line, Approach 3, Chinchilla's exponents
contours.png         contours of the fitted L(N, D), the runs, and the compute-optimal curve
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lmjax.scaling.fit import FitResult, group_by_budget, run_compute

# Chinchilla Table 2: (label, a, b) of Approaches 1-3, drawn as reference slopes.
CHINCHILLA_EXPONENTS = (("Chinchilla A1", 0.50, 0.50), ("Chinchilla A2", 0.49, 0.51), ("Chinchilla A3", 0.46, 0.54))
PLOT_NAMES = ("isoflop.png", "loss_vs_compute.png", "optimal_scaling.png", "contours.png")


def write_plots(result: FitResult, out_dir: Path) -> list[Path]:
    """Draws all four figures into out_dir; returns their paths."""
    drawers = (plot_isoflop, plot_loss_vs_compute, plot_optimal_scaling, plot_contours)
    paths = []
    for name, draw in zip(PLOT_NAMES, drawers):
        figure = Figure(figsize=(11, 4.5) if name == "optimal_scaling.png" else (6.5, 4.5), layout="constrained")
        FigureCanvasAgg(figure)
        draw(result, figure)
        figure.savefig(out_dir / name, dpi=130)
        paths.append(out_dir / name)
    return paths


def _budget_colors(budgets) -> dict[float, tuple]:
    budgets = sorted(budgets)
    shades = np.linspace(0.1, 0.85, len(budgets)) if len(budgets) > 1 else [0.5]
    return {C: colormaps["viridis"](shade) for C, shade in zip(budgets, shades)}


def plot_isoflop(result: FitResult, figure: Figure) -> None:
    axes = figure.add_subplot()
    groups = group_by_budget(result.runs)
    colors = _budget_colors(groups)
    fitted = {} if isinstance(result.approach2, str) else {b.C: b for b in result.approach2.budgets}
    for C, runs in groups.items():
        n = np.array([r.params for r in runs])
        axes.scatter(n, [r.loss for r in runs], color=colors[C], label=f"C = {C:.2g}", zorder=3)
        spread = [(r.params, r.loss, r.seed_spread) for r in runs if r.seed_spread is not None]
        if spread:  # points averaged over seeds: one standard deviation of the seeds' losses
            axes.errorbar(*zip(*[(x, y) for x, y, _ in spread]), yerr=[e for *_, e in spread], fmt="none",
                          ecolor=colors[C], capsize=2, zorder=2)
        budget = fitted.get(C)
        if budget is None or budget.coefficients is None:
            continue
        log_n = np.linspace(np.log(n.min()) - 0.2, np.log(n.max()) + 0.2, 100)
        axes.plot(np.exp(log_n), np.polyval(budget.coefficients, log_n), color=colors[C], lw=1)
        if budget.N_opt is not None:
            axes.scatter([budget.N_opt], [budget.loss_min], marker="*", s=160, color=colors[C], edgecolor="k", zorder=4)
    axes.set(xscale="log", xlabel=f"parameters N ({result.param_convention})", ylabel="final eval loss",
             title="IsoFLOP profiles (Approach 2); stars: parabola minima; bars: seeds' std")
    if isinstance(result.approach2, str):
        axes.set_title(f"IsoFLOP profiles; Approach 2 skipped:\n{result.approach2}", fontsize=8)
    axes.legend(fontsize=7)


def _six_nd_per_counted_flop(result: FitResult) -> float:
    """Approach 3's allocation assumes C = 6ND; the x axes are FLOPs counted by lmjax.flops (k N D
    with k > 6). Convert with the largest budget's ratio so the lines sit over the runs."""
    return result.largest_budget_6nd / result.largest_budget if result.largest_budget else 1.0


def plot_loss_vs_compute(result: FitResult, figure: Figure) -> None:
    axes = figure.add_subplot()
    groups = group_by_budget(result.runs)
    colors = _budget_colors(groups)
    for C, runs in groups.items():
        axes.scatter([run_compute(r) for r in runs], [r.loss for r in runs], color=colors[C], s=18,
                     label=f"C = {C:.2g}")
    if not isinstance(result.approach2, str):
        minima = [b for b in result.approach2.budgets if b.N_opt is not None]
        axes.scatter([b.C for b in minima], [b.loss_min for b in minima], marker="*", s=140, color="k",
                     label="Approach 2 minima")
    if not isinstance(result.approach3, str):
        computes = [run_compute(r) for r in result.runs]
        c_grid = np.geomspace(min(computes) / 2, max(computes) * 2, 200)
        law = result.approach3.law
        axes.plot(c_grid, law.loss(*law.compute_optimal(c_grid * _six_nd_per_counted_flop(result))), color="C3",
                  label="Approach 3 frontier")
    axes.set(xscale="log", xlabel="training compute C (FLOPs)", ylabel="final eval loss", title="Loss vs compute")
    axes.legend(fontsize=7)


def _anchor(result: FitResult, c_grid_6nd: np.ndarray) -> tuple[float, float, float] | None:
    """(C, N, D) through which the published exponents are drawn: mid-range on the fitted lines."""
    c_mid = float(np.sqrt(c_grid_6nd[0] * c_grid_6nd[-1]))
    if not isinstance(result.approach3, str):
        n_mid, d_mid = result.approach3.law.compute_optimal(c_mid)
        return c_mid, float(n_mid), float(d_mid)
    if not isinstance(result.approach2, str):
        fit = result.approach2
        n_mid, d_mid = np.exp(fit.log_n_intercept) * c_mid**fit.a, np.exp(fit.log_d_intercept) * c_mid**fit.b
        return c_mid, float(n_mid), float(d_mid)
    return None


def plot_optimal_scaling(result: FitResult, figure: Figure) -> None:
    """N_opt and D_opt against compute in C = 6ND units, the one both approaches' exponents use."""
    axes_n, axes_d = figure.subplots(1, 2)
    computes = [6.0 * r.params * r.tokens for r in result.runs]
    c_grid = np.geomspace(min(computes) / 3, max(computes) * 3, 100)
    if not isinstance(result.approach2, str):
        fit = result.approach2
        points = [(j, b) for j, b in enumerate(fit.budgets) if b.N_opt is not None]
        for axes, key, exponent, intercept in ((axes_n, "N_opt", fit.a, fit.log_n_intercept),
                                               (axes_d, "D_opt", fit.b, fit.log_d_intercept)):
            values = np.array([getattr(b, key) for _, b in points])
            errors = None
            if result.approach2_samples:
                samples = result.approach2_samples[key][:, [j for j, _ in points]]
                low, high = np.nanpercentile(samples, [2.5, 97.5], axis=0)
                errors = np.clip([values - low, high - values], 0, None)
            axes.errorbar([b.C_6nd for _, b in points], values, yerr=errors, fmt="o", color="C0", capsize=3,
                          label="Approach 2 minima (95% CI)")
            axes.plot(c_grid, np.exp(intercept) * c_grid**exponent, color="C0",
                      label=f"Approach 2 fit, exponent {exponent:.3f}")
    if not isinstance(result.approach3, str):
        law = result.approach3.law
        n_line, d_line = law.compute_optimal(c_grid)
        axes_n.plot(c_grid, n_line, color="C3", label=f"Approach 3, a = {law.a:.3f}")
        axes_d.plot(c_grid, d_line, color="C3", label=f"Approach 3, b = {law.b:.3f}")
    anchor = _anchor(result, c_grid)
    if anchor is not None:
        c_mid, n_mid, d_mid = anchor
        for (label, a, b), style in zip(CHINCHILLA_EXPONENTS, (":", "--", "-.")):
            axes_n.plot(c_grid, n_mid * (c_grid / c_mid) ** a, "k", ls=style, lw=0.8, label=f"{label}, a = {a:.2f}")
            axes_d.plot(c_grid, d_mid * (c_grid / c_mid) ** b, "k", ls=style, lw=0.8, label=f"{label}, b = {b:.2f}")
    axes_n.set(xscale="log", yscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel=f"N_opt ({result.param_convention})",
               title="Compute-optimal parameters")
    axes_d.set(xscale="log", yscale="log", xlabel="compute C = 6ND (FLOPs)", ylabel="D_opt (tokens)",
               title="Compute-optimal tokens")
    axes_n.legend(fontsize=7)
    axes_d.legend(fontsize=7)


def plot_contours(result: FitResult, figure: Figure) -> None:
    axes = figure.add_subplot()
    n = np.array([r.params for r in result.runs])
    d = np.array([r.tokens for r in result.runs])
    loss = np.array([r.loss for r in result.runs])
    n_grid = np.geomspace(n.min() / 3, n.max() * 3, 120)
    d_grid = np.geomspace(d.min() / 3, d.max() * 3, 120)
    if isinstance(result.approach3, str):
        axes.set_title(f"Approach 3 skipped: {result.approach3}", fontsize=8)
    else:
        law = result.approach3.law
        n_mesh, d_mesh = np.meshgrid(n_grid, d_grid)
        surface = law.loss(n_mesh, d_mesh)
        lines = axes.contour(n_mesh, d_mesh, surface, levels=np.linspace(loss.min(), loss.max(), 9),
                             colors="grey", linewidths=0.7)
        axes.clabel(lines, fmt="%.2f", fontsize=7)
        c_grid = np.geomspace(6 * n_grid[0] * d_grid[0], 6 * n_grid[-1] * d_grid[-1], 200)
        n_opt, d_opt = law.compute_optimal(c_grid)
        axes.plot(n_opt, d_opt, color="C3", label="compute-optimal (Approach 3)")
        axes.set_title(f"L = {law.E:.3g} + {law.A:.3g}/N^{law.alpha:.3f} + {law.B:.3g}/D^{law.beta:.3f}", fontsize=9)
    points = axes.scatter(n, d, c=loss, cmap="viridis", edgecolor="k", zorder=3, label="runs")
    figure.colorbar(points, ax=axes, label="run final loss")
    axes.set(xscale="log", yscale="log", xlim=(n_grid[0], n_grid[-1]), ylim=(d_grid[0], d_grid[-1]),
             xlabel=f"parameters N ({result.param_convention})", ylabel="tokens D")
    axes.legend(fontsize=7, loc="upper left")
