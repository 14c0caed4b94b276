"""L-BFGS for many independent small problems at once, vectorised over the problems with numpy.

Chinchilla's Approach 3 (lmjax/scaling/fit.py) minimises one 5-parameter objective from each of
4,500 starting points; advancing all of them in lockstep makes the grid take seconds, where a loop
of scipy.optimize.minimize calls spends most of its time in per-call overhead.
"""

from __future__ import annotations

import numpy as np


def _dot(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.einsum("kp,kp->k", u, v)


def lbfgs_batch(objective, x0: np.ndarray, memory: int = 10, max_iter: int = 500, rel_tol: float = 1e-9,
                max_halvings: int = 50) -> tuple[np.ndarray, np.ndarray]:
    """Independent L-BFGS minimisations of K problems advanced in lockstep, vectorised over K.

    `objective(x, rows)` returns values and gradients of problems `rows` at x. Each problem has its
    own history (two-loop recursion), backtracking Armijo step and stopping test (relative
    decrease below rel_tol, or no decrease found); a stopped problem is no longer evaluated.
    """
    x = np.array(x0, dtype=np.float64)
    n_problems, n_dims = x.shape
    f, g = objective(x, np.arange(n_problems))
    steps = np.zeros((n_problems, memory, n_dims))
    changes = np.zeros_like(steps)  # gradient changes
    inv_curvature = np.zeros((n_problems, memory))  # 1 / (s . y); 0 marks an empty slot
    scale = 1.0 / np.maximum(np.linalg.norm(g, axis=1), 1e-300)  # initial inverse Hessian s.y / y.y
    active = np.isfinite(f)
    for iteration in range(max_iter):
        rows = np.flatnonzero(active)
        if rows.size == 0:
            break
        grad, s_hist, y_hist, rho = g[rows], steps[rows], changes[rows], inv_curvature[rows]
        newest_first = [(iteration - 1 - j) % memory for j in range(memory)]
        q, alphas = grad.copy(), np.zeros((rows.size, memory))
        for j in newest_first:
            alphas[:, j] = rho[:, j] * _dot(s_hist[:, j], q)
            q -= alphas[:, j, None] * y_hist[:, j]
        direction = scale[rows, None] * q
        for j in reversed(newest_first):
            direction += s_hist[:, j] * (alphas[:, j] - rho[:, j] * _dot(y_hist[:, j], direction))[:, None]
        direction = -direction
        slope = _dot(direction, grad)
        no_descent = ~(slope < 0)
        if no_descent.any():  # a stale history: forget it and take a steepest-descent step
            direction[no_descent] = -scale[rows[no_descent], None] * grad[no_descent]
            inv_curvature[rows[no_descent]] = 0.0
            slope[no_descent] = _dot(direction[no_descent], grad[no_descent])
        step = np.ones(rows.size)
        f_new, g_new = objective(x[rows] + direction, rows)
        searching = ~(f_new <= f[rows] + 1e-4 * slope)
        for _ in range(max_halvings):
            if not searching.any():
                break
            idx = np.flatnonzero(searching)
            step[idx] *= 0.5
            f_new[idx], g_new[idx] = objective(x[rows[idx]] + step[idx, None] * direction[idx], rows[idx])
            searching[idx] = ~(f_new[idx] <= f[rows[idx]] + 1e-4 * step[idx] * slope[idx])
        moved = ~searching
        s, y = step[:, None] * direction, g_new - grad
        sy, yy = _dot(s, y), _dot(y, y)
        keep = moved & (yy > 0) & (sy > 1e-10 * yy)  # positive curvature keeps the inverse Hessian positive
        slot = iteration % memory
        steps[rows, slot], changes[rows, slot] = s * keep[:, None], y * keep[:, None]
        inv_curvature[rows, slot] = np.where(keep, 1.0 / np.where(keep, sy, 1.0), 0.0)
        scale[rows[keep]] = sy[keep] / yy[keep]
        decrease = np.where(moved, f[rows] - f_new, 0.0)
        x[rows[moved]] += s[moved]
        f[rows[moved]], g[rows[moved]] = f_new[moved], g_new[moved]
        active[rows[~moved | (decrease <= rel_tol * np.abs(f[rows]))]] = False
    return x, f
