"""Programmatic rewards of (prompt, completion) pairs: the ranking of `lmjax data preferences`.

A reward is a function `(prompt, completion) -> float`, registered by name with `@reward("name")`;
higher is better. Add your own here, or name any importable function as `module:function` (e.g.
`--reward my_rewards:length`, with my_rewards.py on the Python path).
"""

from __future__ import annotations

import ast
import importlib
import warnings
from typing import Callable

from lmjax.errors import UserError

RewardFn = Callable[[str, str], float]
REWARDS: dict[str, RewardFn] = {}


def reward(name: str) -> Callable[[RewardFn], RewardFn]:
    def register(fn: RewardFn) -> RewardFn:
        REWARDS[name] = fn
        return fn

    return register


def get_reward(name: str) -> RewardFn:
    if ":" in name:
        module_name, _, attribute = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as e:
            raise UserError(f"--reward {name}: cannot import it ({e}); expected module:function on the Python path") from None
        if not callable(fn):
            raise UserError(f"--reward {name}: is not a function; expected (prompt, completion) -> float")
        return fn
    if name not in REWARDS:
        raise UserError(f"--reward: expected one of {', '.join(sorted(REWARDS))} or module:function, got {name!r}")
    return REWARDS[name]


def parses(source: str) -> bool:
    """Whether `source` is valid Python (warnings about e.g. invalid escapes are not errors)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ast.parse(source)
        return True
    except (SyntaxError, ValueError, MemoryError, RecursionError):  # ValueError: null bytes
        return False


LENGTH_CHARS = 100  # the length term grows up to this many non-blank characters
LENGTH_WEIGHT = 0.1  # ... and is worth this much: less than parsing, more than nothing


@reward("python_syntax")
def python_syntax(prompt: str, completion: str) -> float:
    """1 if prompt + completion parses as Python, plus a small length term: a docstring alone is a
    valid body, so without it an empty completion would win every comparison."""
    length = min(len("".join(completion.split())), LENGTH_CHARS) / LENGTH_CHARS
    return float(parses(prompt + completion)) + LENGTH_WEIGHT * length
