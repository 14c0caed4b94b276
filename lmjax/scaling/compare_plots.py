"""The figures of `lmjax compare`, on matplotlib's Agg canvas (no display, no pyplot state).

loss_vs_compute.png  every sweep's runs and fitted Approach 3 frontier (95% band) against C = 6ND,
                     the plain runs' final points, and each multiplier drawn as a horizontal segment
isoflop.png          one panel per sweep: `lmjax fit`'s IsoFLOP figure (plots.plot_isoflop), shared loss axis
loss_vs_tokens.png   plain runs: train and eval loss against tokens seen
loss_vs_flops.png    plain runs: the same against training FLOPs counted by lmjax.flops

A source keeps its colour (its position among all sources) in every figure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from lmjax.scaling.compare import Source, frontier_loss
from lmjax.scaling.plots import plot_isoflop


MARKERS = ("o", "s", "^", "v", "D", "P")


def _color(index: int) -> str:
    return f"C{index % 10}"


def _save(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=130)


def write_compare_plots(sources: list[Source], multipliers: list[dict], C_ref: float | None, out: Path) -> list[str]:
    """Draws the figures that apply (sweeps, plain runs) into `out`; returns their file names."""
    sweeps = [(i, s) for i, s in enumerate(sources) if s.kind == "sweep"]
    runs = [(i, s) for i, s in enumerate(sources) if s.kind == "run"]
    names = []
    if sweeps:
        figure = Figure(figsize=(7.5, 5), layout="constrained")
        plot_loss_vs_compute(figure, sources, multipliers, C_ref)
        _save(figure, out / "loss_vs_compute.png")
        figure = Figure(figsize=(5.5 * len(sweeps), 4.5), layout="constrained")
        plot_isoflops(figure, sweeps)
        _save(figure, out / "isoflop.png")
        names += ["loss_vs_compute.png", "isoflop.png"]
    if runs:
        for name, x_label, scale in (("loss_vs_tokens.png", "tokens seen", None),
                                     ("loss_vs_flops.png", "training FLOPs (counted by lmjax.flops)", "flops")):
            figure = Figure(figsize=(7, 4.5), layout="constrained")
            plot_curves(figure, runs, x_label, scale)
            _save(figure, out / name)
            names.append(name)
    return names


def plot_loss_vs_compute(figure: Figure, sources: list[Source], multipliers: list[dict], C_ref: float | None) -> None:
    axes = figure.add_subplot()
    computes = [6.0 * r.params * r.tokens for s in sources for r in
                (s.result.runs if s.result is not None else [s.run.record])]
    # A frontier reaching the target far outside the runs (x of 1e-10) would squash the axis: not drawn.
    low, high = min(computes) / 100, max(computes) * 100
    drawn = [m for m in multipliers if m.get("reachable") and low <= m["C_other"]["value"] <= high]
    span = computes + [m["C_other"]["value"] for m in drawn] + ([C_ref] if C_ref else [])
    c_grid = np.geomspace(min(span) / 2, max(span) * 2, 200)
    for index, source in enumerate(sources):
        color = _color(index)
        if source.run is not None:
            r = source.run.record
            axes.scatter([6.0 * r.params * r.tokens], [r.loss], marker="*", s=150, color=color, edgecolor="k",
                         zorder=4, label=f"{source.label} (run)")
            continue
        runs = source.result.runs
        own = np.array([6.0 * r.params * r.tokens for r in runs])
        # A marker per source: sources often share runs (a fit and its holdout), drawn on top of each other.
        axes.scatter(own, [r.loss for r in runs], color=color, s=22, alpha=0.75, marker=MARKERS[index % len(MARKERS)],
                     facecolor="none" if index else color, label=f"{source.label} runs")
        if source.law is None:
            continue
        fitted = (c_grid >= own.min()) & (c_grid <= own.max())  # solid where the runs are, dashed beyond
        axes.plot(c_grid, np.where(fitted, frontier_loss(source.law, c_grid), np.nan), color=color,
                  label=f"{source.label} frontier (Approach 3)")
        axes.plot(c_grid, frontier_loss(source.law, c_grid), color=color, ls="--", lw=0.8)
        if source.law_samples is not None:
            band = frontier_loss({k: v[:, None] for k, v in source.law_samples.items()}, c_grid[None, :])
            band = np.where(np.isfinite(band), band, np.nan)
            low, high = np.nanpercentile(band, [2.5, 97.5], axis=0)
            axes.fill_between(c_grid, low, high, color=color, alpha=0.12, lw=0)
    if C_ref:
        axes.axvline(C_ref, color="grey", ls="--", lw=0.8, label=f"C_ref = {C_ref:.2g}")
    labels = [s.label for s in sources]
    for m in drawn:
        target, c_other = m["target_loss"]["value"], m["C_other"]["value"]
        color = _color(labels.index(m["other"]))
        axes.plot([c_other, C_ref], [target, target], color=color, ls=":", lw=1.5)
        axes.scatter([c_other], [target], marker="D", color=color, edgecolor="k", zorder=5)
        axes.annotate(f"x{m['multiplier']['value']:.3g}", (c_other, target), textcoords="offset points",
                      xytext=(0, 8), ha="center", fontsize=8, color=color)
    losses = [r.loss for s in sources for r in (s.result.runs if s.result is not None else [s.run.record])]
    pad = 0.08 * (max(losses) - min(losses) or 1.0)
    axes.set(xscale="log", xlabel="training compute C = 6ND (FLOPs)", ylabel="final eval loss",
             ylim=(min(losses) - pad, max(losses) + pad),
             title="Loss vs compute: Approach 3 frontiers (95% band, dashed beyond the runs);\n"
                   "diamonds: where a frontier reaches the reference's loss at C_ref")
    axes.title.set_fontsize(9)
    axes.legend(fontsize=7)


def plot_isoflops(figure: Figure, sweeps: list[tuple[int, Source]]) -> None:
    panels = figure.subfigures(1, len(sweeps), squeeze=False)[0]
    for panel, (index, source) in zip(panels, sweeps):
        plot_isoflop(source.result, panel)
        axes = panel.axes[0]
        axes.set_title(f"{source.label}: {axes.get_title()}", color=_color(index), fontsize=9)
    # One loss range for every panel, so the sweeps' profiles can be read against each other.
    for axis in ("x", "y"):
        limits = [getattr(panel.axes[0], f"get_{axis}lim")() for panel in panels]
        for panel in panels:
            getattr(panel.axes[0], f"set_{axis}lim")(min(low for low, _ in limits), max(high for _, high in limits))


def plot_curves(figure: Figure, runs: list[tuple[int, Source]], x_label: str, scale: str | None) -> None:
    axes = figure.add_subplot()
    for index, source in runs:
        run, color = source.run, _color(index)
        per_token = run.flops_per_token if scale == "flops" else 1.0
        if len(run.train_curve):
            axes.plot(run.train_curve[:, 0] * per_token, run.train_curve[:, 1], color=color, lw=1, alpha=0.6,
                      label=f"{source.label} train")
        if len(run.eval_curve):
            axes.plot(run.eval_curve[:, 0] * per_token, run.eval_curve[:, 1], "o-", color=color, ms=4,
                      label=f"{source.label} eval")
        r = run.record
        axes.scatter([r.tokens * per_token], [r.loss], marker="*", s=150, color=color, edgecolor="k", zorder=4)
    axes.set(xscale="log", xlabel=x_label, ylabel="loss",
             title=f"Loss vs {'training FLOPs' if scale == 'flops' else 'tokens'} (stars: final eval loss)")
    axes.legend(fontsize=7)
