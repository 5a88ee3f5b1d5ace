"""The multiple-choice knapsack under the automatic chooser: one option per layer, the least total error whose total
cost fits the budget.

    minimize Σ_i e[i][c_i]   subject to   Σ_i b[i][c_i] ≤ B,   one option c_i per layer i

Exact dynamic programming over the budget left above the cheapest option of every layer. Costs are bytes (integers);
the DP's cell is their greatest common divisor when the budget in those cells is at most MAX_CELLS (then the result is
the exact optimum), else budget / MAX_CELLS bytes with every cost rounded *up* to whole cells (the result is optimal
for the rounded costs and never exceeds the budget; `Solution.cell` says which). A final pass spends the bytes the
rounding left over on the single-layer upgrades that lower the error most, while they fit exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MAX_CELLS = 1 << 16  # DP columns: memory is layers × MAX_CELLS bytes of back-pointers


class Infeasible(ValueError):
    """Even the cheapest option of every layer exceeds the budget; `least` is what that costs."""

    def __init__(self, least: int, budget: int):
        super().__init__(f"the cheapest choice costs {least} bytes, the budget is {budget}")
        self.least, self.budget = least, budget


@dataclass
class Solution:
    choice: list[int]  # option index per layer
    cost: int  # Σ b, bytes
    error: float  # Σ e
    cell: int  # DP resolution in bytes (the gcd of the costs above each layer's cheapest: exact)
    exact: bool  # the optimum itself (costs were not rounded)


def solve(costs: list[list[int]], errors: list[list[float]], budget: int) -> Solution:
    """The least-error choice of one option per layer within `budget` (see the module docstring). Ties prefer the
    cheaper option. Raises Infeasible when the cheapest choice does not fit."""
    if len(costs) != len(errors) or any(len(c) != len(e) or not c for c, e in zip(costs, errors)):
        raise ValueError("costs and errors need the same, non-empty option lists per layer")
    options = [_pareto(c, e) for c, e in zip(costs, errors)]  # per layer: (cost, error, index), cost ascending
    least = sum(o[0][0] for o in options)
    if least > budget:
        raise Infeasible(least, budget)
    slack = budget - least
    deltas = [[cost - o[0][0] for cost, _, _ in o] for o in options]
    if sum(d[-1] for d in deltas) <= slack:  # everything fits: each layer's least-error option
        picks = [len(o) - 1 for o in options]
        return _solution(options, costs, errors, picks, 1, True)
    cell = math.gcd(*[d for row in deltas for d in row if d]) or 1
    exact = slack // cell <= MAX_CELLS
    if not exact:
        cell = -(-slack // MAX_CELLS)
    picks = _dp([[-(-d // cell) for d in row] for row in deltas], [[e for _, e, _ in o] for o in options],
                slack // cell)
    if not exact:
        picks = _fill(options, picks, slack - sum(deltas[i][p] for i, p in enumerate(picks)))
    return _solution(options, costs, errors, picks, cell, exact)


def _pareto(costs: list[int], errors: list[float]) -> list[tuple[int, float, int]]:
    """The options no other option beats on both cost and error (cheaper first), as (cost, error, index)."""
    kept = []
    for cost, error, index in sorted((int(c), float(e), i) for i, (c, e) in enumerate(zip(costs, errors))):
        if not kept or error < kept[-1][1]:
            kept.append((cost, error, index))
    return kept


def _dp(cells: list[list[int]], errors: list[list[float]], capacity: int) -> list[int]:
    """Exact DP: best[c] = least error of the layers so far using at most c cells; back-pointers per layer."""
    best = np.zeros(capacity + 1)
    back = np.zeros((len(cells), capacity + 1), dtype=np.uint8)
    for i, (row, errs) in enumerate(zip(cells, errors)):
        new = best + errs[0]  # option 0 costs 0 cells above the layer's cheapest
        for j in range(1, len(row)):
            if row[j] > capacity:
                break
            shifted = np.full(capacity + 1, np.inf)
            shifted[row[j]:] = best[: capacity + 1 - row[j]] + errs[j]
            better = shifted < new  # strictly: a tie keeps the cheaper option
            new[better] = shifted[better]
            back[i][better] = j
        best = new
    picks, c = [], capacity
    for i in range(len(cells) - 1, -1, -1):
        j = int(back[i][c])
        picks.append(j)
        c -= cells[i][j]
    return picks[::-1]


def _fill(options, picks: list[int], left: int) -> list[int]:
    """Spend `left` bytes (what rounding costs up to cells left unused) on the upgrades with the largest error drop,
    one layer at a time, while one fits exactly."""
    picks = list(picks)
    while True:
        upgrades = [(options[i][j][1] - options[i][p][1], i, j) for i, p in enumerate(picks)
                    for j in range(p + 1, len(options[i])) if options[i][j][0] - options[i][p][0] <= left]
        if not upgrades:
            return picks
        gain, i, j = min(upgrades)
        if gain >= 0:
            return picks
        left -= options[i][j][0] - options[i][picks[i]][0]
        picks[i] = j


def _solution(options, costs, errors, picks: list[int], cell: int, exact: bool) -> Solution:
    choice = [options[i][p][2] for i, p in enumerate(picks)]
    return Solution(choice, sum(int(costs[i][c]) for i, c in enumerate(choice)),
                    float(sum(errors[i][c] for i, c in enumerate(choice))), cell, exact)
