#!/usr/bin/env bash
# The T5 study end to end on CPU (about 45 minutes on 2 cores): span-corruption pretraining,
# the docstring -> body data, fine-tuning from the pretrained run and the same run from scratch.
# Every step resumes or is skipped when rerun.
set -euo pipefail
cd "$(dirname "$0")/../.."
.venv/bin/lmjax train configs/t5_tiny.yaml
[ -f runs/data/functions.jsonl ] || .venv/bin/lmjax data sft-from-corpus --out runs/data/functions.jsonl
.venv/bin/lmjax train experiments/t5_cpu/seq2seq_finetune.yaml
.venv/bin/lmjax train experiments/t5_cpu/seq2seq_scratch.yaml
.venv/bin/python experiments/t5_cpu/plot.py runs/t5_tiny runs/t5_seq2seq_finetuned runs/t5_seq2seq_scratch experiments/t5_cpu
