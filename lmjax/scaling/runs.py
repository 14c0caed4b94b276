"""The table of finished runs a scaling-law fit reads: from a CSV, run directories or a sweep.

Every source becomes a list of `RunRecord`s. Sources:

- a CSV with columns `params,tokens,loss` (optional `flops`, `budget`, `name`, `lr`, `loss_stderr`,
  `seed`; others ignored);
- a run directory holding the trainer's `summary.json`, or a list of them;
- a sweep directory holding `plan.json` and `runs/<name>/summary.json`.

Runs whose `status` is not "completed" are skipped and counted. Runs that differ only by their
seed are one point of the fit, at their mean loss (or median: one stalled seed in three moves a mean
by a third of its excess and a median not at all), with the seeds' losses kept to show the spread
(`average_seeds`). Several learning rates tried at one (budget, size) leave only the best one in the
fit (`select_best_lr`), since the compute-optimal frontier is defined by well-tuned runs (Porian et
al. 2024).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import yaml

from lmjax.errors import UserError

PARAM_CONVENTIONS = ("total", "non_embedding", "non_embedding_with_head", "active")
_REQUIRED_CSV_COLUMNS = ("params", "tokens", "loss")
_OPTIONAL_CSV_NUMBERS = ("flops", "budget", "lr", "loss_stderr")
SEED_AGGREGATES = ("mean", "median")
_SUMMARY_KEYS = ("final_eval_loss", "params_total", "params_non_embedding", "params_output_head", "tokens")


class FitInputError(UserError):
    """A run table that cannot be fitted as given, reported as one line."""


@dataclass(frozen=True)
class RunRecord:
    """One finished run: N (under the chosen convention), D, final eval loss, and its compute."""

    name: str
    params: float
    tokens: float
    loss: float
    flops: float | None = None  # measured training FLOPs of the run (trainer's count)
    budget: float | None = None  # planned compute budget C of the IsoFLOP group it belongs to
    lr: float | None = None
    loss_stderr: float | None = None  # standard error of `loss` over its eval batches (summary.json)
    seed: int | None = None
    seed_losses: tuple[float, ...] = ()  # an aggregate of several seeds: each one's loss (`loss` is their mean or median)

    @property
    def seed_spread(self) -> float | None:
        """Standard deviation of the seeds' losses (ddof 1); None for a single run."""
        if len(self.seed_losses) < 2:
            return None
        mean = sum(self.seed_losses) / len(self.seed_losses)
        return math.sqrt(sum((x - mean) ** 2 for x in self.seed_losses) / (len(self.seed_losses) - 1))


@dataclass
class RunTable:
    """The runs that enter the fit, and what was left out on the way."""

    runs: list[RunRecord]
    default_out_dir: Path
    skipped: dict[str, str] = field(default_factory=dict)  # run name -> why it is not in the fit
    n_lr_dropped: int = 0  # runs beaten by another learning rate at the same (budget, size)
    completed: list[RunRecord] = field(default_factory=list)  # every completed run, before averaging and selection
    seed_aggregate: str = "mean"  # how runs that differ only by seed became one point (SEED_AGGREGATES)


def load_runs(source: str | os.PathLike | list, param_convention: str = "total") -> list[RunRecord]:
    """The runs of `source` that enter the fit (best learning rate per budget and size)."""
    return load_run_table(source, param_convention).runs


def load_run_table(source: str | os.PathLike | list, param_convention: str = "total",
                   seed_aggregate: str = "mean") -> RunTable:
    """Reads `source` (CSV, run directory, list of run directories or sweep directory); runs that
    differ only by seed enter the fit at their `seed_aggregate` ("mean" or "median")."""
    _check_convention(param_convention)
    if seed_aggregate not in SEED_AGGREGATES:
        raise FitInputError(f"seed aggregate '{seed_aggregate}': expected one of {', '.join(SEED_AGGREGATES)}")
    if isinstance(source, (list, tuple)):
        if not source:
            raise FitInputError("fit source: the list of run directories is empty")
        dirs = [_existing(path) for path in source]
        runs, skipped = _read_run_dirs(dirs, param_convention)
        out_dir = dirs[0] if len(dirs) == 1 else Path(os.path.commonpath([d.resolve() for d in dirs]))
    else:
        path = _existing(source)
        if path.is_file():
            runs, skipped, out_dir = _read_csv(path), {}, path.parent
        elif (path / "plan.json").is_file():
            runs, skipped = _read_sweep(path, param_convention)
            out_dir = path
        elif (path / "summary.json").is_file():
            runs, skipped = _read_run_dirs([path], param_convention)
            out_dir = path
        else:
            raise FitInputError(f"fit source {path}: expected a CSV file, a run directory with summary.json "
                                "or a sweep directory with plan.json")
    kept, n_dropped = select_best_lr(average_seeds(runs, seed_aggregate))
    if not kept:
        why = "; ".join(f"{name}: {reason}" for name, reason in skipped.items())
        raise FitInputError(f"fit source {source}: no completed runs to fit" + (f" (skipped {why})" if why else ""))
    return RunTable(runs=kept, default_out_dir=out_dir, skipped=skipped, n_lr_dropped=n_dropped, completed=runs,
                    seed_aggregate=seed_aggregate)


def average_seeds(runs: list[RunRecord], aggregate: str = "mean") -> list[RunRecord]:
    """One record per setting (budget, N, D, lr): its seeds' mean (or median) loss, each seed's loss kept.

    Runs that share all four differ only by their seed (or are repeats), so they are samples of one
    point of the fit; averaging them, not fitting each, keeps the bootstrap's unit a setting. The
    mean's standard error combines the seeds' spread: std / sqrt(seeds); the median's of three or
    more, for normal noise, is sqrt(pi / 2) times that (the large-sample ratio; for three seeds the
    exact one is ~1.16, so this is slightly conservative)."""
    groups: dict[tuple, list[RunRecord]] = {}
    for run in runs:
        groups.setdefault((run.budget, run.params, run.tokens, run.lr), []).append(run)
    averaged = []
    for group in groups.values():
        if len(group) == 1:
            averaged.append(group[0])
            continue
        losses = tuple(r.loss for r in group)
        flops = [r.flops for r in group if r.flops is not None]
        record = RunRecord(
            name=_common_name([r.name for r in group]), params=group[0].params, tokens=group[0].tokens,
            loss=statistics.median(losses) if aggregate == "median" else statistics.fmean(losses),
            flops=sum(flops) / len(flops) if flops else None, budget=group[0].budget, lr=group[0].lr, seed_losses=losses)
        median_of_3_or_more = aggregate == "median" and len(losses) > 2  # of two, the median is the mean
        stderr = record.seed_spread / math.sqrt(len(losses)) * (math.sqrt(math.pi / 2) if median_of_3_or_more else 1)
        averaged.append(dataclasses.replace(record, loss_stderr=stderr))
    return averaged


def _common_name(names: list[str]) -> str:
    """`C1e12_N4000_s0`, `C1e12_N4000_s1` -> `C1e12_N4000`: the shared prefix without a trailing separator."""
    prefix = re.sub(r"([_-]s(eed)?)?[_-]*$", "", os.path.commonprefix(names))
    return prefix or names[0]


def select_best_lr(runs: list[RunRecord]) -> tuple[list[RunRecord], int]:
    """Keeps the lowest-loss run per (budget, params); returns (kept runs, number dropped).

    Runs at one budget and size differ only in their hyperparameters (an LR sweep), so only the
    best one is on the compute-optimal frontier. Without a budget, (params, tokens) identifies
    the run instead, so a plain (N, D) grid is never thinned.
    """
    def setting(run: RunRecord) -> tuple:
        return (run.budget, run.params) if run.budget is not None else (None, run.params, run.tokens)

    best: dict[tuple, RunRecord] = {}
    for run in runs:
        if setting(run) not in best or run.loss < best[setting(run)].loss:
            best[setting(run)] = run
    kept = [run for run in runs if best[setting(run)] is run]
    return kept, len(runs) - len(kept)


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise FitInputError(f"fit source {path}: no such file or directory")
    return path


def _positive(value: object, where: str, column: str) -> float:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise FitInputError(f"{where}, column '{column}': '{value}' is not a number") from None
    if not math.isfinite(number) or number <= 0:
        raise FitInputError(f"{where}, column '{column}': {value} must be a positive finite number")
    return number


def _read_csv(path: Path) -> list[RunRecord]:
    with path.open(newline="") as handle:
        reader = csv.DictReader(handle)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in _REQUIRED_CSV_COLUMNS if c not in columns]
        if missing:
            raise FitInputError(f"{path}: missing column(s) {', '.join(missing)}; expected at least "
                                f"{','.join(_REQUIRED_CSV_COLUMNS)} (found {','.join(columns) or 'no header'})")
        runs = []
        for row_number, raw in enumerate(reader, start=1):
            row = {k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in raw.items() if k is not None}
            where = f"{path} row {row_number} (line {row_number + 1})"
            values = {c: _positive(row[c], where, c) for c in _REQUIRED_CSV_COLUMNS}
            optional = {c: _positive(row[c], where, c) for c in _OPTIONAL_CSV_NUMBERS if row.get(c) not in (None, "")}
            if row.get("seed") not in (None, ""):
                optional["seed"] = _seed(row["seed"], where)
            runs.append(RunRecord(name=row.get("name") or f"row{row_number}", **values, **optional))
    return runs


def _seed(value: str, where: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise FitInputError(f"{where}, column 'seed': '{value}' is not an integer") from None


def _read_sweep(sweep_dir: Path, param_convention: str) -> tuple[list[RunRecord], dict[str, str]]:
    plan_path = sweep_dir / "plan.json"
    try:
        plan = {entry["name"]: entry for entry in json.loads(plan_path.read_text())["runs"]}
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise FitInputError(f"{plan_path}: expected a JSON object with 'runs': [{{'name': ..., 'budget': ...}}, ...] "
                            f"({type(err).__name__}: {err})") from None
    present, skipped = [], {}
    for name in plan:
        if (sweep_dir / "runs" / name / "summary.json").is_file():
            present.append(sweep_dir / "runs" / name)
        else:
            skipped[name] = "no summary.json (not run or not finished)"
    runs, more_skipped = _read_run_dirs(present, param_convention, plan)
    return runs, {**skipped, **more_skipped}


def _read_run_dirs(
    dirs: list[Path], param_convention: str, plan: dict[str, dict] | None = None
) -> tuple[list[RunRecord], dict[str, str]]:
    """Reads each run's summary.json; a sweep's plan entry, when given, supplies budget and lr."""
    runs, skipped = [], {}
    for run_dir in dirs:
        summary_path = run_dir / "summary.json"
        if not summary_path.is_file():
            raise FitInputError(f"{run_dir}: no summary.json; expected a finished lmjax run directory")
        try:
            summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError as err:
            raise FitInputError(f"{summary_path}: not valid JSON ({err})") from None
        status = summary.get("status", "completed")
        if status != "completed":
            skipped[run_dir.name] = f"status '{status}'"
            continue
        missing = [k for k in _SUMMARY_KEYS if k not in summary]
        if missing:
            raise FitInputError(f"{summary_path}: missing key(s) {', '.join(missing)}")
        where = str(summary_path)
        entry = (plan or {}).get(run_dir.name, {})
        budget, lr = entry.get("budget", summary.get("budget")), entry.get("lr", summary.get("lr"))
        runs.append(RunRecord(
            name=run_dir.name,
            params=_positive(_summary_param_count(summary, param_convention, run_dir), where,
                             f"params ({param_convention})"),
            tokens=_positive(summary["tokens"], where, "tokens"),
            loss=_positive(summary["final_eval_loss"], where, "final_eval_loss"),
            flops=_positive(summary["train_flops"], where, "train_flops") if summary.get("train_flops") else None,
            budget=_positive(budget, where, "budget") if budget is not None else None,
            lr=float(lr) if lr is not None else None,
            loss_stderr=summary.get("final_eval_loss_stderr"),
            seed=entry.get("seed"),
        ))
    return runs, skipped


def params_under_convention(counts: Mapping[str, float | None], convention: str,
                            tied_head: float | Callable[[], float], source: str = "param counts") -> float:
    """N under a parameter convention, from `lmjax.flops.param_counts`' split.

    `counts` holds total, non_embedding, output_head and active (None when unknown, as in a
    summary.json written by an older lmjax). flops.param_counts puts an untied output head inside
    `non_embedding` already, so `non_embedding_with_head` adds `tied_head` (vocab x d_model, or a
    callable returning it, called only when needed) for a tied head only. `active` is what one
    token uses (MoE: router, shared and top-k routed experts; dense: total). `source` names where
    the counts come from in errors.
    """
    _check_convention(convention)
    if convention == "total":
        return counts["total"]
    if convention == "active":
        if counts.get("active") is None:
            raise FitInputError(f"{source}: param_convention 'active' needs params_active, "
                                "which this run's summary lacks (written by an older lmjax)")
        return counts["active"]
    if convention == "non_embedding" or counts["output_head"] > 0:
        return counts["non_embedding"]
    return counts["non_embedding"] + (tied_head() if callable(tied_head) else tied_head)  # non_embedding_with_head


def _check_convention(convention: str) -> None:
    if convention not in PARAM_CONVENTIONS:
        raise FitInputError(f"param_convention '{convention}' is unknown; expected one of {PARAM_CONVENTIONS}")


def _summary_param_count(summary: dict, param_convention: str, run_dir: Path) -> float:
    """N of a finished run from its summary.json; a tied head's size comes from its config.yaml."""
    def tied_head() -> int:
        config_path = run_dir / "config.yaml"
        try:
            model = yaml.safe_load(config_path.read_text())["model"]
            return int(model["vocab_size"]) * int(model["d_model"])
        except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError) as err:
            raise FitInputError(f"{config_path}: param_convention 'non_embedding_with_head' of a tied-embedding "
                                f"run needs model.vocab_size and model.d_model from the run's config.yaml ({err})"
                                ) from None

    counts = {key: summary.get(f"params_{key}") for key in ("total", "non_embedding", "output_head", "active")}
    return params_under_convention(counts, param_convention, tied_head, source=f"{run_dir}/summary.json")
