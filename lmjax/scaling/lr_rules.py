"""How a sweep picks each run's learning rate (`lr_rule` in the sweep file), recorded in plan.json.

- fixed: every run tries every value of `lr_grid` (default: the base config's `optim.lr`); the fit
  keeps the best run per (budget, size). Simple, and as expensive as the grid is long.
- grid: the grid runs at every size of the smallest budget only; each size's best learning rate is
  reused at the larger budgets (a size the smallest budget lacks gets the rate interpolated
  linearly in log lr against log N between the nearest tuned sizes, the end one's beyond them).
  The best rate shrinks with width under SP (Kaplan et al. 2020; Porian et al. 2024), which one
  rate for every size misses; tuning at the cheapest budget costs a few runs per size.
  With `lr_fit: power_law` the per-size choices are smoothed before they are used: each tuned
  size's rate is the vertex of a parabola fitted to loss against log lr (the grid's best where
  the parabola has no minimum inside the grid), and every run, tuned size or not, takes the rate
  of the line log lr = c + k log N fitted through those vertices (Porian et al. 2024 and DeepSeek
  LLM 2024 fit the optimal rate as a power law for the same reason: a single short tuning run per
  rate is noisy, and one size's flat loss curve can pick a rate its neighbours reject).
- mup: every run is μP (`model.parameterization: mup`), whose learning rate transfers across
  width (Yang et al. 2022): the grid runs at the base width only (the size whose d_model is
  `model.mup_base_width`, by default the smallest budget's narrowest size) at the smallest budget,
  and its best rate is used by every run. Without `lr_grid`, the base config's `optim.lr` is taken
  as already tuned at the base width.

The runs whose rate depends on tuning results are planned as pending until those runs finish.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from lmjax.config import ConfigError, ModelConfig

LR_RULES = ("fixed", "grid", "mup")
LR_FITS = ("per_size", "power_law")  # how grid's tuned rates become every run's rate


@dataclass(frozen=True)
class TunedSize:
    """One size of the tuning budget: its loss (mean over seeds) at each learning rate of the grid."""

    params_total: int
    d_model: int
    loss_by_lr: dict[float, float]

    @property
    def best_lr(self) -> float:
        return min(self.loss_by_lr, key=self.loss_by_lr.get)

    @property
    def at_grid_edge(self) -> bool:
        lrs = sorted(self.loss_by_lr)
        return len(lrs) > 2 and self.best_lr in (lrs[0], lrs[-1])

    @property
    def smoothed_lr(self) -> float:
        """The vertex of the least-squares parabola of loss against log lr (>= 3 rates), if it is a
        minimum inside the grid; else the grid's best rate."""
        lrs = sorted(self.loss_by_lr)
        if len(lrs) < 3:
            return self.best_lr
        x = np.log(lrs)
        curvature, slope, _ = np.polyfit(x, [self.loss_by_lr[lr] for lr in lrs], 2)
        if curvature <= 0 or not x[0] <= -slope / (2 * curvature) <= x[-1]:
            return self.best_lr
        return float(math.exp(-slope / (2 * curvature)))


@dataclass(frozen=True)
class LRChoice:
    """The learning rates the tuning runs chose (one per tuned size; one in all under mup)."""

    rule: str
    budget: float  # the budget the tuning runs ran at
    sizes: tuple[TunedSize, ...] = field(default=())
    fit: str = "per_size"  # LR_FITS

    def power_law(self) -> tuple[float, float]:
        """(coefficient, exponent) of lr = coefficient x N^exponent, least squares in log-log space
        through the tuned sizes' smoothed rates (N: total parameters)."""
        x = [math.log(s.params_total) for s in self.sizes]
        exponent, log_coefficient = np.polyfit(x, [math.log(s.smoothed_lr) for s in self.sizes], 1)
        return float(math.exp(log_coefficient)), float(exponent)

    def lr_for(self, model_params_total: int) -> tuple[float, str]:
        """(learning rate, how it was found: tuned, interpolated, nearest, transferred or power_law)."""
        if self.rule == "mup":
            return self.sizes[0].best_lr, "transferred"
        if self.fit == "power_law":
            coefficient, exponent = self.power_law()
            return coefficient * model_params_total ** exponent, "power_law"
        by_size = sorted(self.sizes, key=lambda s: s.params_total)
        for size in by_size:
            if size.params_total == model_params_total:
                return size.best_lr, "tuned"
        log_n = [math.log(s.params_total) for s in by_size]
        log_lr = [math.log(s.best_lr) for s in by_size]
        x = math.log(model_params_total)
        source = "interpolated" if log_n[0] < x < log_n[-1] else "nearest"
        return float(math.exp(np.interp(x, log_n, log_lr))), source

    def to_json(self) -> dict:
        entry = {"rule": self.rule, "budget": self.budget,
                 "sizes": [{"params_total": s.params_total, "d_model": s.d_model, "best_lr": s.best_lr,
                            "loss_by_lr": {repr(lr): loss for lr, loss in sorted(s.loss_by_lr.items())}}
                           for s in self.sizes]}
        if self.fit == "power_law":  # per_size plans keep the keys they always had
            for size, saved in zip(self.sizes, entry["sizes"]):
                saved["smoothed_lr"] = size.smoothed_lr
            coefficient, exponent = self.power_law()
            entry["fit"] = {"kind": "power_law", "coefficient": coefficient, "exponent": exponent}
        return entry

    def warnings(self) -> list[str]:
        return [f"lr_rule {self.rule}: the best learning rate of N={s.params_total:,} ({s.best_lr:g}) is at the "
                "edge of lr_grid; widen the grid on that side" for s in self.sizes if s.at_grid_edge]


def check_rule(rule: str, lr_grid: tuple[float, ...], fit: str = "per_size") -> None:
    if rule not in LR_RULES:
        raise ConfigError(f"lr_rule: expected one of {', '.join(LR_RULES)}, got {rule!r}")
    if fit not in LR_FITS:
        raise ConfigError(f"lr_fit: expected one of {', '.join(LR_FITS)}, got {fit!r}")
    if fit == "power_law" and rule != "grid":
        raise ConfigError(f"lr_fit power_law fits the rates lr_rule grid tunes per size; lr_rule is {rule!r}")
    if rule == "grid" and len(lr_grid) < 2:
        raise ConfigError(f"lr_rule grid tunes each size on lr_grid: give >= 2 learning rates, got {list(lr_grid)}")


def mup_base_width(base: ModelConfig, smallest_budget_models: list[ModelConfig]) -> int:
    """The width μP's multipliers are relative to: the base config's, else the narrowest size's."""
    if base.mup_base_width is not None:
        return base.mup_base_width
    return min(m.d_model for m in smallest_budget_models)


def is_tuning_run(rule: str, lr_grid: tuple[float, ...], at_smallest_budget: bool, model: ModelConfig,
                  base_width: int | None) -> bool:
    """Whether this (budget, size) runs the whole lr grid to choose the others' learning rate."""
    if rule == "fixed" or not lr_grid or not at_smallest_budget:
        return False
    return rule == "grid" or model.d_model == base_width


def choose(rule: str, budget: float, tuning_losses: dict[tuple[int, int], dict[float, list[float]]],
           fit: str = "per_size") -> LRChoice:
    """The choice from the tuning runs' losses: {(params_total, d_model): {lr: [loss per seed]}}."""
    sizes = tuple(TunedSize(params, width, {lr: float(np.mean(losses)) for lr, losses in by_lr.items()})
                  for (params, width), by_lr in sorted(tuning_losses.items()))
    return LRChoice(rule, budget, sizes, fit)
