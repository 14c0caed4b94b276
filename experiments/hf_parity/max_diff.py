"""Max |lmjax - transformers| logits of every architecture case of tests/test_hf_parity.py.

    .venv/bin/python experiments/hf_parity/max_diff.py

Each case: a random transformers model with every norm weight and bias moved off 1/0, saved with
save_pretrained, read by `lmjax.load_model`; the difference is taken on the real (unpadded) positions.
"""

import pathlib
import sys
import tempfile

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tests"))
from test_hf_parity import CASES, hf_logits, inputs, random_hf_model, real_positions  # noqa: E402

from lmjax import load_model  # noqa: E402

for case in CASES:
    directory = pathlib.Path(tempfile.mkdtemp())
    hf = random_hf_model(case)
    hf.save_pretrained(directory)
    feed = inputs(case)
    where = real_positions(case, feed)
    got, want = np.asarray(load_model(directory).logits(**feed)), hf_logits(hf, feed)
    print(f"| {case} | {np.abs(got[where] - want[where]).max():.1e} |", flush=True)
