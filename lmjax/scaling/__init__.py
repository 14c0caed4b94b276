"""Scaling studies: sweep planning, and Chinchilla-style fits of the finished runs.

The fit reads runs (`runs.py`), fits Approaches 2 and 3 with bootstrap intervals (`fit.py`), draws
the figures (`plots.py`) and writes fit.json + report.md (`report.py`, entry point `run_fit`).
Import the submodules directly; nothing is imported here so that planning a sweep does not load
matplotlib.
"""
