"""Environment switches that turn one of lmjax's defaults off (LMJAX_XLA_CPU_DEFAULTS,
LMJAX_HUGEPAGE_MALLOC, LMJAX_JEMALLOC, LMJAX_STABLEHLO_REWRITE); each default's docstring says
what it does. Imports nothing heavy: the CLI reads some before jax starts."""

from __future__ import annotations

import os
from typing import Mapping

OFF = ("0", "off", "false")


def switched_off(variable: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether the environment variable (in `environ`, default this process's) says off (0, off or
    false, in any case)."""
    return (os.environ if environ is None else environ).get(variable, "").lower() in OFF
