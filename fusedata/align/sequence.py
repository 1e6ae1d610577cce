"""Sequence alignment: which source tokens / positions stand for each target token / position.

Two levels, both pure functions of arrays:

**Token alignment** (`Alignment`, CSR): for every target token t, the source tokens aligned to
it, as `offsets int64 [n_tgt+1]`, `src_idx int64 [nnz]` (ascending within a row).

- `dtw_align` is FuseLLM's DTW, kept exactly: cell cost = Levenshtein distance between the
  space-marker-stripped token strings, D[i, j] = cost[i, j] + min(D[i-1, j-1], D[i-1, j],
  D[i, j-1]) with D[-1, -1] = 0 and the other borders infinite, rows i = *source* tokens and
  columns j = *target* tokens (FuseLLM's orientation: `dtw(blending_tokens, base_tokens)`), and
  a backtrack from the last cell to (0, 0) that takes the smallest of diagonal, up (source - 1),
  left (target - 1), ties broken in that order. `dtw_reference` is the plain O(n·m) Python
  version; `dtw_align` gives the same output from a rapidfuzz cost matrix and a row-by-row
  numpy recurrence (each row is a min-plus prefix scan, see `_accumulate`).
- `byte_align` aligns tokens whose [start, end) byte spans overlap (linear time). Zero-width
  tokens (special tokens such as `<bos>`, start == end) align to nothing.

**Position matching** (`PositionMatch`): which *source position* provides the distribution for
each *target position*. The rule, and why:

    Target position t predicts target token t+1 (its label is input_ids[t+1]); source position
    s predicts source token s+1. Both condition on the text before their predicted token, so
    the source distribution is about the same thing as the target's exactly when both predict
    text that starts at the same byte:   src_start[s+1] == tgt_start[t+1]   (=: b).
    At most one source position qualifies (zero-width predictions, i.e. special tokens, are
    never matched). With e = tgt_end[t+1] and e' = src_end[s+1]:
      e' == e  1:1     the two predicted tokens are the same text
      e' <  e  many:1  several source tokens make up the target's next token; the distribution
                       used is the one for the *first* of them (the only source position with
                       the same prefix as t; the later ones have seen part of the token)
      e' >  e  1:many  the source's next token covers the target's next token and more
      none     fallback no source token starts at b (b falls inside a source token, e.g. the
                       second target piece of a word the source keeps whole): the projection
                       then uses a one-hot on the target's label input_ids[t+1] (never on the
                       current token, FuseAI issue 27).
    For a source token that covers target tokens t+1..t+r (1:many), only position t matches;
    positions t+1..t+r-1 fall back, and position t+r (whose next token starts where the
    source token ends) matches the next source position again.

`match_predictions` applies the rule to byte offsets directly (the `bytes` method, sorted
arrays + `searchsorted`); `match_from_alignment` applies the same rule to any token alignment
(the `dtw` method): position t matches source position u-1 when u, the first source token
aligned to target token t+1, has t+1 as its first aligned target token (the alignment path
crosses a boundary shared by both tokenisations there). On a byte alignment of contiguous
tokens the two give the same answer.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

ONE_TO_ONE, MANY_TO_ONE, ONE_TO_MANY, FALLBACK = 0, 1, 2, 3  # same codes as schemas/aligned.py
KIND_NAMES = {ONE_TO_ONE: "1:1", MANY_TO_ONE: "many:1", ONE_TO_MANY: "1:many", FALLBACK: "fallback"}


@dataclass(frozen=True)
class Alignment:
    """Target token t is aligned to source tokens src_idx[offsets[t]:offsets[t+1]].

    offsets int64 [n_tgt+1]; src_idx int64 [nnz], ascending within each row; n_src source tokens.
    """

    offsets: np.ndarray
    src_idx: np.ndarray
    n_src: int

    @property
    def n_tgt(self) -> int:
        return len(self.offsets) - 1

    def row(self, t: int) -> np.ndarray:
        return self.src_idx[self.offsets[t]:self.offsets[t + 1]]

    def to_lists(self) -> list[list[int]]:
        return [self.row(t).tolist() for t in range(self.n_tgt)]

    def rows(self) -> np.ndarray:
        """int64 [nnz]: the target token of every entry."""
        return np.repeat(np.arange(self.n_tgt, dtype=np.int64), np.diff(self.offsets))

    @staticmethod
    def from_pairs(tgt: np.ndarray, src: np.ndarray, n_tgt: int, n_src: int) -> Alignment:
        """CSR from (target, source) pairs, any order, no duplicates."""
        order = np.lexsort((src, tgt))
        counts = np.bincount(tgt, minlength=n_tgt)[:n_tgt]
        offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        return Alignment(offsets, np.asarray(src, dtype=np.int64)[order], n_src)


@dataclass(frozen=True)
class PositionMatch:
    """src_pos int64 [P]: the source position (row of the source top-k) for each target
    position, -1 = fallback; kind int8 [P]: ONE_TO_ONE / MANY_TO_ONE / ONE_TO_MANY / FALLBACK."""

    src_pos: np.ndarray
    kind: np.ndarray

    def counts(self) -> dict[str, int]:
        c = np.bincount(self.kind, minlength=4)
        return {KIND_NAMES[k]: int(c[k]) for k in KIND_NAMES}


# --------------------------------------------------------------------------------------------
# DTW


def levenshtein(a: str, b: str) -> int:
    """Plain dynamic-programming edit distance (unit insert/delete/substitute); for tests."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def dtw_reference(target: Sequence[str], source: Sequence[str], distance=None) -> list[list[int]]:
    """The straightforward O(n·m) Python DTW, FuseLLM's loop as written: for each target
    token, the source tokens aligned to it (ascending). `distance(a, b)` is the edit distance
    of two stripped strings; default rapidfuzz's C Levenshtein (FuseLLM calls the C
    `editdistance`), pass `levenshtein` for an all-Python check."""
    if distance is None:
        from rapidfuzz.distance import Levenshtein

        distance = Levenshtein.distance
    a = [s.replace(" ", "") for s in source]  # rows: source
    b = [s.replace(" ", "") for s in target]  # columns: target
    n, m = len(a), len(b)
    if n == 0 or m == 0:
        return [[] for _ in range(m)]
    inf = float("inf")
    d = [[inf] * (m + 1) for _ in range(n + 1)]
    d[0][0] = 0.0
    for i in range(n):
        for j in range(m):
            d[i + 1][j + 1] = distance(a[i], b[j]) + min(d[i][j + 1], d[i + 1][j], d[i][j])
    mat = [row[1:] for row in d[1:]]
    i, j = n - 1, m - 1
    cols: list[list[int]] = [[] for _ in range(m)]
    while i > 0 or j > 0:
        cols[j].append(i)
        options = [
            mat[i - 1][j - 1] if i > 0 and j > 0 else inf,  # diagonal
            mat[i - 1][j] if i > 0 else inf,  # up: previous source token
            mat[i][j - 1] if j > 0 else inf,  # left: previous target token
        ]
        move = options.index(min(options))  # first minimum, like np.argmin
        if move == 0:
            i, j = i - 1, j - 1
        elif move == 1:
            i -= 1
        else:
            j -= 1
    cols[0].append(0)
    return [sorted(c) for c in cols]


def _accumulate_numpy(cost: np.ndarray) -> np.ndarray:
    """DTW accumulated cost, exact integers: cost int [n, m] -> D [n, m].

    Row i only depends on row i-1 and on itself to the left. With
    e[j] = cost[i, j] + min(D[i-1, j-1], D[i-1, j]) and P[j] = cost[i, 0] + ... + cost[i, j]:
        D[i, j] = min(e[j], D[i, j-1] + cost[i, j]) = P[j] + min_{k<=j} (e[k] - P[k]),
    a prefix minimum, so each row is four vectorised numpy calls instead of m Python steps.
    """
    n, m = cost.shape
    bound = (n + m) * (int(cost.max(initial=0)) + 1)  # no path costs more
    dtype = np.int32 if bound < 2**29 else np.int64  # D < bound, so D - P never overflows
    cost = cost.astype(dtype, copy=False)
    prefix = np.cumsum(cost, axis=1, dtype=dtype)  # [n, m] P per row
    excl = cost - prefix  # [n, m] cost[i, j] - P[j] = -P[j-1]
    d = np.empty((n, m), dtype=dtype)
    d[0] = prefix[0]  # row 0: only left moves
    e = np.empty(m, dtype=dtype)
    for i in range(1, n):
        above = d[i - 1]
        e[0] = above[0]  # D[i-1, -1] is infinite
        np.minimum(above[:-1], above[1:], out=e[1:])
        e += excl[i]
        np.minimum.accumulate(e, out=e)
        np.add(e, prefix[i], out=d[i])
    return d


def _backtrack_python(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reference backtrack over D [n, m]: path cells (rows i, cols j) from the end."""
    n, m = d.shape
    pi, pj = [], []
    i, j = n - 1, m - 1
    inf = float("inf")
    get = d.item
    while i > 0 or j > 0:
        pi.append(i)
        pj.append(j)
        diag = get(i - 1, j - 1) if i > 0 and j > 0 else inf
        up = get(i - 1, j) if i > 0 else inf
        left = get(i, j - 1) if j > 0 else inf
        if diag <= up and diag <= left:
            i, j = i - 1, j - 1
        elif up <= left:
            i -= 1
        else:
            j -= 1
    pi.append(0)
    pj.append(0)
    return np.asarray(pi, dtype=np.int64), np.asarray(pj, dtype=np.int64)


def _dtw_path_numpy(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return _backtrack_python(_accumulate_numpy(cost))


@functools.lru_cache(maxsize=1)
def _numba_path():  # -> compiled cost [n, m] -> (path rows, path cols), or None without numba
    """The same recurrence and backtrack as one compiled loop, when numba is installed (it is
    optional: the numpy engine gives the same output, ~3x slower)."""
    try:
        from numba import njit
    except ImportError:
        return None

    @njit(cache=True, nogil=True)
    def path(cost):  # pragma: no cover - compiled
        n, m = cost.shape
        d = np.empty((n, m), dtype=np.int64)
        for i in range(n):
            for j in range(m):
                if i == 0 and j == 0:
                    best = 0
                elif i == 0:
                    best = d[0, j - 1]
                elif j == 0:
                    best = d[i - 1, 0]
                else:
                    best = min(d[i - 1, j - 1], d[i - 1, j], d[i, j - 1])
                d[i, j] = cost[i, j] + best
        pi = np.empty(n + m, dtype=np.int64)
        pj = np.empty(n + m, dtype=np.int64)
        i, j, k = n - 1, m - 1, 0
        big = np.iinfo(np.int64).max
        while i > 0 or j > 0:
            pi[k], pj[k] = i, j
            k += 1
            diag = d[i - 1, j - 1] if i > 0 and j > 0 else big
            up = d[i - 1, j] if i > 0 else big
            left = d[i, j - 1] if j > 0 else big
            if diag <= up and diag <= left:
                i, j = i - 1, j - 1
            elif up <= left:
                i -= 1
            else:
                j -= 1
        pi[k], pj[k] = 0, 0
        return pi[: k + 1], pj[: k + 1]

    return path


def dtw_engines() -> list[str]:
    """The DP engines available here: always 'numpy', 'numba' when numba is installed."""
    return ["numpy"] + (["numba"] if _numba_path() is not None else [])


def dtw_cost(target: Sequence[str], source: Sequence[str], workers: int = 1) -> np.ndarray:
    """int32 [n_src, n_tgt]: Levenshtein distance of the space-stripped strings. Repeated
    strings (most tokens of a text) are computed once."""
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    ua, ia = _dedupe(source)
    ub, ib = _dedupe(target)
    u = process.cdist(ua, ub, scorer=Levenshtein.distance, dtype=np.int32, workers=workers)  # [|ua|, |ub|]
    return np.take(np.take(u, ia, axis=0), ib, axis=1)  # [n_src, n_tgt]


def _dedupe(strings: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """Unique stripped strings (first-seen order) and the index of each input into them."""
    index: dict[str, int] = {}
    inv = np.fromiter((index.setdefault(s.replace(" ", ""), len(index)) for s in strings), np.int64, len(strings))
    return list(index), inv


def dtw_align(target: Sequence[str], source: Sequence[str], workers: int = 1, engine: str = "auto") -> Alignment:
    """FuseLLM's DTW token alignment (output identical to `dtw_reference`), O(n·m) time and
    memory (4-8 bytes per cell: 4-8 MB for 1,024 x 1,024). Strings are token surfaces; the
    space marker is stripped for the cost. engine: 'numba' (compiled loop, if installed),
    'numpy' (row scans), 'auto' = numba when available."""
    n_tgt, n_src = len(target), len(source)
    if n_tgt == 0 or n_src == 0:
        return Alignment(np.zeros(n_tgt + 1, dtype=np.int64), np.zeros(0, dtype=np.int64), n_src)
    if engine not in ("auto", "numpy", "numba"):
        raise ValueError(f"unknown DTW engine {engine!r}")
    compiled = _numba_path() if engine != "numpy" else None
    if engine == "numba" and compiled is None:
        raise ValueError("the numba DTW engine needs numba installed")
    cost = dtw_cost(target, source, workers)  # [n_src, n_tgt]
    pi, pj = compiled(cost) if compiled is not None else _dtw_path_numpy(cost)
    return Alignment.from_pairs(pj, pi, n_tgt, n_src)


def dtw_align_tokens(target: Sequence[str | None], source: Sequence[str | None], workers: int = 1,
                     engine: str = "auto") -> Alignment:
    """`dtw_align` on token surfaces where None marks a special token: specials are left out
    of the DTW and align to nothing (never matched to text)."""
    t_keep = np.array([i for i, s in enumerate(target) if s is not None], dtype=np.int64)
    s_keep = np.array([i for i, s in enumerate(source) if s is not None], dtype=np.int64)
    inner = dtw_align([target[i] for i in t_keep], [source[i] for i in s_keep], workers, engine)
    if inner.src_idx.size == 0:
        return Alignment(np.zeros(len(target) + 1, dtype=np.int64), np.zeros(0, dtype=np.int64), len(source))
    return Alignment.from_pairs(t_keep[inner.rows()], s_keep[inner.src_idx], len(target), len(source))


# --------------------------------------------------------------------------------------------
# byte offsets


def byte_align(tgt_start: np.ndarray, tgt_end: np.ndarray, src_start: np.ndarray, src_end: np.ndarray) -> Alignment:
    """Tokens whose [start, end) byte spans overlap, in linear time (two searchsorted).

    Spans are absolute document byte offsets in text order (as extract stores them);
    zero-width tokens align to nothing.
    """
    ts, te = np.asarray(tgt_start, np.int64), np.asarray(tgt_end, np.int64)  # [n]
    ss, se = np.asarray(src_start, np.int64), np.asarray(src_end, np.int64)  # [m]
    n, m = len(ts), len(ss)
    # candidates: sources ending after t starts and starting before t ends; ends made monotone
    # for the search, the exact overlap test below removes any extra
    lo = np.searchsorted(np.maximum.accumulate(se) if m else se, ts, side="right")  # [n]
    hi = np.searchsorted(ss, te, side="left")  # [n]
    hi = np.where(te > ts, np.maximum(hi, lo), lo)
    count = hi - lo
    rows = np.repeat(np.arange(n, dtype=np.int64), count)  # [c]
    src = np.arange(int(count.sum()), dtype=np.int64) - np.repeat(np.cumsum(count) - count - lo, count)
    ok = (se[src] > ts[rows]) & (ss[src] < te[rows]) & (se[src] > ss[src])
    rows, src = rows[ok], src[ok]
    offsets = np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=n))]).astype(np.int64)
    return Alignment(offsets, src, m)


# --------------------------------------------------------------------------------------------
# position matching


def match_predictions(tgt_start: np.ndarray, tgt_end: np.ndarray, src_start: np.ndarray,
                      src_end: np.ndarray) -> PositionMatch:
    """The byte rule of the module docstring on *predicted-token* spans.

    tgt_start/tgt_end int [P]: byte span of the token each target position predicts;
    src_start/src_end int [Q]: the same for the source positions (any order, e.g. all
    positions of one document over all its windows). Returns src_pos [P] indexing [0, Q).
    O((P + Q) log Q); sorted source starts skip the sort.
    """
    b, e = np.asarray(tgt_start, np.int64), np.asarray(tgt_end, np.int64)  # [P]
    ss, se = np.asarray(src_start, np.int64), np.asarray(src_end, np.int64)  # [Q]
    keep = np.flatnonzero(se > ss)  # zero-width predictions (special tokens) are never matched
    ss, se = ss[keep], se[keep]
    if len(ss) > 1 and not (ss[1:] >= ss[:-1]).all():
        order = np.argsort(ss, kind="stable")
        keep, ss, se = keep[order], ss[order], se[order]
    src_pos = np.full(len(b), -1, dtype=np.int64)
    kind = np.full(len(b), FALLBACK, dtype=np.int8)
    if len(ss) == 0:
        return PositionMatch(src_pos, kind)
    j = np.minimum(np.searchsorted(ss, b, side="left"), len(ss) - 1)  # [P]
    hit = (ss[j] == b) & (e > b)
    end = se[j]
    src_pos[hit] = keep[j[hit]]
    kind[hit & (end == e)] = ONE_TO_ONE
    kind[hit & (end < e)] = MANY_TO_ONE
    kind[hit & (end > e)] = ONE_TO_MANY
    return PositionMatch(src_pos, kind)


def match_positions(tgt_start: np.ndarray, tgt_end: np.ndarray, src_start: np.ndarray,
                    src_end: np.ndarray) -> PositionMatch:
    """One target window against one source token sequence, `bytes` method.

    Token spans tgt_* int [n] and src_* int [m] (as stored by extract); returns [n-1]
    matches for target positions 0..n-2, indexing source positions 0..m-2.
    """
    return match_predictions(np.asarray(tgt_start)[1:], np.asarray(tgt_end)[1:],
                             np.asarray(src_start)[1:], np.asarray(src_end)[1:])


def match_from_alignment(alignment: Alignment) -> PositionMatch:
    """The position rule applied to a token alignment (e.g. `dtw_align_tokens`): [n_tgt-1]
    matches for target positions 0..n_tgt-2, indexing source positions 0..n_src-2.

    Position t matches source position u-1, u = first source token aligned to target token
    t+1, when u >= 1 and t+1 is the first target token aligned to u. Kind: target token t+1
    has several source tokens -> many:1; else u has several target tokens -> 1:many; else 1:1.
    """
    n = alignment.n_tgt
    off, src = alignment.offsets, alignment.src_idx
    n_src_of = np.diff(off)[1:]  # [n-1] source tokens on each predicted target token
    first_src = np.where(n_src_of > 0, src[np.minimum(off[1:-1], max(len(src) - 1, 0))], -1) if n > 1 else \
        np.zeros(0, np.int64)
    # for each source token: its first aligned target token and how many target tokens
    rows = alignment.rows()  # [nnz]
    first_tgt = np.full(alignment.n_src, -1, dtype=np.int64)
    first_tgt[src[::-1]] = rows[::-1]  # the last write wins: the smallest row
    n_tgt_of = np.bincount(src, minlength=alignment.n_src)
    t1 = np.arange(1, n, dtype=np.int64)  # [n-1] predicted target tokens
    u = np.maximum(first_src, 0)
    hit = (first_src >= 1) & (first_tgt[u] == t1) if len(src) else np.zeros(n - 1 if n else 0, dtype=bool)
    kind = np.full(len(t1), FALLBACK, dtype=np.int8)
    kind[hit] = ONE_TO_ONE
    kind[hit & (n_tgt_of[u] > 1)] = ONE_TO_MANY
    kind[hit & (n_src_of > 1)] = MANY_TO_ONE
    return PositionMatch(np.where(hit, first_src - 1, -1).astype(np.int64), kind)
