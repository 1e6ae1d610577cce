"""DTW sequence alignment with FuseLLM's exact semantics, compiled.

Contract: given target token strings `a` [n] and source token strings `b` [m] of the same
text, return for every target index i the source indices aligned to it, as CSR arrays
(offsets int64 [n+1], src int64 [nnz]; ascending within each row).

Semantics (the reference implementation's, kept exactly): cell cost = Levenshtein distance
between the two token strings with space markers removed; D[i, j] = cost[i, j] +
min(D[i-1, j-1], D[i-1, j], D[i, j-1]) with D[-1, -1] = 0 and the other borders infinite;
backtrack from (n-1, m-1) to (0, 0), at each step taking the smallest of diagonal, up, left,
ties broken in that order. `dtw_reference` below is the plain O(n·m) Python version that the
tests and the benchmark compare against; `dtw_align` computes the cost matrix with rapidfuzz
and the recurrence and backtrack with numba.
"""

from __future__ import annotations

import numpy as np
from numba import njit


def strip_markers(tokens: list[str]) -> list[str]:
    """Normalised token strings (fusedata.vocab.token_texts) with the space marker removed."""
    return [t.replace(" ", "") for t in tokens]


def levenshtein(a: str, b: str) -> int:
    """Plain dynamic-programming edit distance (reference only)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def dtw_reference(a: list[str], b: list[str]) -> list[list[int]]:
    """The straightforward O(n·m) pure-Python DTW: for each i, the aligned j's (ascending)."""
    n, m = len(a), len(b)
    inf = float("inf")
    d = [[inf] * (m + 1) for _ in range(n + 1)]
    d[0][0] = 0.0
    for i in range(n):
        for j in range(m):
            d[i + 1][j + 1] = levenshtein(a[i], b[j]) + min(d[i][j + 1], d[i + 1][j], d[i][j])
    mat = [row[1:] for row in d[1:]]
    i, j = n - 1, m - 1
    rows: list[list[int]] = [[] for _ in range(n)]
    while i > 0 or j > 0:
        rows[i].append(j)
        diag = mat[i - 1][j - 1] if i > 0 and j > 0 else inf
        up = mat[i - 1][j] if i > 0 else inf
        left = mat[i][j - 1] if j > 0 else inf
        move = min(range(3), key=lambda t: (diag, up, left)[t])  # first minimum: diag, up, left
        if move == 0:
            i, j = i - 1, j - 1
        elif move == 1:
            i -= 1
        else:
            j -= 1
    rows[0].append(0)
    return [sorted(r) for r in rows]


@njit(cache=True)
def _accumulate(cost: np.ndarray) -> np.ndarray:  # cost int32 [n, m] -> D float64 [n, m]
    n, m = cost.shape
    d = np.empty((n, m), dtype=np.float64)
    for i in range(n):
        for j in range(m):
            if i == 0 and j == 0:
                best = 0.0
            elif i == 0:
                best = d[0, j - 1]
            elif j == 0:
                best = d[i - 1, 0]
            else:
                best = min(d[i - 1, j - 1], d[i - 1, j], d[i, j - 1])
            d[i, j] = cost[i, j] + best
    return d


@njit(cache=True)
def _backtrack(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # -> path i [L], j [L], from the end
    n, m = d.shape
    pi = np.empty(n + m, dtype=np.int64)
    pj = np.empty(n + m, dtype=np.int64)
    i, j, k = n - 1, m - 1, 0
    inf = np.inf
    while i > 0 or j > 0:
        pi[k], pj[k] = i, j
        k += 1
        diag = d[i - 1, j - 1] if i > 0 and j > 0 else inf
        up = d[i - 1, j] if i > 0 else inf
        left = d[i, j - 1] if j > 0 else inf
        if diag <= up and diag <= left:
            i, j = i - 1, j - 1
        elif up <= left:
            i -= 1
        else:
            j -= 1
    pi[k], pj[k] = 0, 0
    return pi[: k + 1], pj[: k + 1]


def dtw_align(a: list[str], b: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """CSR alignment target -> source: offsets int64 [n+1], src int64 [nnz]."""
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    n, m = len(a), len(b)
    if n == 0 or m == 0:
        return np.zeros(n + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    cost = process.cdist(a, b, scorer=Levenshtein.distance, dtype=np.int32, workers=1)  # [n, m]
    pi, pj = _backtrack(_accumulate(np.ascontiguousarray(cost)))
    order = np.lexsort((pj, pi))  # by target, then source ascending
    pi, pj = pi[order], pj[order]
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.add.at(offsets, pi + 1, 1)
    return np.cumsum(offsets), pj
