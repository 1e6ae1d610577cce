"""Alignment benchmark (issue 4): position alignment speed and agreement, MinED map time.

Real text (the gensim Lee news corpus, articles joined with blank lines) tokenised by the real
SmolLM2 (target) and Gemma-3 (source) tokenizers, byte offsets built as fusedata/extract.py does
(character offsets -> UTF-8 byte offsets with `char_to_byte`, pieces of a split character given
their own bytes with `split_character_spans`). The target text is cut into
sequences of `--length` tokens; each is aligned against the source predictions of the whole
text (the byte method) or of its bytes (DTW), exactly as `align_window` does.

- `dtw_reference`: the plain O(n·m) pure-Python DTW (FuseLLM's semantics), timed on
  `--ref-seqs` sequences only (it is slow); `dtw_align` and `match_by_dtw` on the same sequences
  first (same output checked), then on all;
- `match_by_bytes`: the linear-time default; `align_window` adds the projection into target ids
  (k = `--k`, source top-k ids drawn at random, the real MinED map);
- agreement: the share of target positions that bytes and DTW match to the same source position;
- MinED: `mined_map` over all 262,144 Gemma-3 tokens against all 49,152 SmolLM2 tokens, fresh
  (not the cache); EM coverage from `exact_map`.

    FUSEDATA_CACHE=/tmp/fdcache .venv/bin/python benchmarks/align.py [--seqs 16] [--ref-seqs 2] [--length 1024]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

LEE = Path(__file__).resolve().parents[1] / ".venv/lib/python3.11/site-packages/gensim/test/test_data/lee_background.cor"


def _offsets(tok, text: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids, byte start, byte end of the text's tokens (no special tokens), as extract stores them."""
    from fusedata.vocab import token_bytes
    from fusedata.windows import char_to_byte, split_character_spans

    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    chars = np.asarray(enc["offset_mapping"], dtype=np.int64)
    byte_at = char_to_byte(text)
    ids = np.asarray(enc["input_ids"], np.int32)
    start, end = byte_at[chars[:, 0]], byte_at[chars[:, 1]]
    nbytes = np.array([len(b) if b is not None else 0 for b in token_bytes(tok)], np.int64)
    split_character_spans(ids, start, end, nbytes)
    return ids, start, end


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, default=16, help="target sequences for the fast methods")
    ap.add_argument("--ref-seqs", type=int, default=2, help="sequences for the slow reference")
    ap.add_argument("--length", type=int, default=1024, help="target tokens per sequence")
    ap.add_argument("--k", type=int, default=10, help="source top-k for the projection")
    ap.add_argument("--skip-mined", action="store_true")
    args = ap.parse_args()

    from transformers import AutoTokenizer

    from fusedata.align import DocPositions, align_window, match_by_bytes, match_by_dtw
    from fusedata.dtw import dtw_align, dtw_reference, strip_markers
    from fusedata.models.cache import ensure_bundled
    from fusedata.topk import TopK
    from fusedata.vocab import exact_map, mined_map, token_texts

    cores = len(os.sched_getaffinity(0))
    tgt_tok = AutoTokenizer.from_pretrained(ensure_bundled("smollm2-135m"), trust_remote_code=False)
    src_tok = AutoTokenizer.from_pretrained(ensure_bundled("gemma3-270m"), trust_remote_code=False)
    tgt_texts, src_texts = token_texts(tgt_tok), token_texts(src_tok)

    articles = [line.strip() for line in LEE.read_text(encoding="utf-8").splitlines() if line.strip()]
    text = "\n\n".join(articles)
    t_ids, t_start, t_end = _offsets(tgt_tok, text)
    s_ids, s_start, s_end = _offsets(src_tok, text)
    n_seqs = min(args.seqs, len(t_ids) // args.length)
    print(f"text: {len(articles)} Lee news articles, {len(text.encode()):,} bytes; SmolLM2 {len(t_ids):,} tokens, "
          f"Gemma-3 {len(s_ids):,} tokens; {n_seqs} target sequences of {args.length}; {cores} cores\n")

    # the source's predictions over the whole text: position j predicts source token j
    rng = np.random.default_rng(0)
    src_topk = TopK(rng.integers(0, len(src_texts), (len(s_ids), args.k), dtype=np.int32),
                    np.sort(np.log(rng.dirichlet(np.ones(args.k + 1), len(s_ids))[:, : args.k]), axis=1)[:, ::-1]
                    .astype(np.float32).copy(), np.zeros(len(s_ids), np.float32), np.zeros(len(s_ids), np.float32),
                    np.array([len(s_ids)], np.int64))
    src = DocPositions(s_start, s_end, np.ones(len(s_ids)), s_ids, src_topk)

    seqs = []
    for q in range(n_seqs):
        sl = slice(q * args.length, (q + 1) * args.length)
        ids, start, end = t_ids[sl], t_start[sl], t_end[sl]
        inside = (src.pred_start >= start[1:].min()) & (src.pred_start < end[1:].max())
        a = strip_markers([tgt_texts[i] or "" for i in ids[1:]])
        b = strip_markers([src_texts[i] or "" for i in s_ids[inside]])
        seqs.append((ids, start, end, inside, a, b))
    positions = sum(len(s[0]) - 1 for s in seqs)

    # warm the numba functions (compiled and cached on first use)
    dtw_align(seqs[0][4][:8], seqs[0][5][:8])

    # reference vs fast DTW on the first ref-seqs sequences: same output, and the time of each
    ref_seqs = seqs[: args.ref_seqs]
    ref_pos = sum(len(s[4]) for s in ref_seqs)
    t0 = time.perf_counter()
    ref_out = [dtw_reference(s[4], s[5]) for s in ref_seqs]
    t_ref = time.perf_counter() - t0
    for (*_, a, b), want in zip(ref_seqs, ref_out, strict=True):
        off, col = dtw_align(a, b)
        assert [col[off[i]:off[i + 1]].tolist() for i in range(len(a))] == want, "dtw_align != dtw_reference"
    t_fast_ref = _best(lambda: [dtw_align(s[4], s[5]) for s in ref_seqs], 3)

    t_dtw = _best(lambda: [dtw_align(s[4], s[5]) for s in seqs], 3)
    t_mdtw = _best(lambda: [match_by_dtw(s[0], src, s[3], tgt_texts, src_texts) for s in seqs], 3)
    t_bytes = _best(lambda: [match_by_bytes(s[1], s[2], src) for s in seqs], 5)

    # agreement between the two position alignments
    same = total = 0
    kinds_b = np.zeros(4)
    kinds_d = np.zeros(4)
    same_nonfb = nonfb = 0
    for ids, start, end, inside, _a, _b in seqs:
        mb, kb = match_by_bytes(start, end, src)
        md, kd = match_by_dtw(ids, src, inside, tgt_texts, src_texts)
        same += int((mb == md).sum())
        total += len(mb)
        fb = kb == 3
        same_nonfb += int((mb[~fb] == md[~fb]).sum())
        nonfb += int((~fb).sum())
        kinds_b += np.bincount(kb, minlength=4)
        kinds_d += np.bincount(kd, minlength=4)

    if args.skip_mined:
        t_mined, vmap = float("nan"), np.arange(len(src_texts), dtype=np.int32) % len(tgt_texts)
    else:
        t0 = time.perf_counter()
        vmap = mined_map(src_texts, tgt_texts, len(src_texts))
        t_mined = time.perf_counter() - t0
    t0 = time.perf_counter()
    em = exact_map(src_texts, tgt_texts, len(src_texts))
    t_em = time.perf_counter() - t0
    text_tokens = sum(t is not None for t in src_texts)
    t_window = _best(lambda: [align_window(s[0], s[1], s[2], src, vmap, len(tgt_texts)) for s in seqs], 3)

    def row(name: str, seconds: float, pos: int, note: str = "") -> str:
        rate = pos / seconds
        return f"| {name} | {pos:,} | {seconds:.3f} | {rate:,.0f} | {rate / ref_rate:,.0f}× | {note} |"

    ref_rate = ref_pos / t_ref
    print(f"## Position alignment, SmolLM2 (target) ← Gemma-3 (source), sequences of {args.length} target tokens\n")
    print("| method | target positions | seconds | target tokens/s | vs reference | notes |")
    print("|---|---:|---:|---:|---:|---|")
    print(row("`dtw_reference` (plain O(n·m) Python)", t_ref, ref_pos, f"the first {len(ref_seqs)} sequence(s) only"))
    print(row("`dtw_align` (same sequences)", t_fast_ref, ref_pos, "output identical to the reference"))
    print(row("`dtw_align`", t_dtw, positions, "rapidfuzz cost matrix + numba DP/backtrack"))
    print(row("`match_by_dtw`", t_mdtw, positions, "`--sequence dtw`: + token strings, kinds"))
    print(row("`match_by_bytes`", t_bytes, positions, "default `--sequence bytes`"))
    print(row("`align_window` (bytes)", t_window, positions, f"match + projection of k={args.k} into target ids"))
    goal_dtw = (ref_pos / t_fast_ref) / ref_rate
    print(f"\ngoals: dtw ≥ 100× reference: {goal_dtw:,.0f}× ({'met' if goal_dtw >= 100 else 'NOT met'}); "
          f"default ≥ 1M tokens/s: {positions / t_bytes:,.0f} ({'met' if positions / t_bytes >= 1e6 else 'NOT met'})\n")

    names = ["1:1", "many:1", "1:many", "fallback"]
    print("## Agreement of `bytes` with `dtw`\n")
    print("| | share |")
    print("|---|---:|")
    print(f"| target positions matched to the same source position | {same / total:.2%} |")
    print(f"| … among positions `bytes` does not leave to the fallback | {same_nonfb / max(nonfb, 1):.2%} |")
    for i, n in enumerate(names):
        print(f"| kind {n}: bytes / dtw | {kinds_b[i] / total:.2%} / {kinds_d[i] / total:.2%} |")
    print()
    print("## Vocabulary map, Gemma-3 (262,144) → SmolLM2 (49,152)\n")
    print("| | value |")
    print("|---|---:|")
    print(f"| MinED `mined_map`, full vocabulary, fresh ({cores} cores) | {t_mined:,.1f} s |")
    print(f"| EM `exact_map` | {t_em:,.2f} s |")
    print(f"| EM coverage (source text tokens with an exact target match) | {(em >= 0).sum() / text_tokens:.2%} "
          f"({int((em >= 0).sum()):,} of {text_tokens:,}) |")
    print(f"| MinED coverage | {(vmap[np.array([t is not None for t in src_texts])] >= 0).mean():.2%} |")
    print(f"| goal MinED ≤ 2 min on 2 cores | {'met' if t_mined <= 120 else 'NOT met'} |")


if __name__ == "__main__":
    main()
