"""Chinchilla scaling-law fits (Hoffmann et al. 2022): Approach 2 (IsoFLOP) and Approach 3 (parametric).

Approach 3 fits L(N, D) = E + A / N^alpha + B / D^beta by minimising the SUM over runs of
Huber_1e-3(LSE(a - alpha log N, b - beta log D, e) - log L) with L-BFGS from every point of the
paper's 4500-point grid (appendix D.2). The 4500 minimisations are independent but advanced in
lockstep by one L-BFGS vectorised over starts (`lbfgs_batch`): the grid takes seconds, where a
loop of scipy.optimize.minimize calls takes 25 s on an idle core (its per-call overhead dominates).

Approach 2 fits a parabola of loss against log N per compute budget; its minimum is N_opt(C).
D_opt(C) = C / (k N_opt) where k is the runs' own FLOPs per (parameter x token), interpolated in
log N between the budget's runs (6 when the runs carry no FLOP count), so N_opt D_opt k = C holds
in the runs' own accounting whatever the parameter convention.

The parabolas' minimum losses, one per budget, are also fitted as a power law in compute, the
IsoFLOP minima law loss_min(C) = A_min C^-gamma_min (Kaplan et al. 2020's L(C_min)), against the
budgets as counted: with Approach 3's L(N_opt, D_opt) it is the second way `lmjax sweep` predicts
a held-out budget's loss, one that assumes no irreducible term (at small scale none shows).

Both approaches state their exponents against the same compute, C = 6ND (fit.json's
`compute_convention`): Approach 3's allocation is derived under it, and Approach 2's lines are
fitted against each budget's 6 N_opt D_opt. Budgets counted by lmjax.flops are k N D with k > 6 and
falling with N at small scale, so exponents against counted FLOPs (kept as `a_counted`) differ.

Confidence intervals are 2.5/97.5 percentiles of a bootstrap over runs, deterministic given a seed.
The JSON written by `FitResult.to_json` is a contract read by other tools; `predict` reads it back.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from lmjax.scaling.lbfgs import lbfgs_batch
from lmjax.scaling.runs import FitInputError, RunRecord

HUBER_DELTA = 1e-3
MIN_RUNS_APPROACH3 = 6  # five free parameters: need more runs than that
MIN_SIZES_PER_BUDGET = 3  # a parabola through fewer sizes has no meaningful minimum
MIN_BUDGETS = 2
BUDGET_LOG_TOLERANCE = math.log(1.1)  # runs within 10% of a group's smallest compute share its budget
BOOTSTRAP_EXTRA_STARTS = 4  # distinct full-data local minima, besides the best, that seed each resample


@dataclass(frozen=True)
class ScalingLaw:
    """L(N, D) = E + A / N^alpha + B / D^beta and its compute-optimal allocation under C = 6ND."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float

    @classmethod
    def from_fit(cls, fit: dict) -> ScalingLaw:
        """Approach 3's law from a fit.json dict (FitInputError if the fit has none)."""
        approach3 = fit.get("approach3", {})
        if "skipped" in approach3 or "E" not in approach3:
            raise FitInputError(f"the fit has no Approach 3 law ({approach3.get('skipped', 'missing')})")
        return cls(**{k: approach3[k]["value"] for k in ("E", "A", "B", "alpha", "beta")})

    @classmethod
    def from_theta(cls, theta: np.ndarray) -> ScalingLaw:
        a, b, e, alpha, beta = (float(v) for v in theta)
        with np.errstate(over="ignore"):  # a degenerate optimum (log A in the hundreds) gives A = inf, not a crash
            E, A, B = (float(np.exp(v)) for v in (e, a, b))
        return cls(E=E, A=A, B=B, alpha=alpha, beta=beta)

    @property
    def a(self) -> float:
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        return self.alpha / (self.alpha + self.beta)

    @property
    def G(self) -> float:
        ratio = self.alpha * self.A / (self.beta * self.B)
        if not (ratio > 0 and self.alpha + self.beta > 0):  # a degenerate fit (an exponent <= 0) has no
            return math.nan  # interior optimum; a float power of a negative ratio would be complex
        return ratio ** (1.0 / (self.alpha + self.beta))

    def loss(self, N, D):
        return self.E + self.A / np.power(N, self.alpha) + self.B / np.power(D, self.beta)

    def compute_optimal(self, C):
        """(N_opt, D_opt) minimising L at compute C = 6 N D."""
        return self.G * np.power(np.asarray(C) / 6.0, self.a), np.power(np.asarray(C) / 6.0, self.b) / self.G

    def tokens_per_param(self, C) -> float:
        n_opt, d_opt = self.compute_optimal(C)
        return d_opt / n_opt


# ----------------------------------------------------------------------------- Approach 3


def chinchilla_grid() -> np.ndarray:
    """The 4500 starts of appendix D.2 as rows (a, b, e, alpha, beta)."""
    exponents, log_e, log_ab = np.arange(0, 2.01, 0.5), np.arange(-1, 1.01, 0.5), np.arange(0, 25.1, 5)
    return np.array(list(itertools.product(log_ab, log_ab, log_e, exponents, exponents)))


def huber_objective(theta_Kx5: np.ndarray, log_n_KxR: np.ndarray, log_d_KxR: np.ndarray, log_loss_KxR: np.ndarray,
                    delta: float = HUBER_DELTA) -> tuple[np.ndarray, np.ndarray]:
    """For K problems at once: sum over R runs of Huber_delta(log predicted L - log L), and its gradient."""
    a, b, e, alpha, beta = (theta_Kx5[:, i : i + 1] for i in range(5))
    term_n, term_d = a - alpha * log_n_KxR, b - beta * log_d_KxR
    shift = np.maximum(np.maximum(term_n, term_d), e)  # log-sum-exp without overflow
    w_n, w_d, w_e = np.exp(term_n - shift), np.exp(term_d - shift), np.exp(e - shift)
    total = w_n + w_d + w_e
    residual = shift + np.log(total) - log_loss_KxR
    abs_residual = np.abs(residual)
    with np.errstate(over="ignore"):  # far-off line-search trials: the unused square branch may overflow
        value_K = np.where(abs_residual <= delta, 0.5 * residual**2, delta * (abs_residual - 0.5 * delta)).sum(-1)
    # d Huber / d residual, times the softmax weights (d LSE / d term).
    slope = np.clip(residual, -delta, delta) / total
    g_n, g_d = slope * w_n, slope * w_d
    grad_Kx5 = np.stack([g_n.sum(-1), g_d.sum(-1), (slope * w_e).sum(-1),
                         -(g_n * log_n_KxR).sum(-1), -(g_d * log_d_KxR).sum(-1)], axis=-1)
    return value_K, grad_Kx5


def minimise_from(starts_Kx5: np.ndarray, log_n, log_d, log_loss) -> tuple[np.ndarray, np.ndarray]:
    """L-BFGS from each start; data rows are per start (K x R) or shared (R,). Returns (ends, objectives)."""
    data = [np.broadcast_to(v, (len(starts_Kx5), np.shape(v)[-1])) for v in (log_n, log_d, log_loss)]
    ends, values = lbfgs_batch(lambda x, rows: huber_objective(x, *(v[rows] for v in data)), starts_Kx5)
    finite = np.isfinite(values) & np.isfinite(ends).all(axis=1)
    return ends, np.where(finite, values, np.inf)


@dataclass(frozen=True)
class Approach3Fit:
    law: ScalingLaw
    objective: float
    local_minima: np.ndarray  # distinct end points, best first: each bootstrap resample starts from a few


def fit_approach3(N, D, L) -> Approach3Fit:
    """Best of L-BFGS from all 4500 grid starts (Hoffmann et al. 2022, appendix D.2)."""
    ends, values = minimise_from(chinchilla_grid(), np.log(N), np.log(D), np.log(L))
    order = np.argsort(values)
    ends, values = ends[order][np.isfinite(values[order])], values[order][np.isfinite(values[order])]
    _, first = np.unique(np.round(ends, 2), axis=0, return_index=True)
    return Approach3Fit(ScalingLaw.from_theta(ends[0]), float(values[0]), local_minima=ends[np.sort(first)])


# ----------------------------------------------------------------------------- Approach 2


def run_compute(run: RunRecord) -> float:
    """The compute a run spent: its measured FLOPs, else 6 N D."""
    return run.flops if run.flops is not None else 6.0 * run.params * run.tokens


def group_by_budget(runs: list[RunRecord], tolerance: float = BUDGET_LOG_TOLERANCE) -> dict[float, list[RunRecord]]:
    """IsoFLOP groups keyed by their compute: a run's planned budget, else the compute it spent.

    Runs join a group while their compute is within `tolerance` in natural log of the group's
    smallest (rounding would split 1.04e15 and 1.06e15 across a digit boundary, and merge
    budgets that only differ past it). A group's key is the geometric mean of its members'
    computes: the planned budget itself when they share one.
    """
    keyed = sorted((((run.budget if run.budget is not None else run_compute(run)), run) for run in runs), key=lambda cr: cr[0])
    groups: list[list[tuple[float, RunRecord]]] = []
    for compute, run in keyed:
        if groups and math.log(compute) - math.log(groups[-1][0][0]) <= tolerance:
            groups[-1].append((compute, run))
        else:
            groups.append([(compute, run)])
    def key(computes: list[float]) -> float:
        return computes[0] if len(set(computes)) == 1 else float(np.exp(np.mean(np.log(computes))))

    return {key([c for c, _ in group]): [run for _, run in group] for group in groups}


def parabola_minimum(log_n: np.ndarray, loss: np.ndarray) -> tuple[np.ndarray | None, float, float]:
    """(coefficients in log N, log N at the minimum, loss there); NaNs when there is no minimum."""
    if len(np.unique(log_n)) < MIN_SIZES_PER_BUDGET:
        return None, math.nan, math.nan
    coefficients = np.polyfit(log_n, loss, 2)
    curvature, slope, _ = coefficients
    if curvature <= 0:
        return coefficients, math.nan, math.nan
    x_min = -slope / (2 * curvature)
    return coefficients, x_min, float(np.polyval(coefficients, x_min))


def flops_per_param_token(runs: list[RunRecord], n: float) -> float:
    """k with C = k N D at size n, interpolated in log N between the runs (6 without FLOP counts)."""
    measured = sorted((math.log(r.params), math.log(r.flops / (r.params * r.tokens))) for r in runs if r.flops)
    if not measured:
        return 6.0
    log_n, log_k = zip(*measured)
    return float(np.exp(np.interp(math.log(n), log_n, log_k)))


@dataclass(frozen=True)
class BudgetFit:
    C: float  # as counted (the planned budget or the runs' FLOPs)
    runs: list[RunRecord]
    coefficients: np.ndarray | None  # loss = polyval(coefficients, log N)
    N_opt: float | None
    D_opt: float | None
    loss_min: float | None
    warning: str | None

    @property
    def C_6nd(self) -> float | None:
        """The budget in C = 6ND units at its optimum."""
        return None if self.N_opt is None else 6.0 * self.N_opt * self.D_opt


def fit_budget(C: float, runs: list[RunRecord]) -> BudgetFit:
    """The parabola of one budget, with a warning when its minimum is missing or at the grid's edge."""
    log_n, loss = np.log([r.params for r in runs]), np.array([r.loss for r in runs])
    coefficients, x_min, loss_min = parabola_minimum(log_n, loss)
    if not math.isfinite(x_min):
        return BudgetFit(C, runs, coefficients, None, None, None, "parabola opens downward: no minimum")
    n_opt = math.exp(x_min)
    warning = None
    if not log_n.min() <= x_min <= log_n.max():
        warning = (f"minimum N={n_opt:.3g} outside the sampled sizes [{math.exp(log_n.min()):.3g}, "
                   f"{math.exp(log_n.max()):.3g}]: extrapolated, extend the grid")
    elif log_n[loss.argmin()] in (log_n.min(), log_n.max()):
        side = "smallest" if log_n[loss.argmin()] == log_n.min() else "largest"
        warning = f"lowest loss at the {side} sampled size: the minimum is at the grid's edge, extend the grid"
    return BudgetFit(C, runs, coefficients, n_opt, C / (flops_per_param_token(runs, n_opt) * n_opt), loss_min, warning)


@dataclass(frozen=True)
class Approach2Fit:
    budgets: list[BudgetFit]  # every budget with enough sizes; those with a minimum enter the line fits
    a: float  # against C = 6ND
    b: float
    log_n_intercept: float  # log N_opt = a log C_6nd + log_n_intercept
    log_d_intercept: float
    a_counted: float  # against the budgets as counted
    b_counted: float
    minima_log_a: float  # log loss_min = minima_log_a - minima_gamma log C, C as counted
    minima_gamma: float

    def minima_loss(self, C):
        return np.exp(self.minima_log_a - self.minima_gamma * np.log(C))


def fit_approach2(runs: list[RunRecord]) -> Approach2Fit | str:
    """The IsoFLOP fit over every budget with enough sizes, or the reason it cannot be made."""
    sized = {C: group for C, group in group_by_budget(runs).items()
             if len({r.params for r in group}) >= MIN_SIZES_PER_BUDGET}
    if len(sized) < MIN_BUDGETS:
        return (f"Approach 2 needs >= {MIN_SIZES_PER_BUDGET} sizes in each of >= {MIN_BUDGETS} budgets; "
                f"{len(sized)} budget(s) have enough sizes")
    budgets = [fit_budget(C, group) for C, group in sized.items()]
    minima = [fit for fit in budgets if fit.N_opt is not None]
    if len(minima) < MIN_BUDGETS:
        return f"Approach 2: only {len(minima)} budget(s) have a parabola minimum; need >= {MIN_BUDGETS}"
    log_n, log_d = np.log([fit.N_opt for fit in minima]), np.log([fit.D_opt for fit in minima])
    log_c6, log_c = np.log([fit.C_6nd for fit in minima]), np.log([fit.C for fit in minima])
    (a, log_n0), (b, log_d0) = np.polyfit(log_c6, log_n, 1), np.polyfit(log_c6, log_d, 1)
    a_counted, b_counted = np.polyfit(log_c, log_n, 1)[0], np.polyfit(log_c, log_d, 1)[0]
    slope, log_a_min = np.polyfit(log_c, np.log([fit.loss_min for fit in minima]), 1)
    return Approach2Fit(budgets, float(a), float(b), float(log_n0), float(log_d0), float(a_counted), float(b_counted),
                        float(log_a_min), float(-slope))


# ----------------------------------------------------------------------------- bootstrap


def bootstrap_approach2(fit: Approach2Fit, n_resamples: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Resamples runs within each budget; NaN where a resample has no parabola minimum."""
    n_opt = np.full((n_resamples, len(fit.budgets)), np.nan)
    d_opt, loss_min = np.full_like(n_opt, np.nan), np.full_like(n_opt, np.nan)
    for j, budget in enumerate(fit.budgets):
        log_n = np.log([r.params for r in budget.runs])
        loss = np.array([r.loss for r in budget.runs])
        for i in range(n_resamples):
            pick = rng.integers(0, len(loss), len(loss))
            _, x_min, loss_min[i, j] = parabola_minimum(log_n[pick], loss[pick])
            if math.isfinite(x_min):
                n_opt[i, j] = math.exp(x_min)
                d_opt[i, j] = budget.C / (flops_per_param_token(budget.runs, n_opt[i, j]) * n_opt[i, j])
    in_line_fit = np.array([budget.N_opt is not None for budget in fit.budgets])
    log_c = np.log([budget.C for budget in fit.budgets])
    log_c6 = np.log(6.0 * n_opt * d_opt)  # each resample's optimum in C = 6ND units
    exponents = np.full((n_resamples, 4), np.nan)
    minima_law = np.full((n_resamples, 2), np.nan)  # (log A_min, gamma_min)
    for i in range(n_resamples):
        usable = in_line_fit & np.isfinite(n_opt[i])
        if usable.sum() >= MIN_BUDGETS:
            log_n, log_d = np.log(n_opt[i, usable]), np.log(d_opt[i, usable])
            exponents[i] = [np.polyfit(x, y, 1)[0] for x in (log_c6[i, usable], log_c[usable]) for y in (log_n, log_d)]
            if (loss_min[i, usable] > 0).all():  # a resample's parabola can bottom out below zero: no law
                slope, minima_law[i, 0] = np.polyfit(log_c[usable], np.log(loss_min[i, usable]), 1)
                minima_law[i, 1] = -slope
    return {"N_opt": n_opt, "D_opt": d_opt, "a": exponents[:, 0], "b": exponents[:, 1],
            "a_counted": exponents[:, 2], "b_counted": exponents[:, 3],
            "minima_log_a": minima_law[:, 0], "minima_gamma": minima_law[:, 1]}


def bootstrap_approach3(fit: Approach3Fit, runs: list[RunRecord], n_resamples: int, largest_budget: float,
                        rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Resamples runs; each resample starts from the best full-data solution and a few other minima.

    All resamples x starts are one batched L-BFGS call, so 200 resamples cost about one grid fit.
    """
    log_data = [np.log([getattr(r, k) for r in runs]) for k in ("params", "tokens", "loss")]
    starts = fit.local_minima[: 1 + BOOTSTRAP_EXTRA_STARTS]
    picks = rng.integers(0, len(runs), (n_resamples, len(runs))).repeat(len(starts), axis=0)
    ends, values = minimise_from(np.tile(starts, (n_resamples, 1)), *(v[picks] for v in log_data))
    best = values.reshape(n_resamples, len(starts)).argmin(axis=1) + np.arange(n_resamples) * len(starts)
    # In log space, vectorised: a resample can land on a degenerate optimum (log A in the
    # hundreds with a matching alpha: A / N^alpha stays finite, A itself overflows). Such samples
    # give inf for A or B, which the intervals leave out, and finite exponents, which they keep.
    log_a, log_b, log_e, alpha, beta = ends[best].T
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        a_exp, b_exp = beta / (alpha + beta), alpha / (alpha + beta)
        log_g = (np.log(alpha) + log_a - np.log(beta) - log_b) / (alpha + beta)
        samples = {"E": np.exp(log_e), "A": np.exp(log_a), "B": np.exp(log_b), "alpha": alpha, "beta": beta,
                   "a": a_exp, "b": b_exp,
                   # D_opt / N_opt = (C/6)^(b - a) / G^2 (ScalingLaw.compute_optimal)
                   "tokens_per_param": np.exp((b_exp - a_exp) * np.log(largest_budget / 6.0) - 2 * log_g)}
    return samples


# ----------------------------------------------------------------------------- both approaches, JSON


@dataclass(frozen=True)
class FitResult:
    param_convention: str
    runs: list[RunRecord]
    largest_budget: float
    largest_budget_6nd: float  # the same compute in Approach 3's C = 6ND units
    approach3: Approach3Fit | str  # the fit, or why it was skipped
    approach2: Approach2Fit | str
    approach3_samples: dict[str, np.ndarray]  # bootstrap resamples; empty without bootstrap
    approach2_samples: dict[str, np.ndarray]

    def to_json(self) -> dict:
        """The fit.json contract."""
        return {"param_convention": self.param_convention, "compute_convention": "6ND", "n_runs": len(self.runs),
                "approach3": self._approach3_json(), "isoflop": self._approach2_json()}

    def _approach3_json(self) -> dict:
        if isinstance(self.approach3, str):
            return {"skipped": self.approach3}
        law = self.approach3.law
        out = {k: _estimate(getattr(law, k), self.approach3_samples.get(k))
               for k in ("E", "A", "B", "alpha", "beta", "a", "b")}
        out["tokens_per_param"] = _estimate(law.tokens_per_param(self.largest_budget_6nd),
                                            self.approach3_samples.get("tokens_per_param"))
        return out

    def _approach2_json(self) -> dict:
        if isinstance(self.approach2, str):
            return {"skipped": self.approach2}
        samples = self.approach2_samples
        budgets = [{"C": budget.C, "C_6ND": budget.C_6nd,
                    "N_opt": _estimate(budget.N_opt, samples["N_opt"][:, j] if samples else None),
                    "D_opt": _estimate(budget.D_opt, samples["D_opt"][:, j] if samples else None),
                    "loss_min": budget.loss_min, "n_runs": len(budget.runs), "warning": budget.warning}
                   for j, budget in enumerate(self.approach2.budgets)]
        minima_law = {"compute": "counted",
                      "A": _estimate(math.exp(self.approach2.minima_log_a),
                                     np.exp(samples["minima_log_a"]) if samples else None),
                      "gamma": _estimate(self.approach2.minima_gamma, samples.get("minima_gamma"))}
        return {"budgets": budgets, **{key: _estimate(getattr(self.approach2, key), samples.get(key))
                                       for key in ("a", "b", "a_counted", "b_counted")},
                "minima_law": minima_law}

    def minima_loss(self, C: float) -> dict | None:
        """The IsoFLOP minima law's loss at compute C (as counted) with its bootstrap interval;
        None without an Approach 2 fit."""
        if isinstance(self.approach2, str):
            return None
        samples = self.approach2_samples
        return _estimate(float(self.approach2.minima_loss(C)), np.exp(
            samples["minima_log_a"] - samples["minima_gamma"] * math.log(C)) if samples else None)


def _estimate(value: float | None, samples: np.ndarray | None) -> dict:
    """{"value", "ci_low", "ci_high"}: the full-data value and the 95% bootstrap interval (None if none)."""
    finite = samples[np.isfinite(samples)] if samples is not None else np.empty(0)
    low, high = np.percentile(finite, [2.5, 97.5]) if finite.size else (None, None)
    return {"value": None if value is None else float(value),
            "ci_low": None if low is None else float(low), "ci_high": None if high is None else float(high)}


def fit_scaling_laws(runs: list[RunRecord], param_convention: str = "total", seed: int = 0,
                     bootstrap: int = 200) -> FitResult:
    """Both Chinchilla fits with bootstrap CIs; raises FitInputError if neither can be made."""
    if bootstrap < 0:
        raise FitInputError(f"bootstrap must be >= 0 resamples; got {bootstrap}")
    approach2 = fit_approach2(runs)
    if len(runs) < MIN_RUNS_APPROACH3:
        approach3 = f"Approach 3 has 5 parameters and needs >= {MIN_RUNS_APPROACH3} runs; got {len(runs)}"
        if isinstance(approach2, str):
            raise FitInputError(f"too few runs to fit: {approach3}; {approach2}")
    else:
        approach3 = fit_approach3(*(np.array([getattr(r, k) for r in runs]) for k in ("params", "tokens", "loss")))
    groups = group_by_budget(runs)
    largest_budget = max(groups)
    # The parametric law's compute-optimal formulas assume C = 6ND; budgets counted by lmjax.flops
    # (attention, logits, embeddings) are k N D with k > 6 at small scale. Tokens per parameter are
    # read at the largest budget's 6ND-equivalent compute, with k the geometric mean of its runs'.
    ks = [r.flops / (r.params * r.tokens) for r in groups[largest_budget] if r.flops]
    largest_budget_6nd = largest_budget * 6.0 / math.exp(np.mean(np.log(ks))) if ks else largest_budget
    rng_approach2, rng_approach3 = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    approach3_samples, approach2_samples = {}, {}
    if bootstrap and not isinstance(approach3, str):
        approach3_samples = bootstrap_approach3(approach3, runs, bootstrap, largest_budget_6nd, rng_approach3)
    if bootstrap and not isinstance(approach2, str):
        approach2_samples = bootstrap_approach2(approach2, bootstrap, rng_approach2)
    return FitResult(param_convention, runs, largest_budget, largest_budget_6nd, approach3, approach2,
                     approach3_samples, approach2_samples)


def predict(fit: dict, C) -> dict:
    """Approach 3's compute-optimal N, D and predicted loss at compute C, from a fit.json dict."""
    law = ScalingLaw.from_fit(fit)
    n_opt, d_opt = law.compute_optimal(C)
    as_output = float if np.ndim(C) == 0 else np.asarray
    return {"C": C, "N_opt": as_output(n_opt), "D_opt": as_output(d_opt), "loss": as_output(law.loss(n_opt, d_opt))}
