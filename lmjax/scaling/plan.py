"""IsoFLOP sweep planning: from a sweep YAML to one ordinary training config per (budget, size, lr).

A sweep file names a base training config, compute budgets C (FLOPs) and model sizes. For every
(C, N) the planner picks the number of steps so that the run's FLOPs, as `lmjax.flops` counts
them (Chinchilla appendix F, not 6ND), equal C:

    steps = round(C / (global_batch_size * seq_len * flops_per_token(model, seq_len)))

Rules, all settings of the sweep file:
- Batch: the global batch of the base config, the same for every run, so tokens D = steps x
  global_batch_size x seq_len is always a whole number of batches and runs of one budget differ
  only in their model. A run whose whole-step FLOPs miss C by more than
  `schedule.flops_tolerance` (1%), or that would take fewer than `schedule.min_steps` steps (a
  model too large for its budget), is dropped and listed as a warning; the batch is never shrunk,
  since that would change the optimisation along with the size.
- Schedule: cosine from the peak lr to `min_lr_ratio` (10%) of it over exactly the run's steps
  (Hoffmann et al. 2022: a cosine longer than the run overestimates its loss), after a linear
  warmup of min(`max_warmup_steps`, `warmup_fraction` x steps) steps (Porian et al. 2024: long
  warmups hurt small-budget runs).
- Learning rate: by `lr_rule` (`lr_rules.py`): every value of `lr_grid` (or the base's `optim.lr`)
  at every point (fixed), tuned per size at the smallest budget (grid; `lr_fit: power_law` fits
  lr = c N^k through the tuned sizes and uses it everywhere), or tuned once at μP's base width and
  transferred (mup); the fit keeps the best run per (budget, size).
- Seeds: each run once per value of `seeds` (config key `seed`); the fit averages them per point.
- Final eval: every run's last evaluation reads `eval_tokens` validation tokens (at most the
  whole split; `train.final_eval_tokens`), the loss the fit reads, with its standard error.
- Sizes: explicit shapes (any `model.*` keys) or target parameter counts `{params: 2e6}`, turned
  into shapes by `shape_for_params` under the rules of the `shape` section (documented there).
  N is counted by `flops.param_counts` under `param_convention`, recorded in plan.json.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmjax import flops
from lmjax.tasks import build_task
from lmjax.config import Config, ConfigError, ModelConfig, build, flatten_dotted, load_config, load_yaml, parse_override
from lmjax.config import replace, to_dict, validate
from lmjax.scaling import lr_rules
from lmjax.scaling.runs import PARAM_CONVENTIONS, SEED_AGGREGATES
from lmjax.scaling.shapes import SHAPE_KEYS, ShapeRules, count_params, shape_for_params  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class ScheduleRules:
    min_lr_ratio: float = 0.1  # cosine ends at this fraction of the peak lr, at the run's last step
    warmup_fraction: float = 0.05
    max_warmup_steps: int = 100
    min_steps: int = 20  # fewer steps than this: the run is dropped (model too large for the budget)
    flops_tolerance: float = 0.01  # |run FLOPs / C - 1| allowed after rounding to whole steps


@dataclass(frozen=True)
class PredictSettings:
    holdout_largest: bool = False  # fit without the largest budget, predict its loss, compare


@dataclass(frozen=True)
class FitSettings:
    bootstrap: int = 200
    seed: int = 0
    seed_aggregate: str = "mean"  # runs that differ only by seed enter the fit at their mean or median


@dataclass(frozen=True)
class SweepConfig:
    sweep_dir: str = ""
    # A training config (path relative to the sweep file) or an inline mapping of config keys;
    # None: lmjax's defaults.
    base: Any = None
    base_overrides: Any = None  # mapping of config keys (dotted or nested) applied to every run
    budgets: tuple[float, ...] = ()
    # A list of sizes shared by every budget, or a mapping budget -> list. Each size is a mapping:
    # {params: 2e6} or explicit model keys {d_model: 128, n_layers: 4, ...}.
    sizes: Any = ()
    param_convention: str = field(default="total", metadata={"choices": PARAM_CONVENTIONS})
    lr_grid: tuple[float, ...] = ()
    lr_rule: str = field(default="fixed", metadata={"choices": lr_rules.LR_RULES})  # lr_rules.py
    lr_fit: str = field(default="per_size", metadata={"choices": lr_rules.LR_FITS})  # lr_rule grid: per size or a power law in N
    seeds: tuple[int, ...] = ()  # () = the base config's seed, once
    eval_tokens: int = 1_000_000  # each run's final eval: at least this many validation tokens, at most the split
    schedule: ScheduleRules = field(default_factory=ScheduleRules)
    shape: ShapeRules = field(default_factory=ShapeRules)
    predict: PredictSettings = field(default_factory=PredictSettings)
    fit: FitSettings = field(default_factory=FitSettings)


def load_sweep(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> tuple[SweepConfig, Path]:
    """Sweep YAML + `key.path=value` overrides -> (SweepConfig, folder the base path is relative to)."""
    path = Path(path)
    sweep = build(SweepConfig, load_yaml(path))
    for text in overrides:
        key, value = parse_override(text)
        sweep = replace(sweep, **{key: value})
    return sweep, path.parent


def format_number(x: float, digits: int = 3) -> str:
    """Compact scientific text for names and tables: 1e+13 -> 1e13, 2.13e+05 -> 2.13e5."""
    text = f"{x:.{digits}g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}e{int(exponent)}"
    return text


@dataclass(frozen=True)
class PlannedRun:
    name: str
    budget: float
    lr: float | None  # None: pending, chosen from tuning runs that have not finished yet
    steps: int
    warmup_steps: int
    config: Config  # the complete training config of the run (while pending: with the base's lr)
    overrides: tuple[str, ...]  # what the run changes relative to the plan's base config
    params: int  # under the sweep's param_convention
    lr_source: str = "fixed"  # fixed, grid (a tuning run), tuned, interpolated, nearest, transferred, pending
    seed: int | None = None  # None: the base config's seed

    @property
    def pending(self) -> bool:
        return self.lr is None

    @property
    def tokens(self) -> int:
        return self.steps * self.config.data.global_batch_size * build_task(self.config).tokens_per_row()

    @property
    def flops_per_token(self) -> float:
        return flops.flops_per_token(self.config.model, self.config.data.seq_len, build_task(self.config).decoder_len())

    @property
    def flops(self) -> float:
        return self.tokens * self.flops_per_token

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run_dir)

    def to_json(self) -> dict[str, Any]:
        counts = flops.param_counts(self.config.model)
        return {
            "name": self.name,
            "budget": self.budget,
            "lr": self.lr,
            "lr_source": self.lr_source,
            "seed": self.seed,
            "shape": {key: getattr(self.config.model, key) for key in SHAPE_KEYS},
            "params": self.params,
            "params_total": counts["total"],
            "params_non_embedding": counts["non_embedding"],
            "tokens": self.tokens,
            "steps": self.steps,
            "warmup_steps": self.warmup_steps,
            "global_batch_size": self.config.data.global_batch_size,
            "seq_len": self.config.data.seq_len,
            "flops_per_token": self.flops_per_token,
            "flops": self.flops,
            "flops_error": self.flops / self.budget - 1.0,
            "tokens_per_param": self.tokens / self.params,
            "run_dir": self.config.run_dir,
            "overrides": [] if self.pending else list(self.overrides),
        }


@dataclass(frozen=True)
class SweepPlan:
    sweep: SweepConfig
    base: Config  # base config with base_overrides applied
    runs: tuple[PlannedRun, ...]
    warnings: tuple[str, ...]
    lr_choice: lr_rules.LRChoice | None = None  # what the tuning runs chose (rules grid and mup)

    @property
    def sweep_dir(self) -> Path:
        return Path(self.sweep.sweep_dir)

    @property
    def pending(self) -> list[PlannedRun]:
        return [run for run in self.runs if run.pending]

    def to_json(self) -> dict[str, Any]:
        base = to_dict(self.base)
        base.pop("run_dir")
        return {
            "sweep_dir": self.sweep.sweep_dir,
            "param_convention": self.sweep.param_convention,
            "budgets": list(self.sweep.budgets),
            "predict": to_dict(self.sweep.predict),
            "lr_rule": self.sweep.lr_rule,
            **({"lr_fit": self.sweep.lr_fit} if self.sweep.lr_fit != "per_size" else {}),
            "lr_choice": self.lr_choice.to_json() if self.lr_choice else None,
            "seeds": list(self.sweep.seeds),
            "eval_tokens": self.sweep.eval_tokens,
            "base_config": base,
            "runs": [run.to_json() for run in self.runs],
        }


def _as_override(key: str, value: Any) -> str:
    return f"{key}={json.dumps(value)}"  # JSON scalars and lists are valid YAML: parse_override reads them back


def resolve_base(sweep: SweepConfig, base_dir: Path) -> Config:
    """The base training config with `base_overrides` applied (validated)."""
    if isinstance(sweep.base, dict):
        path, inline = None, flatten_dotted(sweep.base, "base")
    elif isinstance(sweep.base, str) or sweep.base is None:
        path, inline = (base_dir / sweep.base if sweep.base else None), {}
    else:
        raise ConfigError(f"base: expected a config path or a mapping, got {sweep.base!r}")
    overrides = {**inline, **flatten_dotted(sweep.base_overrides, "base_overrides")}
    return load_config(path, [_as_override(k, v) for k, v in overrides.items()])


def _sizes_per_budget(sweep: SweepConfig) -> dict[float, list]:
    sizes = sweep.sizes
    if isinstance(sizes, (list, tuple)):
        return {budget: list(sizes) for budget in sweep.budgets}
    if not isinstance(sizes, dict):
        raise ConfigError(f"sizes: expected a list of sizes or a mapping budget -> list, got {sizes!r}")
    per_budget: dict[float, list] = {}
    for key, entries in sizes.items():
        try:
            budget = float(key)
        except (TypeError, ValueError):
            raise ConfigError(f"sizes: key {key!r} is not a budget (a number of FLOPs)") from None
        match = [b for b in sweep.budgets if math.isclose(b, budget, rel_tol=1e-9)]
        if not match:
            raise ConfigError(f"sizes: budget {key} is not in budgets {list(sweep.budgets)}")
        if not isinstance(entries, (list, tuple)):
            raise ConfigError(f"sizes.{key}: expected a list of sizes, got {entries!r}")
        per_budget[match[0]] = list(entries)
    missing = [format_number(b) for b in sweep.budgets if b not in per_budget]
    if missing:
        raise ConfigError(f"sizes: no sizes for budget(s) {', '.join(missing)}")
    return per_budget


def model_for_size(entry: Any, where: str, base: ModelConfig, sweep: SweepConfig) -> ModelConfig:
    """A size entry -> ModelConfig: a target count {params: N}, or explicit model keys over the base model."""
    if not isinstance(entry, dict) or not entry:
        raise ConfigError(f"{where}: expected a mapping such as {{params: 2e6}} or "
                          f"{{d_model: 128, n_layers: 4, ...}}, got {entry!r}")
    if "params" in entry:
        if len(entry) > 1:
            raise ConfigError(f"{where}: give either params or explicit model keys, not both (got {sorted(entry)})")
        target = entry["params"]
        try:
            target = float(target)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}.params: expected a number, got {target!r}") from None
        return shape_for_params(target, base, sweep.shape, sweep.param_convention)
    return build(ModelConfig, {**to_dict(base), **entry}, prefix=f"{where}.")


def _check(sweep: SweepConfig) -> None:
    if not sweep.sweep_dir:
        raise ConfigError("sweep_dir: required (the folder for plan.json and runs/)")
    if not sweep.budgets or any(b <= 0 for b in sweep.budgets):
        raise ConfigError(f"budgets: expected a non-empty list of positive FLOP counts, got {list(sweep.budgets)}")
    if len(set(sweep.budgets)) != len(sweep.budgets):
        raise ConfigError(f"budgets: each budget once, got {list(sweep.budgets)}")
    if any(lr <= 0 for lr in sweep.lr_grid):
        raise ConfigError(f"lr_grid: learning rates must be > 0, got {list(sweep.lr_grid)}")
    lr_rules.check_rule(sweep.lr_rule, sweep.lr_grid, sweep.lr_fit)
    if len(set(sweep.seeds)) != len(sweep.seeds) or any(seed < 0 for seed in sweep.seeds):
        raise ConfigError(f"seeds: expected distinct integers >= 0, got {list(sweep.seeds)}")
    if sweep.fit.seed_aggregate not in SEED_AGGREGATES:
        raise ConfigError(f"fit.seed_aggregate: expected one of {', '.join(SEED_AGGREGATES)}, got {sweep.fit.seed_aggregate!r}")
    if sweep.eval_tokens < 0:
        raise ConfigError(f"eval_tokens: expected >= 0 (0: the base config's train.eval_batches), got {sweep.eval_tokens}")
    rules = sweep.schedule
    if rules.min_steps < 1 or not 0 < rules.flops_tolerance < 1 or not 0 <= rules.warmup_fraction < 1:
        raise ConfigError("schedule: expected min_steps >= 1, flops_tolerance in (0, 1), warmup_fraction in [0, 1)")
    if sweep.predict.holdout_largest and len(sweep.budgets) < 3:
        raise ConfigError("predict.holdout_largest needs >= 3 budgets (a fit on >= 2, one held out); "
                          f"got {len(sweep.budgets)}")


def steps_for_budget(budget: float, model: ModelConfig, batch_size: int, seq_len: int,
                     rules: ScheduleRules, decoder_len: int | None = None) -> tuple[int, str | None]:
    """(whole steps whose counted FLOPs are closest to budget, why the run must be dropped or None).
    An encoder-decoder row holds `seq_len` encoder and `decoder_len` decoder tokens."""
    flops_per_step = batch_size * (seq_len + (decoder_len or 0)) * flops.flops_per_token(model, seq_len, decoder_len)
    steps = round(budget / flops_per_step)
    if steps < rules.min_steps:
        return steps, f"{budget / flops_per_step:.1f} steps < schedule.min_steps={rules.min_steps}"
    error = steps * flops_per_step / budget - 1.0
    if abs(error) > rules.flops_tolerance:
        return steps, (f"{steps} whole steps give {error:+.2%} of the budget "
                       f"(schedule.flops_tolerance={rules.flops_tolerance})")
    return steps, None


def _planned_run(sweep: SweepConfig, base: Config, budget: float, model: ModelConfig, steps: int, lr: float | None,
                 name: str, where: str, lr_source: str, seed: int | None) -> PlannedRun:
    rules = sweep.schedule
    warmup = min(rules.max_warmup_steps, round(rules.warmup_fraction * steps))
    changes = {
        "run_dir": str(Path(sweep.sweep_dir) / "runs" / name),
        **{f"model.{key}": getattr(model, key) for key in SHAPE_KEYS},
        **{f"model.{key}": value for key, value in to_dict(model).items()
           if key not in SHAPE_KEYS and value != to_dict(base.model)[key]},
        "train.steps": steps,
        "optim.lr": lr if lr is not None else base.optim.lr,
        "optim.schedule": "cosine",
        "optim.min_lr_ratio": rules.min_lr_ratio,
        "optim.warmup_steps": warmup,
        **({"train.final_eval_tokens": sweep.eval_tokens} if sweep.eval_tokens else {}),
        **({"seed": seed} if seed is not None else {}),
    }
    try:
        config = replace(base, **changes)
        validate(config)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    overrides = tuple(_as_override(key, value) for key, value in changes.items())
    return PlannedRun(name, budget, lr, steps, warmup, config, overrides, count_params(model, sweep.param_convention),
                      "pending" if lr is None else lr_source, seed)


def _models_per_budget(sweep: SweepConfig, base: Config) -> tuple[dict[float, list[tuple[str, ModelConfig]]], list[str]]:
    """{budget: [(where, model)]} in plan order, one entry per distinct shape, and the warnings."""
    per_budget, warnings = {}, []
    for budget, entries in sorted(_sizes_per_budget(sweep).items()):
        if not entries:
            raise ConfigError(f"sizes: the list for budget {format_number(budget)} is empty")
        models: dict[int, ModelConfig] = {}  # total parameters -> shape, at this budget
        per_budget[budget] = []
        for i, entry in enumerate(entries):
            where = f"sizes[{i}]" if isinstance(sweep.sizes, (list, tuple)) else f"sizes.{format_number(budget)}[{i}]"
            model = model_for_size(entry, where, base.model, sweep)
            params = count_params(model, sweep.param_convention)
            if "params" in entry and abs(params / float(entry["params"]) - 1.0) > sweep.shape.param_tolerance:
                warnings.append(f"{where}: the closest shape to params={format_number(float(entry['params']))} "
                                f"has {params:,} ({params / float(entry['params']) - 1.0:+.1%}); see the shape rules")
            total = flops.param_counts(model)["total"]
            if total in models:
                if models[total] != model:
                    raise ConfigError(f"{where}: two different shapes at C={format_number(budget)} both have {total:,} "
                                      "parameters; the fit cannot tell them apart")
                warnings.append(f"{where}: same shape as an earlier size at C={format_number(budget)}; planned once")
                continue
            models[total] = model
            per_budget[budget].append((where, model))
    return per_budget, warnings


def plan_sweep(sweep: SweepConfig, base_dir: Path, lr_choice: lr_rules.LRChoice | None = None) -> SweepPlan:
    """Every (budget, size, lr, seed) as a training config whose counted FLOPs match the budget.

    Under lr_rule grid or mup, the runs whose learning rate the tuning runs decide are pending
    until `lr_choice` (from those runs' results, `sweep.choose_learning_rates`) is given."""
    _check(sweep)
    base = resolve_base(sweep, base_dir)
    per_budget, warnings = _models_per_budget(sweep, base)
    smallest = min(per_budget)
    rule = sweep.lr_rule
    if sweep.lr_fit == "power_law" and len(per_budget[smallest]) < 2:
        raise ConfigError(f"lr_fit power_law fits a line through the tuned sizes: C={format_number(smallest)} "
                          f"has {len(per_budget[smallest])} size(s), give >= 2")
    base_width = None
    if rule == "mup":
        base_width = lr_rules.mup_base_width(base.model, [m for _, m in per_budget[smallest]])
        if sweep.lr_grid and base_width not in [m.d_model for _, m in per_budget[smallest]]:
            raise ConfigError(f"lr_rule mup tunes at the base width {base_width} at C={format_number(smallest)}, "
                              f"but no size there has that d_model (widths {[m.d_model for _, m in per_budget[smallest]]})")
    seeds: tuple[int | None, ...] = tuple(sweep.seeds) or (None,)
    runs: list[PlannedRun] = []
    for budget, models in per_budget.items():
        for where, model in models:
            if rule == "mup":  # sizes grow by heads of a fixed size: attention keeps SP's 1/sqrt(head_dim)
                model = dataclasses.replace(model, parameterization="mup", mup_base_width=base_width,
                                            head_dim=model.head_size)
            params = count_params(model, sweep.param_convention)
            total = flops.param_counts(model)["total"]
            steps, drop_reason = steps_for_budget(budget, model, base.data.global_batch_size, base.data.seq_len,
                                                  sweep.schedule, build_task(base).decoder_len())
            if drop_reason:
                warnings.append(f"dropped C={format_number(budget)} N={format_number(params)} ({where}): {drop_reason}")
                continue
            if lr_rules.is_tuning_run(rule, sweep.lr_grid, budget == smallest, model, base_width):
                lrs, source = sweep.lr_grid, "grid"
            elif rule == "fixed" or (rule == "mup" and not sweep.lr_grid):
                lrs, source = sweep.lr_grid or (base.optim.lr,), "fixed"
            elif lr_choice is None:
                lrs, source = (None,), "pending"
            else:
                lr, source = lr_choice.lr_for(total)
                lrs = (lr,)
            for lr in lrs:
                for seed in seeds:
                    name = (f"C{format_number(budget)}_N{total}" + (f"_lr{format_number(lr)}" if len(lrs) > 1 else "")
                            + (f"_s{seed}" if len(seeds) > 1 else ""))
                    runs.append(_planned_run(sweep, base, budget, model, steps, lr, name, where, source, seed))
        sizes_kept = {run.params for run in runs if run.budget == budget}
        if len(sizes_kept) < 3:
            warnings.append(f"budget C={format_number(budget)} has {len(sizes_kept)} size(s); "
                            "an IsoFLOP parabola needs >= 3")
    if not runs:
        raise ConfigError("the sweep plans no runs: every (budget, size) was dropped (" + "; ".join(warnings) + ")")
    if lr_choice is not None:
        warnings += lr_choice.warnings()
    return SweepPlan(sweep, base, tuple(runs), tuple(dict.fromkeys(warnings)), lr_choice)  # a shared size warns once


def format_table(plan: SweepPlan) -> str:
    """The plan as aligned columns, one row per run, with the total compute."""
    header = ("run", "d_model", "layers", "heads", "d_ff", "N total", "N non-emb", "D tokens", "steps",
              "C", "FLOPs/C-1", "D/N", "lr")
    rows = []
    for run in plan.runs:
        m, entry = run.config.model, run.to_json()
        rows.append((run.name, str(m.d_model), str(m.n_layers), str(m.n_heads), str(m.d_ff),
                     f"{entry['params_total']:,}", f"{entry['params_non_embedding']:,}", f"{run.tokens:,}",
                     str(run.steps), format_number(run.budget), f"{entry['flops_error']:+.2%}",
                     f"{entry['tokens_per_param']:.1f}", "pending" if run.pending else format_number(run.lr)))
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in (header, *rows)]
    total = sum(run.flops for run in plan.runs)
    batch = plan.base.data
    lines.append(f"{len(plan.runs)} runs, {format_number(total)} FLOPs in total; batch {batch.global_batch_size} x "
                 f"{batch.seq_len} tokens; D/N with N = {plan.sweep.param_convention} parameters")
    return "\n".join(lines)
