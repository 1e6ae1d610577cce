"""Alignment benchmark (issue 4) for `fusedata.align`: position alignment speed and agreement,
projection speed, MinED map time. Prints a markdown table.

Real text: the 300 gensim Lee news articles joined with blank lines, tokenised by the real
SmolLM2 (target, byte-level BPE 49,152) and Gemma-3 (source, SentencePiece with byte fallback,
262,144, adds <bos>) tokenizers; only the tokenizers are loaded. Byte offsets are cumulative
surface lengths (`fusedata.align.tokens`; the surfaces of both tokenizers spell the text
exactly, checked below). The target stream is cut into `--seqs` sequences of `--length` tokens;
each is aligned against the source tokens covering the same bytes.

- `dtw_reference` (lists, C edit distance per cell) and a FuseLLM-style loop (the same DP
  over a numpy matrix indexed cell by cell, as FuseLLM writes it) are timed on `--ref-seqs`
  sequences only; `dtw_align` (numpy and, if installed, numba engines) is checked identical
  to the reference on them, then timed on all sequences;
- `bytes`: `match_positions` (the default, linear time); `project` adds mapping a k = `--k`
  source top-k (random ids, the real MinED map) into target ids, merged by adding;
- agreement of `bytes` with `dtw` (`match_from_alignment(dtw_align_tokens(...))`): share of
  target positions matched to the same source position (both falling back counts as agreeing);
- MinED: `mined_map` over all Gemma-3 ids onto all SmolLM2 ids, fresh (no cache), 2 workers.

    .venv/bin/python benchmarks/align.py [--seqs 16] [--ref-seqs 2] [--length 1024] [--skip-mined]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
LEE = ROOT / ".venv/lib/python3.11/site-packages/gensim/test/test_data/lee_background.cor"
MODELS = Path(os.environ.get("FUSEDATA_MODELS", "/tmp/fdcache/models"))


def spans(table, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(s) if s is not None else 0 for s in table.text(ids)], dtype=np.int64)
    end = np.cumsum(lengths)
    return end - lengths, end


def fusellm_style(target: list[str], source: list[str]) -> list[list[int]]:
    """The DP and backtrack of `dtw_reference` over a numpy matrix indexed cell by cell (as
    FuseLLM's loop does), same output; the speed users see from the reference."""
    from rapidfuzz.distance import Levenshtein

    a = [s.replace(" ", "") for s in source]
    b = [s.replace(" ", "") for s in target]
    n, m = len(a), len(b)
    d = np.full((n + 1, m + 1), np.inf)
    d[0, 0] = 0
    for i in range(n):
        for j in range(m):
            d[i + 1, j + 1] = Levenshtein.distance(a[i], b[j]) + min(d[i, j + 1], d[i + 1, j], d[i, j])
    d = d[1:, 1:]
    i, j = n - 1, m - 1
    cols: list[list[int]] = [[] for _ in range(m)]
    while i > 0 or j > 0:
        cols[j].append(i)
        move = int(np.argmin([d[i - 1, j - 1] if i > 0 and j > 0 else np.inf,
                              d[i - 1, j] if i > 0 else np.inf, d[i, j - 1] if j > 0 else np.inf]))
        i, j = (i - 1, j - 1) if move == 0 else (i - 1, j) if move == 1 else (i, j - 1)
    cols[0].append(0)
    return [sorted(c) for c in cols]


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--ref-seqs", type=int, default=2)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--skip-mined", action="store_true")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from fusedata.align.project import project
    from fusedata.align.sequence import (
        FALLBACK,
        KIND_NAMES,
        dtw_align,
        dtw_align_tokens,
        dtw_engines,
        dtw_reference,
        match_from_alignment,
        match_positions,
    )
    from fusedata.align.tokens import surface_bytes, token_table
    from fusedata.align.vocab import exact_map, mined_map
    from fusedata.topk import TopK

    smol = AutoTokenizer.from_pretrained(MODELS / "smollm2-135m")
    gemma = AutoTokenizer.from_pretrained(MODELS / "gemma3-270m")
    ts, tg = token_table(smol), token_table(gemma)
    text = "\n\n".join(LEE.read_text().splitlines())
    t_ids, s_ids = smol(text)["input_ids"], gemma(text)["input_ids"]
    for table, ids in ((ts, t_ids), (tg, s_ids)):
        assert b"".join(surface_bytes(s) or b"" for s in table.text(ids)) == text.encode()
    (t0, t1), (s0, s1) = spans(ts, t_ids), spans(tg, s_ids)
    n = args.length
    seqs = []  # (target ids, start, end, source slice)
    for w in range(args.seqs):
        a, b = w * (n - 1), w * (n - 1) + n  # consecutive windows share one token, as extract cuts
        if b > len(t_ids):
            break
        lo, hi = np.searchsorted(s1, t0[a], "right"), np.searchsorted(s0, t1[b - 1], "left")
        seqs.append((t_ids[a:b], t0[a:b], t1[a:b], slice(lo, hi)))
    positions = sum(len(s[0]) - 1 for s in seqs)
    print(f"text: {len(text.encode()):,} bytes; SmolLM2 {len(t_ids):,} tokens, Gemma-3 {len(s_ids):,} tokens; "
          f"{len(seqs)} target sequences of {n}; {os.cpu_count()} cores\n")

    def strings(seq):
        ids, _, _, sl = seq
        return ts.text(ids), tg.text(s_ids[sl])

    rows = []  # (method, positions, seconds, notes)
    ref = seqs[: args.ref_seqs]
    ref_pos = sum(len(s[0]) - 1 for s in ref)
    plain = [[x for x in strings(s)[0] if x is not None] for s in ref], [[x for x in strings(s)[1] if x is not None]
                                                                          for s in ref]
    t = time.perf_counter()
    ref_out = [dtw_reference(a, b) for a, b in zip(*plain, strict=True)]
    t_ref = time.perf_counter() - t
    rows.append(("`dtw_reference` (plain O(n·m) Python, lists)", ref_pos, t_ref, f"first {len(ref)} sequences"))
    t = time.perf_counter()
    style_out = [fusellm_style(a, b) for a, b in zip(*plain, strict=True)]
    t_style = time.perf_counter() - t
    assert style_out == ref_out
    rows.append(("FuseLLM-style loop (numpy matrix cells)", ref_pos, t_style, f"first {len(ref)} sequences"))
    for engine in dtw_engines():
        outs = [dtw_align(a, b, engine=engine).to_lists() for a, b in zip(*plain, strict=True)]
        assert outs == ref_out, engine
        sec = best_of(lambda e=engine: [dtw_align(a, b, engine=e) for a, b in zip(*plain, strict=True)], 3)
        rows.append((f"`dtw_align` engine={engine}", ref_pos, sec, "same sequences, output identical"))
    for engine in dtw_engines():
        sec = best_of(lambda e=engine: [dtw_align_tokens(*strings(s), engine=e) for s in seqs], 2)
        rows.append((f"`dtw_align_tokens` engine={engine}", positions, sec, "all sequences"))
    sec = best_of(lambda: [match_positions(s[1], s[2], s0[s[3]], s1[s[3]]) for s in seqs], 5)
    rows.append(("`match_positions` (bytes)", positions, sec, "the default `bytes` rule"))

    # projection: random source top-k on every source position, the real MinED map
    t = time.perf_counter()
    vmap = mined_map(tg, ts, workers=2) if not args.skip_mined else exact_map(tg, ts)
    t_map = time.perf_counter() - t
    rng = np.random.default_rng(0)
    n_src = len(s_ids)
    ids = rng.integers(0, len(tg), size=(n_src, args.k)).astype(np.int32)
    lp = np.sort(np.log(rng.dirichlet(np.ones(args.k * 3), size=n_src)[:, : args.k]), axis=1)[:, ::-1]
    src_topk = TopK(ids, lp.astype(np.float32).copy(), lp[:, 0].astype(np.float32), 1 - np.exp(lp).sum(1).astype(
        np.float32), np.array([n_src], np.int64))

    def bytes_and_project():
        out = []
        for tid, a, b, sl in seqs:
            m = match_positions(a, b, s0[sl], s1[sl])
            m.src_pos[m.src_pos >= 0] += sl.start  # rows of the whole-text source top-k
            out.append(project(src_topk, m, np.asarray(tid[1:]), vmap, len(ts)))
        return out

    sec = best_of(bytes_and_project, 3)
    rows.append((f"`match_positions` + `project` (k={args.k})", positions, sec, "bytes rule + ids into target vocab"))

    ref_rate = ref_pos / t_ref
    style_rate = ref_pos / t_style
    print(f"## Position alignment, SmolLM2 (target) <- Gemma-3 (source), sequences of {n} target tokens\n")
    print("| method | target positions | seconds | target tokens/s | vs `dtw_reference` | vs FuseLLM-style | notes |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, pos, s, note in rows:
        rate = pos / s
        print(f"| {name} | {pos:,} | {s:.4f} | {rate:,.0f} | {rate / ref_rate:,.0f}x | {rate / style_rate:,.0f}x | {note} |")

    # agreement
    dtw_m, byte_m = [], []
    for seq in seqs:
        dtw_m.append(match_from_alignment(dtw_align_tokens(*strings(seq))))
        byte_m.append(match_positions(seq[1], seq[2], s0[seq[3]], s1[seq[3]]))
    dp = np.concatenate([m.src_pos for m in dtw_m])
    bp = np.concatenate([m.src_pos for m in byte_m])
    dk = np.concatenate([m.kind for m in dtw_m])
    bk = np.concatenate([m.kind for m in byte_m])
    both = (dp >= 0) & (bp >= 0)
    print("\n## Agreement of `bytes` with `dtw` (position level)\n")
    print("| | share |\n|---|---:|")
    print(f"| target positions given the same source position (or both fallback) | {(dp == bp).mean():.2%} |")
    print(f"| ... among positions both methods match | {(dp[both] == bp[both]).mean():.2%} |")
    print(f"| positions `bytes` matches and `dtw` leaves to the fallback | {((bp >= 0) & (dp < 0)).mean():.2%} |")
    print(f"| positions `dtw` matches and `bytes` leaves to the fallback | {((dp >= 0) & (bp < 0)).mean():.2%} |")
    for k, name in KIND_NAMES.items():
        print(f"| kind {name}: bytes / dtw | {(bk == k).mean():.2%} / {(dk == k).mean():.2%} |")
    assert FALLBACK in KIND_NAMES

    print("\n## Vocabulary map, Gemma-3 (262,144) -> SmolLM2 (49,152)\n")
    print("| | value |\n|---|---:|")
    t = time.perf_counter()
    em = exact_map(tg, ts)
    t_em = time.perf_counter() - t
    if not args.skip_mined:
        print(f"| MinED `mined_map`, full vocabulary, fresh, workers=2 | {t_map:.1f} s |")
    print(f"| EM `exact_map` | {t_em:.2f} s |")
    text_ids = np.asarray([i for i in s_ids if tg.surface[i] is not None])
    print(f"| EM coverage of the source's text tokens | {(em[text_ids] >= 0).mean():.2%} |")
    ordinary = np.array([s is not None for s in tg.surface])
    print(f"| EM coverage of the source vocabulary (ordinary ids) | {(em[ordinary] >= 0).mean():.2%} |")
    if not args.skip_mined:
        print(f"| MinED coverage of the source vocabulary (ordinary ids) | {(vmap[ordinary] >= 0).mean():.2%} |")


if __name__ == "__main__":
    main()
