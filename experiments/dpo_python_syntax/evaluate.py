"""Parse rate and KL to the reference of runs, on held-out prompts, at temperature 1.

    .venv/bin/python experiments/dpo_python_syntax/evaluate.py --prompts runs/data/functions.val.jsonl \
        --reference runs/dpo_exp/sft --out experiments/dpo_python_syntax/results/evals.jsonl RUN_DIR[@STEP] ...

For each run (its latest checkpoint, or STEP), `--samples` completions of every held-out prompt
whose prompt has at most `--max-prompt-tokens` tokens (the same prompts for every run), sampled at
temperature 1 with no top-k/top-p, so they are samples of the policy itself:
- parse: the fraction of samples for which prompt + completion parses as Python (`ast`), with a
  95% Wilson interval over samples and a 95% interval from a bootstrap over prompts (samples of one
  prompt are not independent);
- reward: the mean `python_syntax` reward (parse + the small length term);
- kl: the mean over samples of log pi(y|x) - log ref(y|x), summed over the completion's tokens
  (its end-of-turn included): a Monte-Carlo estimate of KL(pi || ref) in nats per completion, with
  ref = `--reference` (the SFT run DPO starts from). Only for chat runs (sft, dpo).
A pretrained (non-chat) run continues the raw prompt; its completion is cut where the function
ends (the first line that starts at column 0), since it would otherwise go on to the next
definition. One JSON line per run is appended to `--out` (rerunning a run replaces its line).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import jax
import numpy as np

from lmjax.evaluate import load_run
from lmjax.preferences import Sampler, read_prompts
from lmjax.rewards import get_reward, parses


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    center, half = (p + z * z / (2 * n)) / (1 + z * z / n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return center - half, center + half


def bootstrap_over_prompts(per_prompt: np.ndarray, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = per_prompt[rng.integers(0, len(per_prompt), (resamples, len(per_prompt)))].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def function_body(text: str) -> str:
    """A raw continuation up to the end of the function (the first line starting at column 0)."""
    match = re.search(r"\n(?=\S)", text)
    return text[: match.start() + 1] if match else text


def load_sampler(spec: str) -> tuple[Sampler, str, int]:
    run_dir, _, step = spec.partition("@")
    sampler = Sampler.load(Path(run_dir))
    if step:
        single_device = [f"mesh.{axis}=1" for axis in ("data", "fsdp", "tensor", "expert")]
        sampler.run = load_run(Path(run_dir), single_device, devices=jax.devices()[:1], step=int(step))
    return sampler, run_dir, sampler.run.step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="RUN_DIR or RUN_DIR@STEP")
    parser.add_argument("--prompts", required=True)
    parser.add_argument("--reference", required=True, help="the run KL is measured against (chat runs)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-prompt-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch-rows", type=int, default=64, help="rows per sampling batch (speed only)")
    args = parser.parse_args(argv)

    reference = Sampler.load(Path(args.reference))
    records = read_prompts(Path(args.prompts))
    prompts = [p for _, p in records if len(reference.prompt_ids(p)) <= args.max_prompt_tokens]
    reward = get_reward("python_syntax")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for spec in args.runs:
        start = time.perf_counter()
        sampler, run_dir, step = load_sampler(spec)
        completions = sampler.sample(prompts, args.samples, args.max_new_tokens, temperature=1.0, seed=args.seed,
                                     batch_rows=args.batch_rows, progress=True)
        chat = sampler.template is not None
        texts = [[c.text if chat else function_body(c.text) for c in options] for options in completions]
        parsed = np.asarray([[parses(p + t) for t in options] for p, options in zip(prompts, texts)], np.float64)
        rewards = np.asarray([[reward(p, t) for t in options] for p, options in zip(prompts, texts)])
        result = {
            "run": run_dir, "step": step, "objective": sampler.run.cfg.train.objective,
            "beta": sampler.run.cfg.dpo.beta if sampler.run.cfg.train.objective == "dpo" else None,
            "prompts": len(prompts), "samples": int(parsed.size),
            "parse": float(parsed.mean()), "parse_wilson95": wilson(int(parsed.sum()), parsed.size),
            "parse_bootstrap95": bootstrap_over_prompts(parsed.mean(axis=1)),
            "reward": float(rewards.mean()),
            "stopped": float(np.mean([[c.ids[-1:] == (sampler.stop_id,) for c in options] for options in completions])),
            "completion_tokens": float(np.mean([[len(c.ids) for c in options] for options in completions])),
        }
        if chat:
            flat_prompts = [p for p, options in zip(prompts, completions) for _ in options]
            flat = [c for options in completions for c in options]
            policy = sampler.completion_logps(flat_prompts, flat, batch_rows=args.batch_rows)
            ref = sampler.completion_logps(flat_prompts, flat, params=reference.run.params, batch_rows=args.batch_rows)
            kl = policy - ref
            result.update(kl=float(kl.mean()), kl_stderr=float(kl.std(ddof=1) / math.sqrt(len(kl))))
        result["seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps(result), flush=True)
        kept = [line for line in (out.read_text().splitlines() if out.exists() else [])
                if (json.loads(line)["run"], json.loads(line)["step"]) != (run_dir, step)]
        out.write_text("".join(line + "\n" for line in [*kept, json.dumps(result)]))


if __name__ == "__main__":
    sys.exit(main())
