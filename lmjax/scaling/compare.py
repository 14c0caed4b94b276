"""`lmjax compare`: several sweeps and runs side by side, and the compute multiplier between frontiers.

Sources (positional, each `DIR` or `NAME=DIR`; NAME labels it, the default is the folder's name):
- a sweep directory (plan.json + runs/), a CSV of runs, or a folder holding runs.csv (a committed
  experiment such as experiments/chinchilla_cpu or its holdout/): a "sweep", fitted with both
  Chinchilla approaches (fit.json beside a runs.csv is not read: the intervals need the bootstrap);
- a run directory (summary.json): a "plain run", drawn as loss curves against tokens and FLOPs.

Compute multiplier. At the optimum both loss terms of Approach 3's law scale as (C/6)^-gamma, so
the frontier is L*(C) = L(N_opt(C), D_opt(C)) = E + K (C/6)^-gamma with gamma = alpha beta /
(alpha + beta), K = A G^-alpha + B G^beta. The compute at which a frontier reaches a loss then has
a closed form, exact and vectorised over bootstrap samples (no root search). At the reference
compute C_ref the target is L_A = L*_A(C_ref); B reaches it at C_B = L*_B^-1(L_A) (never when
L_A <= E_B) and the multiplier is C_ref / C_B: "B reaches A's loss with x times less compute"
(x < 1: more). Its interval: 2.5/97.5 percentiles over bootstrap sample i of A paired with sample
i of B. Sources are resampled independently (seed + source index), so two sources sharing runs
(a fit and its holdout) get intervals that are wider than the shared data warrants.

Compute is C = 6ND throughout (fit.json's compute_convention): Approach 3's allocation is derived
under it, so C_ref defaults to the first sweep's largest budget converted to 6ND
(FitResult.largest_budget_6nd), `--at` is read in 6ND, and the loss-vs-compute figure places every
run at 6ND. Only the plain runs' loss-vs-FLOPs curves use the trainer's count (lmjax.flops).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lmjax.errors import UserError
from lmjax.fileio import write_json_atomic, write_text_atomic
from lmjax.scaling.fit import FitResult, fit_scaling_laws, group_by_budget
from lmjax.scaling.report import format_estimate
from lmjax.scaling.runs import RunRecord, RunTable, load_run_table

LAW_KEYS = ("E", "A", "B", "alpha", "beta")
OWN_FILES = ("report.md", "compare.json", "loss_vs_compute.png", "isoflop.png", "loss_vs_tokens.png",
             "loss_vs_flops.png")


class CompareInputError(UserError):
    """A compare source or option that cannot be used as given, reported as one line."""


@dataclass
class PlainRun:
    record: RunRecord  # N under the chosen convention, D, final eval loss
    summary: dict
    flops_per_token: float  # the trainer's count (lmjax.flops), not 6N
    train_curve: np.ndarray  # rows (tokens, train loss) from metrics.jsonl
    eval_curve: np.ndarray  # rows (tokens, eval loss)
    note: str | None = None


@dataclass
class Source:
    label: str
    path: Path
    reader: str  # how it was read: "sweep directory", "CSV", "runs.csv of a folder", "run directory"
    table: RunTable | None = None
    result: FitResult | None = None  # sweeps only
    run: PlainRun | None = None  # plain runs only
    notes: list[str] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return "run" if self.run is not None else "sweep"

    @property
    def law(self) -> dict | None:
        """Approach 3's parameters as numbers, or None when it was not fitted."""
        if self.result is None or isinstance(self.result.approach3, str):
            return None
        return {k: np.float64(getattr(self.result.approach3.law, k)) for k in LAW_KEYS}

    @property
    def law_samples(self) -> dict | None:
        samples = self.result.approach3_samples if self.result is not None else {}
        return {k: np.asarray(samples[k], dtype=np.float64) for k in LAW_KEYS} if samples else None


# ----------------------------------------------------------------------------- frontier arithmetic


def _frontier_terms(law: dict) -> tuple[np.ndarray, np.ndarray]:
    """(log K, gamma) of L*(C) = E + K (C/6)^-gamma, in log space: bootstrap samples can carry a
    huge A or B (a degenerate optimum) whose products overflow; those come out non-finite."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        alpha, beta, log_a, log_b = law["alpha"], law["beta"], np.log(law["A"]), np.log(law["B"])
        log_g = (np.log(alpha) + log_a - np.log(beta) - log_b) / (alpha + beta)
        log_k = np.logaddexp(log_a - alpha * log_g, log_b + beta * log_g)
        return log_k, alpha * beta / (alpha + beta)


def frontier_loss(law: dict, C) -> np.ndarray:
    """L*(C): the loss of the law's compute-optimal allocation at compute C = 6ND (broadcasts)."""
    log_k, gamma = _frontier_terms(law)
    with np.errstate(over="ignore", invalid="ignore"):
        return law["E"] + np.exp(log_k - gamma * np.log(np.asarray(C, dtype=np.float64) / 6.0))


def compute_reaching(law: dict, loss) -> np.ndarray:
    """The compute C (6ND) at which the law's frontier reaches `loss`; inf where loss <= E."""
    log_k, gamma = _frontier_terms(law)
    excess = np.asarray(loss, dtype=np.float64) - law["E"]
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        log_c = math.log(6.0) + (log_k - np.log(np.where(excess > 0, excess, np.nan))) / gamma
        return np.where(excess > 0, np.exp(log_c), np.inf)


def tokens_per_param(law: dict, C) -> np.ndarray:
    """D_opt / N_opt at compute C: (C/6)^(b - a) / G^2 (ScalingLaw.compute_optimal), in log space."""
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        alpha, beta = law["alpha"], law["beta"]
        log_g = (np.log(alpha) + np.log(law["A"]) - np.log(beta) - np.log(law["B"])) / (alpha + beta)
        return np.exp((alpha - beta) / (alpha + beta) * math.log(C / 6.0) - 2 * log_g)


def estimate(value, samples: np.ndarray | None = None) -> dict:
    """fit.json's {"value", "ci_low", "ci_high"}: 95% percentile interval of the finite samples;
    None for a missing or non-finite value (JSON has no inf)."""
    finite = samples[np.isfinite(samples)] if samples is not None else np.empty(0)
    low, high = np.percentile(finite, [2.5, 97.5]) if finite.size else (None, None)
    def number(x) -> float | None:
        return float(x) if x is not None and math.isfinite(x) else None

    return {"value": number(value), "ci_low": number(low), "ci_high": number(high)}


def compute_multiplier(reference: Source, other: Source, C_ref: float) -> dict:
    """How much less compute `other`'s frontier needs to reach `reference`'s frontier loss at C_ref."""
    out = {"reference": reference.label, "other": other.label, "C": C_ref}
    missing = [s.label for s in (reference, other) if s.law is None]
    if missing:
        return {**out, "skipped": f"no Approach 3 law for {', '.join(missing)}"}
    target = frontier_loss(reference.law, C_ref)
    c_other = compute_reaching(other.law, target)
    if np.isnan(c_other):  # a degenerate full-data fit (A or B overflowing): no frontier to read
        return {**out, "skipped": "a non-finite Approach 3 frontier"}
    samples_ref, samples_other = reference.law_samples, other.law_samples
    target_s = c_other_s = multiplier_s = None
    n_usable = n_unreachable = 0
    if samples_ref is not None and samples_other is not None:
        n = min(len(samples_ref["E"]), len(samples_other["E"]))
        target_s = frontier_loss({k: v[:n] for k, v in samples_ref.items()}, C_ref)
        c_other_s = compute_reaching({k: v[:n] for k, v in samples_other.items()}, target_s)
        log_k_other, _ = _frontier_terms({k: v[:n] for k, v in samples_other.items()})
        usable = np.isfinite(target_s) & np.isfinite(log_k_other) & np.isfinite(samples_other["E"][:n])
        # Unreachable (target at or below B's E): infinite compute, multiplier 0; kept in the interval.
        multiplier_s = np.where(usable, C_ref / c_other_s, np.nan)
        n_usable, n_unreachable = int(usable.sum()), int((usable & np.isinf(c_other_s)).sum())
    multiplier = estimate(C_ref / c_other, multiplier_s)
    # C_B's interval from the multiplier's (C_B = C_ref / x): its low end may be unreachable (inf).
    c_interval = {"value": estimate(c_other)["value"],
                  "ci_low": C_ref / multiplier["ci_high"] if multiplier["ci_high"] else None,
                  "ci_high": C_ref / multiplier["ci_low"] if multiplier["ci_low"] else None}
    return {**out, "target_loss": estimate(target, target_s), "C_other": c_interval, "multiplier": multiplier,
            "reachable": bool(np.isfinite(c_other)), "bootstrap_samples": n_usable,
            "unreachable_samples": n_unreachable, "statement": _statement(reference.label, other.label, C_ref,
                                                                           target, multiplier)}


def _statement(ref: str, other: str, C_ref: float, target: float, multiplier: dict) -> str:
    where = f"{ref}'s frontier loss {target:.4g} at C = {C_ref:.3g} (6ND)"
    x = multiplier["value"]
    if x is None or x == 0:
        return f"{other} never reaches {where}: it is at or below {other}'s irreducible loss E"
    interval = (f" [95% CI {multiplier['ci_low']:.3g}, {multiplier['ci_high']:.3g}]"
                if multiplier["ci_low"] is not None else "")
    how = f"{x:.3g}x less compute" if x >= 1 else f"{1 / x:.3g}x more compute (x = {x:.3g})"
    return f"{other} reaches {where} with {how}{interval}"


# ----------------------------------------------------------------------------- reading sources


def split_source(arg: str) -> tuple[str | None, Path]:
    """`NAME=DIR` -> (NAME, DIR); an argument that exists as a path is a path even with '=' in it."""
    if Path(arg).exists() or "=" not in arg:
        return None, Path(arg)
    name, _, path = arg.partition("=")
    if not name or not path:
        raise CompareInputError(f"compare source '{arg}': expected DIR or NAME=DIR")
    return name, Path(path)


def _default_label(path: Path) -> str:
    path = path.resolve()
    if path.is_file():
        return path.parent.name if path.stem == "runs" else path.stem  # runs.csv: its folder names it
    return path.name


def classify_source(arg: str) -> tuple[str, Path, str]:
    """(label, path, how to read it) of one argument; cheap, so every argument is checked before any fit."""
    label, path = split_source(arg)
    if not path.exists():
        raise CompareInputError(f"compare source {path}: no such file or directory")
    if path.is_file():
        reader = "CSV"
    elif (path / "plan.json").is_file() and (path / "runs").is_dir():
        reader = "sweep directory"
    elif (path / "runs.csv").is_file():
        reader = "runs.csv of a folder"
    elif (path / "summary.json").is_file():
        reader = "run directory"
    else:
        raise CompareInputError(f"compare source {path}: expected a sweep directory (plan.json and runs/), a run "
                                "directory (summary.json), a CSV of runs or a folder holding runs.csv")
    return label or _default_label(path), path, reader


def load_source(label: str, path: Path, reader: str, param_convention: str, seed: int, bootstrap: int) -> Source:
    """Reads and (for a sweep) fits one classified source; raises a UserError naming it when it cannot."""
    if reader == "run directory":
        return Source(label, path, reader, run=read_plain_run(path, param_convention))
    table = load_run_table(path / "runs.csv" if reader == "runs.csv of a folder" else path, param_convention)
    source = Source(label, path, reader, table=table)
    if reader != "sweep directory":
        written = _fit_json_convention((path if path.is_dir() else path.parent) / "fit.json")
        source.notes.append(f"N as written in the CSV ({written or 'convention not recorded'}); "
                            "--param-convention does not apply to CSVs")
    source.result = fit_scaling_laws(table.runs, param_convention, seed=seed, bootstrap=bootstrap)
    return source


def _fit_json_convention(path: Path) -> str | None:
    try:
        return f"param_convention {json.loads(path.read_text())['param_convention']} per {path.name}"
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_plain_run(run_dir: Path, param_convention: str) -> PlainRun:
    """A finished run: its summary's N, D, loss and FLOPs per token, and its curves from metrics.jsonl."""
    record = load_run_table(run_dir, param_convention).runs[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    steps = summary.get("steps")
    tokens_per_step = record.tokens / steps if steps else None
    if summary.get("flops_per_token"):
        flops_per_token = float(summary["flops_per_token"])
    elif summary.get("train_flops"):
        flops_per_token = float(summary["train_flops"]) / record.tokens
    else:  # an older summary: count from the run's config, as the trainer does
        flops_per_token = _flops_per_token_from_config(run_dir)
    train, evals, note = [], [], None
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.is_file() else []
    if not lines:
        note = "no metrics.jsonl: only the final point is drawn"
    for line in lines:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
        if not isinstance(entry, dict) or not isinstance(entry.get("step"), int):
            continue
        tokens = entry.get("tokens", entry["step"] * tokens_per_step if tokens_per_step else None)
        for key, rows in (("loss", train), ("eval_loss", evals)):
            value = entry.get(key)  # a non-finite value is logged as a string: left out
            if tokens is not None and isinstance(value, (int, float)) and math.isfinite(value):
                rows.append((float(tokens), float(value)))
    return PlainRun(record, summary, flops_per_token, np.array(train).reshape(-1, 2),
                    np.array(evals).reshape(-1, 2), note)


def _flops_per_token_from_config(run_dir: Path) -> float:
    from lmjax import flops
    from lmjax.config import load_config
    from lmjax.tasks import build_task

    cfg = load_config(run_dir / "config.yaml")
    return flops.flops_per_token(cfg.model, cfg.data.seq_len, build_task(cfg).decoder_len())


# ----------------------------------------------------------------------------- the command


def check_out_dir(out: Path) -> None:
    """--out may be new, empty, or a previous compare output; never another tool's report."""
    if out.exists() and not out.is_dir():
        raise CompareInputError(f"--out {out}: exists and is not a directory")
    if not (out / "compare.json").exists():
        clashing = [name for name in OWN_FILES if (out / name).exists()]
        if clashing:
            raise CompareInputError(f"--out {out}: already holds {', '.join(clashing)} not written by lmjax compare "
                                    "(no compare.json); choose another folder")


def run_compare(sources: list[str], out: str | Path, param_convention: str = "total", at: float | None = None,
                seed: int = 0, bootstrap: int = 200) -> dict:
    """Reads and fits every source, then writes report.md, compare.json and the PNGs into `out`.

    Everything that can fail on the user's input fails before the first file is written."""
    out = Path(out)
    check_out_dir(out)
    if bootstrap < 0:
        raise CompareInputError(f"--bootstrap must be >= 0; got {bootstrap}")
    if at is not None and not (math.isfinite(at) and at > 0):
        raise CompareInputError(f"--at must be a positive compute in FLOPs (6ND); got {at}")
    classified = [classify_source(arg) for arg in sources]
    labels = [label for label, _, _ in classified]
    duplicates = sorted({label for label in labels if labels.count(label) > 1})
    if duplicates:
        raise CompareInputError(f"sources share the label(s) {', '.join(duplicates)}; name them with NAME=DIR")
    loaded = [load_source(*source, param_convention, seed + i, bootstrap) for i, source in enumerate(classified)]
    sweeps = [s for s in loaded if s.kind == "sweep"]
    C_ref = at if at is not None else (sweeps[0].result.largest_budget_6nd if sweeps else None)
    multipliers = [compute_multiplier(sweeps[0], other, C_ref) for other in sweeps[1:]]

    from lmjax.scaling.compare_plots import write_compare_plots  # matplotlib: only once the inputs are good

    out.mkdir(parents=True, exist_ok=True)
    plots = write_compare_plots(loaded, multipliers, C_ref, out)
    result = {"compute_convention": "6ND", "param_convention": param_convention, "bootstrap": bootstrap,
              "seed": seed, "reference_compute": C_ref,
              "reference_compute_from": "--at" if at is not None else (f"largest budget of {sweeps[0].label}"
                                                                       if sweeps else None),
              "sources": [_source_json(s, C_ref) for s in loaded], "multipliers": multipliers, "plots": plots}
    write_json_atomic(out / "compare.json", result)
    write_text_atomic(out / "report.md", render_report(loaded, result))
    return result


def _source_json(source: Source, C_ref: float | None) -> dict:
    out = {"label": source.label, "path": str(source.path), "kind": source.kind, "read_as": source.reader,
           "notes": source.notes}
    if source.run is not None:
        run = source.run
        return {**out, "params": run.record.params, "tokens": run.record.tokens, "final_eval_loss": run.record.loss,
                "final_train_loss": run.summary.get("final_train_loss"), "flops_per_token": run.flops_per_token,
                "train_flops": run.flops_per_token * run.record.tokens,
                "compute_6nd": 6.0 * run.record.params * run.record.tokens, "curve_note": run.note}
    result, table = source.result, source.table
    out.update({"n_runs": len(result.runs), "skipped": table.skipped, "lr_dropped": table.n_lr_dropped,
                "budgets": sorted(group_by_budget(result.runs)), "largest_budget": result.largest_budget,
                "largest_budget_6nd": result.largest_budget_6nd, "fit": result.to_json()})
    if source.law is not None and C_ref is not None:
        samples = source.law_samples
        out["frontier_loss_at_reference"] = estimate(frontier_loss(source.law, C_ref),
                                                     frontier_loss(samples, C_ref) if samples else None)
        out["tokens_per_param_at_reference"] = estimate(tokens_per_param(source.law, C_ref),
                                                        tokens_per_param(samples, C_ref) if samples else None)
    return out


# ----------------------------------------------------------------------------- report.md


def render_report(sources: list[Source], result: dict) -> str:
    sweeps = [s for s in result["sources"] if s["kind"] == "sweep"]
    runs = [s for s in result["sources"] if s["kind"] == "run"]
    C_ref = result["reference_compute"]
    lines = ["# Comparison", "",
             f"- Sources: {', '.join(f'**{s.label}** (`{s.path}`, {s.reader})' for s in sources)}.",
             f"- Parameter convention for N: **{result['param_convention']}** for sweep and run directories. "
             "Compute is C = 6ND throughout (Approach 3's allocation is derived under it), except the plain "
             "runs' loss-vs-FLOPs curves, which use the trainer's count (lmjax.flops).",
             *([] if not sweeps else [
                 f"- Intervals: 2.5/97.5 percentiles of {result['bootstrap']} bootstrap resamples per sweep, each "
                 "resampled independently." if result["bootstrap"] else "- No bootstrap: no intervals."]),
             *[f"- {s['label']}: {note}." for s in result["sources"] for note in s["notes"]]]
    if sweeps:
        lines += ["", "## Fits", "",
                  f"Reference compute C_ref = {C_ref:.3g} FLOPs (6ND; {result['reference_compute_from']}).", "",
                  "| | " + " | ".join(s["label"] for s in sweeps) + " |", "|---" * (len(sweeps) + 1) + "|"]
        for label, cell in _table_rows(C_ref):
            lines.append(f"| {label} | " + " | ".join(cell(s) for s in sweeps) + " |")
        lines += ["", "a, b: exponents of N_opt ∝ C^a, D_opt ∝ C^b against C = 6ND. Approach 2 on a small or "
                  "off-centre grid is biased; see each source's own `lmjax fit` report."]
    if result["multipliers"]:
        lines += ["", "## Compute multipliers", "",
                  "x = C_ref / C_other, where the other frontier reaches the reference frontier's loss at C_ref: "
                  "\"other reaches reference's loss with x times less compute\" (x < 1: more). Interval over "
                  "paired bootstrap samples of both laws.", ""]
        for m in result["multipliers"]:
            if "skipped" in m:
                lines.append(f"- {m['other']} vs {m['reference']}: not computed ({m['skipped']}).")
                continue
            unreachable = (f"; {m['unreachable_samples']} of {m['bootstrap_samples']} samples never reach it"
                           if m["unreachable_samples"] else "")
            c_other = m["C_other"]
            if c_other["ci_low"] is not None and c_other["ci_high"] is None:  # some samples never reach it
                reached = f"{c_other['value']:.3g} [{c_other['ci_low']:.3g}, never]"
            else:
                reached = format_estimate(c_other) if c_other["value"] is not None else "never"
            lines.append(f"- **{m['statement']}**. C_other = {reached}{unreachable}.")
    if runs:
        lines += ["", "## Plain runs", "", "| run | N | tokens D | training FLOPs (counted) | 6ND | final eval loss "
                  "| final train loss |", "|---|---|---|---|---|---|---|"]
        for r in runs:
            train = r["final_train_loss"]
            lines.append(f"| {r['label']} | {r['params']:.4g} | {r['tokens']:.4g} | {r['train_flops']:.4g} | "
                         f"{r['compute_6nd']:.4g} | {r['final_eval_loss']:.4f} | "
                         f"{'n/a' if train is None else f'{train:.4f}'} |")
        lines += [f"- {r['label']}: {r['curve_note']}." for r in runs if r["curve_note"]]
    lines += ["", "## Plots", ""] + [f"![{name[:-4]}]({name})" for name in result["plots"]]
    return "\n".join(lines) + "\n"


def _table_rows(C_ref: float):
    """(row label, cell(source json) -> text) of the side-by-side fit table."""
    def fit(part: str, key: str):
        def cell(s: dict) -> str:
            section = s["fit"]["approach3" if part == "a3" else "isoflop"]
            return "skipped" if "skipped" in section else format_estimate(section.get(key))
        return cell

    return (
        ("runs in fit (skipped, worse lr dropped)", lambda s: f"{s['n_runs']} ({len(s['skipped'])}, {s['lr_dropped']})"),
        ("budgets C (as counted)", lambda s: ", ".join(f"{c:.2g}" for c in s["budgets"])),
        ("largest budget in 6ND", lambda s: f"{s['largest_budget_6nd']:.3g}"),
        *((f"Approach 3 {key}", fit("a3", key)) for key in ("E", "alpha", "beta", "a", "b")),
        ("Approach 3 tokens per parameter at own largest budget", fit("a3", "tokens_per_param")),
        (f"Approach 3 tokens per parameter at C_ref = {C_ref:.3g}",
         lambda s: format_estimate(s.get("tokens_per_param_at_reference"))),
        (f"Approach 3 frontier loss at C_ref = {C_ref:.3g}", lambda s: format_estimate(s.get("frontier_loss_at_reference"), 4)),
        *((f"Approach 2 {key}", fit("a2", key)) for key in ("a", "b")),
    )


def print_compare(result: dict, out: Path) -> None:
    for m in result["multipliers"]:
        print(m.get("statement") or f"{m['other']} vs {m['reference']}: not computed ({m['skipped']})")
    print(f"report: {out / 'report.md'} ({', '.join(result['plots'])}, compare.json)")
