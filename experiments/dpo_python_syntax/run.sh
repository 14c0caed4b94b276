#!/usr/bin/env bash
# The whole post-training chain on CPU: pretrain -> SFT -> sample and rank -> DPO (three betas),
# then the held-out evaluation and the plot (about 100 minutes on 2 cores). Every step resumes,
# or is skipped when its output exists, so rerunning continues where it stopped.
set -euo pipefail
cd "$(dirname "$0")/../.."
EXP=runs/dpo_exp
OUT=experiments/dpo_python_syntax/results
LMJAX=.venv/bin/lmjax
mkdir -p "$OUT"

# 1. Pretraining: configs/dense_tiny.yaml for 2000 steps (4.1M tokens of the standard library).
$LMJAX train configs/dense_tiny.yaml run_dir=$EXP/pretrain train.steps=2000 train.eval_every=500 train.checkpoint_every=500

# 2. SFT on docstring -> body chats (configs/sft_tiny.yaml), started from the pretrained run.
[ -f runs/data/functions.jsonl ] || $LMJAX data sft-from-corpus --out runs/data/functions.jsonl
$LMJAX train configs/sft_tiny.yaml run_dir=$EXP/sft train.init_from=$EXP/pretrain train.steps=600 train.eval_every=200 \
  train.checkpoint_every=200

# 3. Preference pairs: 8 samples (temperature 1) per prompt from the SFT run, ranked by
#    python_syntax; a pair is kept when one completion parses and the other does not (margin 0.5).
#    The first 1200 training prompts of at most 128 tokens (sampling is the slow part on CPU: about
#    16 completions per second); validation pairs from the validation prompts the same way.
PREFS="--reward python_syntax --samples 8 --max-new-tokens 128 --max-prompt-tokens 128 --min-margin 0.5"
[ -f $EXP/preferences.jsonl ] || $LMJAX data preferences $EXP/sft --prompts runs/data/functions.jsonl --max-prompts 1200 \
  $PREFS --out $EXP/preferences.jsonl
[ -f $EXP/preferences.val.jsonl ] || $LMJAX data preferences $EXP/sft --prompts runs/data/functions.val.jsonl \
  $PREFS --out $EXP/preferences.val.jsonl

# 4. DPO from the SFT run (configs/dpo_tiny.yaml, sigmoid loss) for three betas.
for beta in 0.03 0.1 0.3; do
  $LMJAX train configs/dpo_tiny.yaml run_dir=$EXP/dpo_beta$beta train.init_from=$EXP/sft dpo.beta=$beta \
    "data.paths=[$EXP/preferences.jsonl]" "data.val_paths=[$EXP/preferences.val.jsonl]" train.keep_checkpoints=10
done

# 5. Held-out evaluation at temperature 1 (parse rate, reward, KL to the SFT run) and the plot.
EVAL=".venv/bin/python experiments/dpo_python_syntax/evaluate.py --prompts runs/data/functions.val.jsonl --reference $EXP/sft --out $OUT/evals.jsonl"
$EVAL $EXP/pretrain $EXP/sft
for beta in 0.03 0.1 0.3; do
  $EVAL $EXP/dpo_beta$beta@100 $EXP/dpo_beta$beta@200
done
.venv/bin/python experiments/dpo_python_syntax/plot.py $OUT/evals.jsonl $OUT
