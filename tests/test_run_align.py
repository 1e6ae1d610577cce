"""Alignment: byte-offset and DTW position matching on hand-built cases, projection into the
target vocabulary (merging, lost mass, the next-token label fallback), and align runs end to
end on the tiny models (local executor): dataset layout, statistics, resume, refusals, and a
fuse run on top."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import fusedata.stages.base
from fusedata.align import DocPositions, align_window, match_by_bytes, match_by_dtw, project
from fusedata.codec import decode_topk
from fusedata.errors import UsageError
from fusedata.stages.align import AlignConfig, AlignJob, run_align
from fusedata.stages.extract import ExtractConfig, ExtractJob, run_extract
from fusedata.stages.fuse import FuseJob, run_fuse
from fusedata.topk import PAD_ID, TopK
from schemas.aligned import ALIGN_KINDS, FALLBACK, MANY_TO_ONE, ONE_TO_MANY, ONE_TO_ONE
from schemas.manifest import MANIFEST_NAME, Manifest

K = 5


def _topk(dists: list[list[tuple[int, float]]], k: int = 3) -> TopK:
    """TopK of len(dists) positions; each a list of (id, prob), padded with id -1."""
    n = len(dists)
    ids = np.full((n, k), PAD_ID, np.int32)
    lp = np.full((n, k), -np.inf, np.float32)
    for r, d in enumerate(dists):
        for c, (i, p) in enumerate(d):
            ids[r, c], lp[r, c] = i, np.log(p)
    mass = np.array([sum(p for _, p in d) for d in dists], np.float32)
    return TopK(ids, lp, np.log(np.maximum(mass, 1e-6)).astype(np.float32) - 1, 1 - mass, np.array([n], np.int64))


def _doc(spans: list[tuple[int, int]], dists: list[list[tuple[int, float]]] | None = None,
         gold: list[int] | None = None) -> DocPositions:
    """Source predictions: the byte span of each predicted token, its distribution, its id."""
    n = len(spans)
    dists = dists if dists is not None else [[(100 + j, 0.5)] for j in range(n)]
    topk = _topk(dists)
    return DocPositions(np.array([s for s, _ in spans], np.int64), np.array([e for _, e in spans], np.int64),
                        -topk.gold_logprob.astype(np.float64), np.array(gold or range(n), np.int32), topk)


def _target(spans: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    return np.array([s for s, _ in spans], np.int64), np.array([e for _, e in spans], np.int64)


# Text "the cat sat" (bytes 0-11). Target tokens: "the" | " cat" | " sat".
THE_CAT_SAT = [(0, 3), (3, 7), (7, 11)]


# --- position matching ------------------------------------------------------------------------

def test_match_by_bytes_one_to_one():
    src = _doc([(3, 7), (7, 11)])  # source predicts " cat", " sat"
    matched, kinds = match_by_bytes(*_target(THE_CAT_SAT), src)
    assert matched.tolist() == [0, 1] and kinds.tolist() == [ONE_TO_ONE, ONE_TO_ONE]


def test_match_by_bytes_many_to_one():
    # the source splits " cat" into " c" + "at": position 0 gets the FIRST piece's prediction
    src = _doc([(3, 5), (5, 7), (7, 11)])
    matched, kinds = match_by_bytes(*_target(THE_CAT_SAT), src)
    assert matched.tolist() == [0, 2]
    assert kinds.tolist() == [MANY_TO_ONE, ONE_TO_ONE]


def test_match_by_bytes_one_to_many():
    # target "the" | " ca" | "t" | " sat"; the source's " cat" covers " ca" and "t"
    tgt = _target([(0, 3), (3, 6), (6, 7), (7, 11)])
    src = _doc([(3, 7), (7, 11)])
    matched, kinds = match_by_bytes(*tgt, src)
    assert matched.tolist() == [0, -1, 1]
    assert kinds.tolist() == [ONE_TO_MANY, FALLBACK, ONE_TO_ONE]  # nothing of the source starts at "t"


def test_match_by_bytes_fallback():
    # the source tokenises "the c" | "at sat": no source token starts where " cat" or " sat" does
    src = _doc([(0, 5), (5, 11)])
    matched, kinds = match_by_bytes(*_target(THE_CAT_SAT), src)
    assert matched.tolist() == [-1, -1] and kinds.tolist() == [FALLBACK, FALLBACK]
    # no source predictions at all (a document the source never saw)
    empty = _doc([])
    matched, kinds = match_by_bytes(*_target(THE_CAT_SAT), empty)
    assert matched.tolist() == [-1, -1] and kinds.tolist() == [FALLBACK, FALLBACK]


def test_match_by_bytes_source_positions_are_document_wide():
    # the source predictions cover a longer document: only the ones at the target's bytes match
    src = _doc([(0, 3), (3, 7), (7, 11), (11, 15), (15, 20)])
    matched, kinds = match_by_bytes(*_target([(7, 11), (11, 15), (15, 18)]), src)
    assert matched.tolist() == [3, 4] and kinds.tolist() == [ONE_TO_ONE, ONE_TO_MANY]


def test_match_by_bytes_split_character():
    # "û" = C3 BB at bytes 10-12; target: "Ġco" | "Ã" | "»" | "te", source: "▁co" <0xC3> <0xBB> "te".
    # extract gives each piece of a split character its own byte (split_character_spans).
    tgt = _target([(7, 10), (10, 11), (11, 12), (12, 14)])
    src = _doc([(10, 11), (11, 12), (12, 14)])  # predictions of <0xC3>, <0xBB>, "te"
    matched, kinds = match_by_bytes(*tgt, src)
    assert matched.tolist() == [0, 1, 2]  # "»" gets the prediction of <0xBB>, not of <0xC3>
    assert kinds.tolist() == [ONE_TO_ONE] * 3


TEXTS_T = {0: "the", 1: " cat", 2: " sat", 3: " ca", 4: "t"}
TEXTS_S = {10: "the", 11: " cat", 12: " sat", 13: " c", 14: "at"}


def _dtw(tgt_ids: list[int], src_spans, src_gold) -> tuple[list[int], list[int]]:
    src = _doc(src_spans, gold=src_gold)
    tt = [TEXTS_T.get(i) for i in range(5)]
    st = [TEXTS_S.get(i) for i in range(15)]
    inside = np.ones(len(src_spans), bool)
    matched, kinds = match_by_dtw(np.array(tgt_ids, np.int32), src, inside, tt, st)
    return matched.tolist(), kinds.tolist()


def test_match_by_dtw_hand_cases():
    assert _dtw([0, 1, 2], [(3, 7), (7, 11)], [11, 12]) == ([0, 1], [ONE_TO_ONE, ONE_TO_ONE])
    # many:1: " cat" aligned to " c" and "at": the first piece
    assert _dtw([0, 1, 2], [(3, 5), (5, 7), (7, 11)], [13, 14, 12]) == ([0, 2], [MANY_TO_ONE, ONE_TO_ONE])
    # 1:many: " ca" and "t" both aligned to " cat" (DTW has no fallback: both get its prediction)
    assert _dtw([0, 3, 4, 2], [(3, 7), (7, 11)], [11, 12]) == ([0, 0, 1], [ONE_TO_MANY, ONE_TO_MANY, ONE_TO_ONE])


# --- projection ---------------------------------------------------------------------------------

def test_project_merges_ids_and_reports_lost_mass():
    src = _topk([[(10, 0.5), (11, 0.3), (12, 0.1)], [(12, 0.6), (13, 0.2), (14, 0.1)]])
    vmap = np.full(20, -1, np.int32)
    vmap[[10, 11, 13, 14]] = [5, 5, 7, 2]  # 10 and 11 land on target 5; 12 has no target
    labels = np.array([5, 9])
    out, kept = project(src, np.array([0, 1]), labels, vmap, target_vocab=50)
    p = np.exp(out.logprobs.astype(np.float64))
    assert out.ids[0].tolist() == [5, PAD_ID, PAD_ID]
    np.testing.assert_allclose(p[0], [0.8, 0, 0], atol=1e-7)  # 0.5 + 0.3 added
    assert out.ids[1].tolist() == [7, 2, PAD_ID]
    np.testing.assert_allclose(p[1], [0.2, 0.1, 0], atol=1e-7)
    assert np.isneginf(out.logprobs[0, 1:]).all() and np.isneginf(out.logprobs[1, 2])
    np.testing.assert_allclose(kept, [0.8 / 0.9, 0.3 / 0.9])  # id 12 lost its mass
    np.testing.assert_allclose(out.tail_mass, [0.2, 0.7], atol=1e-6)
    # gold: label 5 listed at 0.8; label 9 not listed: the tail spread over the 48 unlisted ids
    np.testing.assert_allclose(out.gold_logprob, [np.log(0.8), np.log(0.7 / 48)], rtol=1e-5)


def test_project_fallback_is_a_one_hot_on_the_label():
    src = _topk([[(10, 0.9)], [(11, 0.9)]])
    vmap = np.arange(20, dtype=np.int32)
    out, kept = project(src, np.array([-1, 1]), np.array([4, 6]), vmap, target_vocab=20)
    assert out.ids[0].tolist() == [4, PAD_ID, PAD_ID]
    assert out.logprobs[0, 0] == 0.0 and np.isneginf(out.logprobs[0, 1:]).all()
    assert out.gold_logprob[0] == 0.0 and out.tail_mass[0] == 0.0 and kept[0] == 1.0
    assert out.ids[1, 0] == 11  # the matched position keeps its own distribution, not the label
    assert out.gold_logprob[1] < np.log(0.1 / 18) + 1e-5


def test_align_window_fallback_uses_the_next_token_label():
    """FuseAI issue 27: the one-hot must be on ids[t+1] (what position t predicts), not ids[t]."""
    ids = np.array([40, 41, 42, 43], np.int32)
    start, end = _target([(0, 3), (3, 7), (7, 11), (11, 15)])
    src = _doc([(0, 5), (5, 9), (9, 15)])  # no source token starts at 3, 7 or 11
    w = align_window(ids, start, end, src, np.arange(200, dtype=np.int32), target_vocab=200)
    assert w.kinds.tolist() == [FALLBACK] * 3
    assert w.topk.ids[:, 0].tolist() == [41, 42, 43]  # ids[1:], the labels
    assert (w.topk.logprobs[:, 0] == 0).all() and (w.topk.gold_logprob == 0).all()
    assert w.mass_kept == 1.0


def test_align_window_mixed_kinds_and_source_cross_entropy():
    ids = np.array([40, 41, 42, 43], np.int32)  # "the" | " ca" | "t" | " sat" (then " on")
    start, end = _target([(0, 3), (3, 6), (6, 7), (7, 11)])
    # document-wide source predictions: "the"(0-3) " cat"(3-7) " sat"(7-11) " on"(11-14)
    src = _doc([(0, 3), (3, 7), (7, 11), (11, 14)], [[(1, 0.9)], [(2, 0.6), (3, 0.2)], [(4, 0.7)], [(5, 0.5)]])
    vmap = np.full(10, -1, np.int32)
    vmap[[1, 2, 3, 4, 5]] = [101, 102, 103, -1, 105]
    w = align_window(ids, start, end, src, vmap, target_vocab=200)
    assert w.kinds.tolist() == [ONE_TO_MANY, FALLBACK, ONE_TO_ONE]
    assert w.topk.ids[:2, 0].tolist() == [102, 42]  # " cat"'s prediction; the label "t"
    np.testing.assert_allclose(np.exp(w.topk.logprobs[0, :2]), [0.6, 0.2], rtol=1e-6)
    # " sat" is matched, but its only id has no target: all its mass is lost (no label one-hot)
    assert w.topk.ids[2].tolist() == [PAD_ID] * 3 and w.topk.tail_mass[2] == 1.0
    assert w.mass_kept == pytest.approx((1 + 1 + 0) / 3)
    # the source's own cross-entropy over the predictions inside the window's bytes (3-11)
    assert w.source_nll == pytest.approx((1 - np.log(0.8)) + (1 - np.log(0.7)), rel=1e-6)
    assert w.source_bytes == 8


# --- end to end on the tiny models ----------------------------------------------------------------

def _extract(model: Path, corpus: Path, out: Path, **cfg) -> Path:
    config = {"top_k": K, "max_length": 24, "batch_tokens": 256} | cfg
    run_extract(ExtractJob([str(corpus)], str(out), ExtractConfig(model=str(model), **config),
                           docs_per_shard=2, quiet=True, log=lambda *_: None))
    return out


@pytest.fixture(scope="module")
def extracted(tiny_llama, tiny_gemma, corpus_file, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("align-e2e")
    return {"llama": _extract(tiny_llama, corpus_file, root / "llama"),
            "gemma": _extract(tiny_gemma, corpus_file, root / "gemma"),
            "root": root}


def _align(target: Path, source: Path, out: Path, logs: list | None = None, **cfg) -> Manifest:
    config = AlignConfig(cache_dir=str(out.parent / "vocab"), **cfg)
    return run_align(AlignJob(str(target), str(source), str(out), config, quiet=True,
                              log=(logs if logs is not None else []).append))


def _tables(folder: Path) -> list:
    return [pq.read_table(folder / s.name) for s in Manifest.read(folder).shards]


@pytest.mark.parametrize("sequence", ["bytes", "dtw"])
@pytest.mark.parametrize("vocab", ["exact", "mined"])
def test_align_run_end_to_end(extracted, tmp_path, sequence, vocab):
    from transformers import AutoTokenizer

    target, source = extracted["llama"], extracted["gemma"]
    out = tmp_path / "aligned"
    logs: list[str] = []
    manifest = _align(target, source, out, logs, sequence=sequence, vocab=vocab)
    tman = Manifest.read(target)
    assert manifest.kind == "aligned"
    assert [s.name for s in manifest.shards] == [s.name for s in tman.shards]
    assert (out / MANIFEST_NAME).is_file()
    vocab_size = int(tman.run["vocab_size"])
    assert vocab_size == len(AutoTokenizer.from_pretrained(tman.run["model_path"]))
    counts = np.zeros(4)
    for t_tab, a_tab in zip(_tables(target), _tables(out), strict=True):
        assert a_tab.column("doc_id").to_pylist() == t_tab.column("doc_id").to_pylist()
        assert a_tab.column("window").to_pylist() == t_tab.column("window").to_pylist()
        ids = t_tab.column("input_ids").to_pylist()
        kinds = a_tab.column("align_kind").to_pylist()
        assert [len(k) for k in kinds] == [len(i) - 1 for i in ids]
        topk = decode_topk(a_tab)
        assert topk.lengths.tolist() == [len(i) - 1 for i in ids]
        assert ((topk.ids == PAD_ID) | ((topk.ids >= 0) & (topk.ids < vocab_size))).all()
        p = np.exp(topk.logprobs.astype(np.float64))
        assert (p.sum(axis=1) <= 1 + 1e-5).all()
        assert np.isneginf(topk.logprobs[topk.ids == PAD_ID]).all()
        flat_kinds = np.concatenate([np.asarray(k, np.int8) for k in kinds])
        labels = np.concatenate([np.asarray(i[1:]) for i in ids])
        counts += np.bincount(flat_kinds, minlength=4)
        fb = flat_kinds == FALLBACK
        assert (topk.ids[fb, 0] == labels[fb]).all() and (topk.logprobs[fb, 0] == 0).all()
        assert (topk.ids[fb, 1:] == PAD_ID).all()
        mass = a_tab.column("mass_kept").to_numpy()
        assert ((mass >= 0) & (mass <= 1 + 1e-6)).all()
        assert (a_tab.column("source_bytes").to_numpy() > 0).all()
        assert (a_tab.column("source_nll").to_numpy() > 0).all()
    stats = manifest.stats
    assert stats["positions"] == counts.sum() == sum(len(i) - 1 for t in _tables(target)
                                                     for i in t.column("input_ids").to_pylist())
    assert set(stats["kinds"]) == set(ALIGN_KINDS.values())
    assert sum(stats["kinds"].values()) == pytest.approx(1.0, abs=1e-3)
    for code, name in ALIGN_KINDS.items():
        assert stats["kinds"][name] == pytest.approx(counts[code] / counts.sum(), abs=1e-4)
    assert stats["kinds"]["1:1"] > 0.3  # two real tokenizers over the same English text
    assert 0 < stats["mass_kept"] <= 1 + 1e-6 and 0 < stats["vocab_mapped"] <= 1
    if vocab == "mined":
        assert stats["vocab_mapped"] > 0.95  # every non-special source token has a nearest target
    if sequence == "dtw":
        assert stats["kinds"]["fallback"] == 0  # DTW aligns every target token to some source token
    assert any("target positions" in line for line in logs)


def _sparse(ids: np.ndarray, logprobs: np.ndarray, drop: set[int]) -> dict[int, float]:
    return {int(i): float(np.exp(lp)) for i, lp in zip(ids, logprobs, strict=True) if i != PAD_ID and i not in drop}


@pytest.mark.parametrize("sequence", ["bytes", "dtw"])
def test_self_alignment_is_the_identity(extracted, tmp_path, sequence):
    """A model aligned onto itself: every position 1:1 and the same distribution, less the special
    tokens (EOS, PAD: they never map, so their mass is the only mass lost)."""
    from transformers import AutoTokenizer

    target = extracted["llama"]
    specials = set(AutoTokenizer.from_pretrained(Manifest.read(target).run["model_path"]).all_special_ids)
    manifest = _align(target, target, tmp_path / "self", sequence=sequence, vocab="exact", codec="raw")
    assert manifest.stats["vocab_mapped"] == pytest.approx(1 - len(specials) / 400)
    checked = 0
    for t_tab, a_tab in zip(_tables(target), _tables(tmp_path / "self"), strict=True):
        want, got = decode_topk(t_tab), decode_topk(a_tab)
        kinds = np.concatenate([np.asarray(k) for k in a_tab.column("align_kind").to_pylist()])
        # tokens that split one character share its byte span (byte offsets come from character
        # offsets): the byte method cannot tell them apart, so it is only checked elsewhere
        starts = t_tab.column("token_start").to_pylist()
        ok = np.concatenate([[s[t + 1] != s[t] for t in range(len(s) - 1)] for s in starts])
        if sequence == "dtw":
            ok[:] = True
        assert (kinds[ok] == ONE_TO_ONE).all()
        mass = []
        for r in np.flatnonzero(ok):
            w = _sparse(want.ids[r], want.logprobs[r], specials)
            g = _sparse(got.ids[r], got.logprobs[r], set())
            assert g.keys() == w.keys()
            np.testing.assert_allclose([g[i] for i in w], list(w.values()), rtol=1e-5)
            mass.append(sum(w.values()) / np.exp(want.logprobs[r]).sum())
            checked += 1
        sizes = [len(s) - 1 for s in starts]
        kept = a_tab.column("mass_kept").to_numpy()
        if ok.all():
            np.testing.assert_allclose(kept, np.add.reduceat(mass, np.cumsum([0] + sizes[:-1])) / sizes, rtol=1e-5)
    assert checked > 200


def _snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(folder.iterdir())}


def test_align_resume_and_noop_rerun(extracted, tmp_path, monkeypatch):
    target, source = extracted["llama"], extracted["gemma"]
    ref = _align(target, source, tmp_path / "ref")

    out = tmp_path / "aligned"
    calls = {"n": 0}
    real = fusedata.stages.base.process_shard

    def fail_second(*a, **k):
        calls["n"] += 1
        if calls["n"] > 1:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(fusedata.stages.base, "process_shard", fail_second)
    with pytest.raises(KeyboardInterrupt):
        _align(target, source, out)
    monkeypatch.undo()
    assert not (out / MANIFEST_NAME).exists()
    first = out / "shard-00000.parquet"
    before = (first.stat().st_ino, first.stat().st_mtime_ns)
    manifest = _align(target, source, out)
    assert (first.stat().st_ino, first.stat().st_mtime_ns) == before  # not recomputed
    assert [(s.name, s.rows, s.sha256) for s in manifest.shards] == [(s.name, s.rows, s.sha256) for s in ref.shards]
    assert manifest.stats == ref.stats

    # a complete run is a no-op: nothing computed, nothing rewritten, not even the vocabulary map
    snap = _snapshot(out)

    def no_work(*a, **k):
        raise AssertionError("a complete run must not compute anything")

    monkeypatch.setattr(fusedata.stages.base, "process_shard", no_work)
    monkeypatch.setattr(fusedata.vocab, "mined_map", no_work)
    logs: list[str] = []
    assert _align(target, source, out, logs) == manifest
    assert _snapshot(out) == snap
    assert any("already complete, nothing to do" in line for line in logs)
    # other settings into the same folder are refused
    with pytest.raises(UsageError, match="another run's output"):
        _align(target, source, out, vocab="exact")


def test_align_refuses_bad_inputs(extracted, tiny_gemma, corpus_file, tmp_path):
    target = extracted["llama"]
    other = tmp_path / "other.jsonl"
    other.write_text(corpus_file.read_text(encoding="utf-8").replace("lighthouse", "windmill"), encoding="utf-8")
    source = _extract(tiny_gemma, other, tmp_path / "gemma-other")
    with pytest.raises(UsageError, match="different corpora"):
        _align(target, source, tmp_path / "aligned")
    assert not (tmp_path / "aligned").exists()
    with pytest.raises(UsageError, match="--vocab"):
        _align(target, extracted["gemma"], tmp_path / "aligned", vocab="fuzzy")
    with pytest.raises(UsageError, match="--sequence"):
        _align(target, extracted["gemma"], tmp_path / "aligned", sequence="needleman")
    with pytest.raises(UsageError, match="no such dataset"):
        _align(tmp_path / "nothing", extracted["gemma"], tmp_path / "aligned")


def test_fuse_on_aligned(extracted, tiny_llama, corpus_file, tmp_path):
    target, source = extracted["llama"], extracted["gemma"]
    aligned = tmp_path / "aligned"
    _align(target, source, aligned)
    fused = run_fuse(FuseJob(str(target), [str(aligned)], str(tmp_path / "fused"), quiet=True, log=lambda *_: None))
    assert fused.kind == "fused"
    assert [s.name for s in fused.shards] == [s.name for s in Manifest.read(target).shards]
    assert fused.rows == Manifest.read(target).rows
    assert fused.stats["positions"] == Manifest.read(aligned).stats["positions"]
    assert sum(fused.stats["winning_share"]) == pytest.approx(1.0, abs=1e-3)

    # the same model and corpus windowed differently is another target: refused, saying what differs
    target16 = _extract(tiny_llama, corpus_file, tmp_path / "llama16", max_length=16)
    with pytest.raises(UsageError, match=r"different target.*max_length: 24 vs 16"):
        run_fuse(FuseJob(str(target16), [str(aligned)], str(tmp_path / "fused16"), quiet=True, log=lambda *_: None))
    assert not (tmp_path / "fused16").exists()


def test_vocab_map_file_for_the_stage(extracted, tmp_path):
    """The stage loads the map from a file named by its content: the cached map itself."""
    _align(extracted["llama"], extracted["gemma"], tmp_path / "aligned", vocab="exact")
    run_maps = list((tmp_path / "vocab").glob("map-*.npy"))
    cached = list((tmp_path / "vocab").glob("vocab-exact-*.npy"))
    assert len(run_maps) == 1 and len(cached) == 1
    assert np.array_equal(np.load(run_maps[0]), np.load(cached[0]))
    assert not list((tmp_path / "vocab").glob("*.tmp*"))


def _move_model(dataset: Path, to: Path) -> None:
    """Rewrite where a topk dataset says its model was found, as on another machine."""
    import json

    for name in (MANIFEST_NAME, "_run.json"):
        d = json.loads((dataset / name).read_text())
        run = d["run"] if name == MANIFEST_NAME else d
        run["model_path"] = str(to)
        (dataset / name).write_text(json.dumps(d))


def test_align_finds_the_tokenizer_again_when_the_model_moved(extracted, tmp_path):
    """A dataset copied elsewhere (or a moved FUSEDATA_CACHE): align resolves the model spec again
    and checks its tokenizer hash; the output equals the align of the originals."""
    import shutil

    moved = {}
    for name in ("llama", "gemma"):
        moved[name] = tmp_path / name
        shutil.copytree(extracted[name], moved[name])
        _move_model(moved[name], tmp_path / "gone" / name)
    here = _align(extracted["llama"], extracted["gemma"], tmp_path / "a1", codec="raw")
    there = _align(moved["llama"], moved["gemma"], tmp_path / "a2", codec="raw")
    assert [t.to_pylist() for t in _tables(tmp_path / "a1")] == [t.to_pylist() for t in _tables(tmp_path / "a2")]
    assert here.run == there.run  # the location is not part of the run: the same digests
    # a model spec that now resolves to another tokenizer is refused
    import json

    d = json.loads((moved["gemma"] / MANIFEST_NAME).read_text())
    d["run"]["model"] = Manifest.read(extracted["llama"]).run["model"]  # the llama model, not gemma's
    (moved["gemma"] / MANIFEST_NAME).write_text(json.dumps(d))
    with pytest.raises(UsageError, match="tokenizer hash differs"):
        _align(moved["llama"], moved["gemma"], tmp_path / "a3")


def test_a_run_is_the_same_run_wherever_its_model_was_found(tmp_path):
    from fusedata.dataset import DatasetDir, run_digest, same_run

    a = {"stage": "extract", "model": "m", "model_path": "/one/m", "model_hash": "h", "inner": {"model_path": "/x"}}
    b = {**a, "model_path": "/two/m", "inner": {"model_path": "/y"}}
    assert same_run(a, b) and run_digest(a) == run_digest(b)
    assert not same_run(a, {**a, "model_hash": "other"})
    out = DatasetDir(tmp_path / "ds")
    out.begin(a)
    out.begin(b)  # no refusal; the run file now says where the model is found
    assert (tmp_path / "ds" / "_run.json").read_text().count("/two/m") == 1
    with pytest.raises(UsageError, match="another run"):
        out.begin({**a, "model_hash": "other"})
