"""The extract stage: window cutting, offsets, batching, and the stored distributions against a
plain transformers forward pass, on two tiny models (Llama + byte-level BPE, Gemma3 + `▁`/BOS)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer

from fusedata.codec import DEFAULT_CODEC, codec_from_schema
from fusedata.errors import UsageError
from fusedata.stages.extract import ExtractConfig, ExtractStage
from fusedata.topk import TopK
from fusedata.vocab import token_bytes
from fusedata.windows import batch_by_budget, char_to_byte, window_bounds

# -- window_bounds ---------------------------------------------------------------------------


def _predicted(bounds: list[tuple[int, int]], bos_prefixed: bool) -> list[int]:
    """Token positions predicted by the windows, in order. Without a BOS a window [s, e)
    predicts tokens s+1..e-1; with one, the window is [BOS] + tokens[s:e] and predicts s..e-1."""
    out: list[int] = []
    for s, e in bounds:
        out += list(range(s, e)) if bos_prefixed else list(range(s + 1, e))
    return out


def _check_bounds(n: int, max_length: int, bos_prefixed: bool) -> None:
    bounds = window_bounds(n, max_length, bos_prefixed)
    # every token after the first is predicted exactly once, in order
    assert _predicted(bounds, bos_prefixed) == list(range(1, n))
    for s, e in bounds:
        assert 0 <= s < e <= n
        length = (e - s + 1) if bos_prefixed else (e - s)  # the BOS is re-prepended
        assert 2 <= length <= max_length
    if not bos_prefixed:
        for (_, e0), (s1, _) in zip(bounds, bounds[1:], strict=False):
            assert s1 == e0 - 1  # consecutive windows share exactly one token
    else:
        for (_, e0), (s1, _) in zip(bounds, bounds[1:], strict=False):
            assert s1 == e0  # no overlap: the shared context is the BOS
        if bounds:
            assert bounds[0][0] == 1  # the document's own BOS is the first window's first token


@pytest.mark.parametrize("bos_prefixed", [False, True])
def test_window_bounds_examples(bos_prefixed):
    if bos_prefixed:
        assert window_bounds(10, 4, True) == [(1, 4), (4, 7), (7, 10)]
        assert window_bounds(1, 4, True) == []  # a lone BOS predicts nothing
        assert window_bounds(2, 4, True) == [(1, 2)]
    else:
        assert window_bounds(10, 4, False) == [(0, 4), (3, 7), (6, 10)]
        assert window_bounds(1, 4, False) == []
        assert window_bounds(2, 4, False) == [(0, 2)]
        assert window_bounds(4, 4, False) == [(0, 4)]
        assert window_bounds(5, 4, False) == [(0, 4), (3, 5)]
    for n in range(0, 40):
        for max_length in range(2 + bos_prefixed, 12):
            _check_bounds(n, max_length, bos_prefixed)


@settings(max_examples=300, deadline=None)
@given(n=st.integers(0, 3000), max_length=st.integers(2, 600), bos_prefixed=st.booleans())
def test_window_bounds_property(n, max_length, bos_prefixed):
    if max_length < 2 + bos_prefixed:
        with pytest.raises(UsageError, match="--max-length"):
            window_bounds(n, max_length, bos_prefixed)
        return
    _check_bounds(n, max_length, bos_prefixed)


def test_window_bounds_too_short():
    with pytest.raises(UsageError, match="at least 2"):
        window_bounds(10, 1, False)
    with pytest.raises(UsageError, match="at least 3"):
        window_bounds(10, 2, True)


# -- char_to_byte ----------------------------------------------------------------------------


def _char_to_byte_ref(text: str) -> list[int]:
    return [len(text[:i].encode("utf-8")) for i in range(len(text) + 1)]


@pytest.mark.parametrize("text", ["", "a", "hello world", "café", "€uro", "😀", "a😀b€c é", "\x7f\x80\u07ff\u0800\uffff\U00010000"])
def test_char_to_byte_examples(text):
    got = char_to_byte(text)
    assert got.tolist() == _char_to_byte_ref(text)
    assert got[-1] == len(text.encode("utf-8"))


@settings(max_examples=200, deadline=None)
@given(text=st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=200))
def test_char_to_byte_property(text):
    assert char_to_byte(text).tolist() == _char_to_byte_ref(text)


# -- batch_by_budget -------------------------------------------------------------------------


def _check_batches(lengths: list[int], budget: int) -> None:
    batches = batch_by_budget(lengths, budget)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))  # every window exactly once
    for b in batches:
        assert b, "no empty batch"
        padded = len(b) * max(lengths[i] for i in b)
        assert padded <= budget or len(b) == 1  # a lone window longer than the budget still runs


def test_batch_by_budget_examples():
    assert batch_by_budget([], 100) == []
    assert batch_by_budget([10, 10, 10], 30) == [[0, 1, 2]]
    assert batch_by_budget([10, 10, 10], 29) == [[0, 1], [2]]
    assert batch_by_budget([50, 5], 10) == [[0], [1]]  # longest first, alone over budget
    assert batch_by_budget([3, 9, 5], 18) == [[1, 2], [0]]


@pytest.mark.parametrize(("configured", "device", "want"), [(0, "cpu", 1024), (0, "cuda", 8192), (0, "cuda:1", 8192),
                                                          (300, "cpu", 300), (300, "cuda", 300)])
def test_batch_tokens_default_by_device(configured, device, want):
    stage = ExtractStage(ExtractConfig(model="anything", batch_tokens=configured, device=device))
    assert stage.batch_tokens() == want


@pytest.mark.parametrize("field", ["batch_tokens", "vllm_batch_tokens"])
def test_negative_batch_tokens_is_a_usage_error(tiny_llama, field):
    with pytest.raises(UsageError, match=field):
        ExtractStage(ExtractConfig(model=str(tiny_llama), **{field: -1})).prepare()


@settings(max_examples=300, deadline=None)
@given(lengths=st.lists(st.integers(1, 300), max_size=60), budget=st.integers(1, 2000))
def test_batch_by_budget_property(lengths, budget):
    _check_batches(lengths, budget)


# -- the stage on tiny models ----------------------------------------------------------------

LONG_TEXT = " ".join(
    [
        "The lighthouse keeper wrote the weather in a thick book every morning, café au lait in hand.",
        "def area(r):\n    return 3.14159 * r * r\n",
        "Ünïcödé — 😀 and € signs sit between ordinary words.",
    ]
    * 3
)


def _docs(docs: list[dict]) -> pa.Table:
    return pa.table({"doc_id": [d["id"] for d in docs], "text": [d["text"] for d in docs]})


def _decode(table: pa.Table, k: int) -> list[TopK]:
    """The stored distributions, one TopK per row (window)."""
    topk = codec_from_schema(table.schema, "stage output").decode(table, k)
    return [topk.window(i) for i in range(table.num_rows)]


class Reference:
    """A plain transformers forward pass: log_softmax(model(input_ids).logits) of one window."""

    def __init__(self, folder: Path) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def logprobs(self, ids: list[int]) -> torch.Tensor:
        with torch.inference_mode():
            logits = self.model(input_ids=torch.tensor([ids], dtype=torch.long)).logits[0]  # [n, V]
        return torch.log_softmax(logits.double(), dim=-1)  # [n, V]


@pytest.fixture(scope="module")
def references(tiny_llama, tiny_gemma) -> dict[Path, Reference]:
    return {tiny_llama: Reference(tiny_llama), tiny_gemma: Reference(tiny_gemma)}


def _run_stage(folder: Path, docs: pa.Table, **kw) -> tuple[ExtractStage, pa.Table]:
    kw.setdefault("codec", "raw")  # lossless, so stored values can be compared to 1e-4
    stage = ExtractStage(ExtractConfig(model=str(folder), **kw))
    return stage, stage(docs)


def test_tiny_tokenizers_are_what_the_tests_need(tiny_llama, tiny_gemma):
    llama = AutoTokenizer.from_pretrained(tiny_llama)
    gemma = AutoTokenizer.from_pretrained(tiny_gemma)
    assert llama.is_fast and gemma.is_fast
    assert llama.bos_token_id is None and len(llama("x")["input_ids"]) == 1
    assert any(t.startswith("Ġ") for t in llama.convert_ids_to_tokens(llama(" the dog")["input_ids"]))
    bos = gemma.bos_token_id
    assert bos is not None and gemma("x")["input_ids"][0] == bos
    toks = gemma.convert_ids_to_tokens(gemma("the dog 😀")["input_ids"])
    assert any(t.startswith("▁") for t in toks)
    assert "<0xF0>" in toks  # byte fallback for a character the tokenizer never saw
    assert llama.vocab_size != gemma.vocab_size


def test_tiny_models_are_deterministic(tiny_llama, tiny_gemma, tmp_path):
    import tiny_models

    for build, folder in [(tiny_models.build_tiny_llama, tiny_llama), (tiny_models.build_tiny_gemma, tiny_gemma)]:
        again = build(tmp_path / folder.name)
        for name in ["model.safetensors", "tokenizer.json", "config.json"]:
            assert (again / name).read_bytes() == (folder / name).read_bytes(), name


@pytest.mark.parametrize("max_length", [16, 1024])
def test_stage_matches_plain_forward(tiny_model, references, corpus_docs, max_length):
    k = 7
    docs = _docs(corpus_docs + [{"id": "long", "text": LONG_TEXT}])
    stage, table = _run_stage(tiny_model, docs, top_k=k, max_length=max_length, batch_tokens=64)
    ref = references[tiny_model]
    tok = ref.tokenizer
    bos = tok.bos_token_id
    assert table.schema.equals(stage.schema, check_metadata=True)
    rows = table.to_pylist()
    windows = _decode(table, k)
    assert len(rows) == len(windows)

    by_doc: dict[str, list[int]] = {}
    for r, row in enumerate(rows):
        by_doc.setdefault(row["doc_id"], []).append(r)
    assert list(by_doc) == docs.column("doc_id").to_pylist()  # document order kept

    n_split = 0
    for doc_id, text in zip(docs.column("doc_id").to_pylist(), docs.column("text").to_pylist(), strict=True):
        enc = tok(text, return_offsets_mapping=True)
        full_ids = enc["input_ids"]
        byte_at = _char_to_byte_ref(text)
        full_start = [byte_at[a] for a, _ in enc["offset_mapping"]]
        full_end = [byte_at[b] for _, b in enc["offset_mapping"]]
        doc_rows = by_doc[doc_id]
        assert [rows[r]["window"] for r in doc_rows] == list(range(len(doc_rows)))
        n_split += len(doc_rows) > 1

        # the windows cover the document: every token after the first is predicted once
        rebuilt: list[int] = []
        starts: list[int] = []
        ends: list[int] = []
        for w, r in enumerate(doc_rows):
            ids = rows[r]["input_ids"]
            assert 2 <= len(ids) <= max_length
            if bos is not None:
                assert ids[0] == bos  # Gemma style: every window starts with <bos>
                assert rows[r]["token_start"][0] == rows[r]["token_end"][0]  # the BOS covers no bytes
                body = slice(1, None)
                if w == 0:
                    rebuilt, starts, ends = [bos], [0], [0]
            else:
                body = slice(0, None) if w == 0 else slice(1, None)  # windows share one token
                if w > 0:
                    assert ids[0] == rebuilt[-1]
            rebuilt += ids[body]
            starts += rows[r]["token_start"][body]
            ends += rows[r]["token_end"][body]
            assert rows[r]["byte_start"] == rows[r]["token_start"][0]
            assert rows[r]["byte_end"] == max(rows[r]["token_end"])
        assert rebuilt == full_ids
        # byte offsets are the tokenizer's character offsets converted to UTF-8 bytes, except for
        # tokens that split one character: those get exactly the bytes they stand for
        piece_bytes = token_bytes(stage.tokenizer)
        raw = text.encode()
        for t in range(1, len(full_ids)):
            assert full_start[t] <= starts[t] <= ends[t] <= full_end[t]
            if (starts[t], ends[t]) != (full_start[t], full_end[t]):
                assert raw[starts[t] : ends[t]] == piece_bytes[full_ids[t]]

        # the distributions equal a plain forward pass of each window
        for r in doc_rows:
            ids = rows[r]["input_ids"]
            got = windows[r]
            lp = ref.logprobs(ids)[:-1]  # [n-1, V] position t predicts token t+1
            want_vals, want_ids = lp.topk(k, dim=-1)
            assert got.lengths.tolist() == [len(ids) - 1]
            np.testing.assert_array_equal(got.ids, want_ids.numpy())
            np.testing.assert_allclose(got.logprobs, want_vals.numpy(), atol=1e-4, rtol=0)
            assert np.all(np.diff(got.logprobs, axis=1) <= 0)  # sorted descending
            gold = lp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0].numpy()
            np.testing.assert_allclose(got.gold_logprob, gold, atol=1e-4, rtol=0)
            tail = 1.0 - np.exp(got.logprobs.astype(np.float64)).sum(axis=1)
            np.testing.assert_allclose(got.tail_mass, tail, atol=1e-6, rtol=0)
            np.testing.assert_allclose(got.tail_mass, 1.0 - np.exp(want_vals.numpy()).sum(axis=1), atol=1e-4)
            assert np.all((got.tail_mass > 0) & (got.tail_mass < 1))  # log-softmax over the full vocab
            assert rows[r]["ce"] == pytest.approx(float(-got.gold_logprob.astype(np.float64).mean()), rel=1e-6)  # float32
            assert rows[r]["ce"] == pytest.approx(float(-gold.mean()), abs=1e-4)
    if max_length == 16:
        assert n_split >= 3  # the long documents really were split


def test_byte_offsets_slice_the_text(tiny_model, corpus_docs):
    docs = _docs(corpus_docs)
    stage, table = _run_stage(tiny_model, docs, top_k=3, max_length=24)
    tok = stage.tokenizer
    texts = dict(zip(docs.column("doc_id").to_pylist(), docs.column("text").to_pylist(), strict=True))
    checked = total = 0
    pieces = token_bytes(tok)
    for row in table.to_pylist():
        data = texts[row["doc_id"]].encode("utf-8")
        prev = 0
        for i, (tid, s, e) in enumerate(zip(row["input_ids"], row["token_start"], row["token_end"], strict=True)):
            assert 0 <= s <= e <= len(data)
            assert e >= prev or s == e  # offsets never go backwards (a multi-byte char may repeat)
            prev = max(prev, s)
            if tid in tok.all_special_ids:
                assert s == e
                continue
            total += 1
            piece = tok.decode([tid], clean_up_tokenization_spaces=False)
            if "\ufffd" in piece:  # part of a multi-byte character: exactly the bytes it stands for
                assert data[s:e] == pieces[tid], (i, tid, piece, data[s:e])
            else:
                assert data[s:e].decode("utf-8") == piece, (i, tid, piece)
                checked += 1
    assert checked >= 0.75 * total


def test_non_ascii_offsets_exact(tiny_model):
    """Byte offsets of tokens after a 4-byte emoji: each tail token's span starts at the byte
    where its characters start in the UTF-8 text."""
    text = "😀 café € ok"
    stage, table = _run_stage(tiny_model, _docs([{"id": "e", "text": text}]), top_k=2)
    (row,) = table.to_pylist()
    data = text.encode()
    ok_at = data.index(b"ok")
    assert row["byte_end"] == len(data)
    assert ok_at in row["token_start"] or ok_at - 1 in row["token_start"]  # "ok" or " ok"
    assert data[row["token_start"][-1] : row["token_end"][-1]].decode().strip() in {"ok", "k"}


@pytest.mark.parametrize("lm_head_floats", [1, 1000])
def test_chunked_head_equals_single_chunk(tiny_model, corpus_docs, lm_head_floats):
    """Chunks of 1-2 positions give the same result as one chunk per batch. Values agree to a few
    float32 ulps, not bit for bit: a CPU matmul's rounding depends on the number of rows."""
    docs = _docs(corpus_docs + [{"id": "long", "text": LONG_TEXT}])
    stage, small = _run_stage(tiny_model, docs, top_k=5, max_length=32, lm_head_floats=lm_head_floats)
    assert max(1, lm_head_floats // stage.vocab_size) <= 2  # 1-2 positions per chunk: many chunks
    _, big = _run_stage(tiny_model, docs, top_k=5, max_length=32, lm_head_floats=1 << 24)
    assert small.num_rows == big.num_rows
    a, b = _decode(small, 5), _decode(big, 5)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_array_equal(x.ids, y.ids)
        np.testing.assert_allclose(x.logprobs, y.logprobs, atol=5e-6, rtol=0)
        np.testing.assert_allclose(x.gold_logprob, y.gold_logprob, atol=5e-6, rtol=0)
        np.testing.assert_allclose(x.tail_mass, y.tail_mass, atol=5e-6, rtol=0)
    for col in ["doc_id", "window", "byte_start", "byte_end", "input_ids", "token_start", "token_end"]:
        assert small.column(col).equals(big.column(col))


def test_batch_budget_does_not_change_results(tiny_model, corpus_docs):
    """Padding windows to the longest of their batch must not leak into the results."""
    docs = _docs(corpus_docs + [{"id": "long", "text": LONG_TEXT}])
    _, one = _run_stage(tiny_model, docs, top_k=5, max_length=32, batch_tokens=1)  # one window per batch
    _, many = _run_stage(tiny_model, docs, top_k=5, max_length=32, batch_tokens=100_000)
    for x, y in zip(_decode(one, 5), _decode(many, 5), strict=True):
        np.testing.assert_array_equal(x.ids, y.ids)
        np.testing.assert_allclose(x.logprobs, y.logprobs, atol=1e-5, rtol=0)
        np.testing.assert_allclose(x.gold_logprob, y.gold_logprob, atol=1e-5, rtol=0)
    assert one.column("input_ids").equals(many.column("input_ids"))


def test_on_tokens_counts_every_window_token(tiny_llama, corpus_docs):
    seen: list[int] = []
    stage = ExtractStage(ExtractConfig(model=str(tiny_llama), top_k=3, max_length=16, batch_tokens=32))
    table = stage(_docs(corpus_docs), seen.append)
    assert len(seen) > 1
    assert sum(seen) == sum(len(ids) for ids in table.column("input_ids").to_pylist())


def test_top_k_larger_than_vocab(tiny_model):
    vocab = AutoTokenizer.from_pretrained(tiny_model)
    n = len(vocab)
    with pytest.raises(UsageError, match=rf"--top-k {n + 1} must be between 1 and the vocabulary size {n}"):
        ExtractStage(ExtractConfig(model=str(tiny_model), top_k=n + 1)).prepare()
    with pytest.raises(UsageError, match="--top-k 0"):
        ExtractStage(ExtractConfig(model=str(tiny_model), top_k=0)).prepare()


def test_top_k_equal_to_vocab_has_no_tail(tiny_llama):
    n = len(AutoTokenizer.from_pretrained(tiny_llama))
    _, table = _run_stage(tiny_llama, _docs([{"id": "a", "text": "Hello world, the dog."}]), top_k=n)
    (w,) = _decode(table, n)
    np.testing.assert_allclose(np.exp(w.logprobs.astype(np.float64)).sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(w.tail_mass, 0.0, atol=1e-5)
    assert sorted(w.ids[0].tolist()) == list(range(n))


def test_identity_names_what_changes_output(tiny_llama, tiny_gemma):
    a = ExtractStage(ExtractConfig(model=str(tiny_llama), top_k=5)).identity()
    b = ExtractStage(ExtractConfig(model=str(tiny_llama), top_k=6)).identity()
    c = ExtractStage(ExtractConfig(model=str(tiny_gemma), top_k=5)).identity()
    assert a["top_k"] == 5 and b["top_k"] == 6
    assert {k for k in a if a[k] != b[k]} == {"top_k"}
    assert a["model_hash"] != c["model_hash"] and a["tokenizer_hash"] != c["tokenizer_hash"]
    assert a["vocab_size"] == len(AutoTokenizer.from_pretrained(tiny_llama))
    assert a["codec"]["name"] == DEFAULT_CODEC


def test_empty_docs_table_gives_empty_output(tiny_llama):
    stage, table = _run_stage(tiny_llama, pa.table({"doc_id": pa.array([], pa.string()), "text": pa.array([], pa.string())}))
    assert table.num_rows == 0 and table.schema.equals(stage.schema)


# -- sampled targets (--targets sampled:N) -------------------------------------------------------
def _sampled_stage(folder: Path, n: int, **kw) -> ExtractStage:
    kw.setdefault("codec", "raw")
    return ExtractStage(ExtractConfig(model=str(folder), targets=f"sampled:{n}", max_length=24, **kw))


def test_sampled_targets_are_unbiased(tiny_llama, references):
    """The mean of many sampled targets of one window converges to the model's full distribution.

    M sets of N draws of a position hold C_i ~ Binomial(NM, π_i) draws of id i, π_i = p_i / (1 − p1)
    (the top-1 is exact), and the mean estimate is (1 − p1)·C_i / NM. Tolerances from that variance:
    every id within a Bernstein bound at a total false-alarm rate of 1e-6, and the chi-square
    statistic Σ (C − E)² / E over all ids within 6 of its standard deviation (Poisson: 2 + 1/E per
    term), which a biased estimator (e.g. a truncated top-k) fails by far."""
    n_draws, sets = 16, 100
    stage = _sampled_stage(tiny_llama, n_draws)
    stage.setup()
    (window,) = stage.windows(_docs([{"id": "a", "text": "The lighthouse keeper wrote the weather."}]))
    p = torch.exp(references[tiny_llama].logprobs(window.ids.tolist())[:-1]).numpy()  # [P, V]
    P = len(p)
    topk = TopK.concat(stage.forward([window.ids] * sets, seeds=list(range(sets))))  # one batch of M copies
    np.testing.assert_array_equal(topk.tail_mass, 0.0)
    q = np.where(topk.ids >= 0, np.exp(topk.logprobs.astype(np.float64)), 0.0)  # [M*P, k]
    np.testing.assert_allclose(q.sum(1), 1.0, atol=1e-5)  # each set is a whole distribution
    rows = np.repeat(np.arange(sets * P) % P, topk.k)
    mean = np.zeros_like(p)
    valid = topk.ids.ravel() >= 0
    np.add.at(mean, (rows[valid], topk.ids.ravel()[valid]), q.ravel()[valid] / sets)
    top1 = p.argmax(1)
    p1 = p[np.arange(P), top1][:, None]  # [P, 1]
    np.testing.assert_allclose(mean[np.arange(P), top1], p1[:, 0], atol=1e-6)  # exact, not estimated
    others = np.ones_like(p, bool)
    others[np.arange(P), top1] = False
    draws = n_draws * sets
    pi = p / (1 - p1)  # [P, V] the distribution draws come from
    counts = np.rint(mean * draws / (1 - p1))  # C_i, recovered from the stored probabilities
    expected = draws * pi
    log_term = np.log(2 * others.sum() / 1e-6)
    tol = log_term / 3 + np.sqrt(log_term**2 / 9 + 2 * expected * (1 - pi) * log_term)  # Bernstein, in counts
    assert np.all(np.abs(counts - expected)[others] <= tol[others])
    chi2 = ((counts - expected) ** 2 / expected)[others]
    z = (chi2.sum() - (1 - pi[others]).sum()) / np.sqrt((2 + 1 / expected[others]).sum())
    assert abs(z) < 6, z
    # and the estimate does average out: the M-set mean is much closer than one set
    one = np.zeros_like(p)
    first = valid & (np.arange(valid.size) < P * topk.k)  # the first set's entries
    np.add.at(one, (rows[first], topk.ids.ravel()[first]), q.ravel()[first])
    assert np.abs(mean - p).sum(1).mean() < 0.25 * np.abs(one - p).sum(1).mean()


def test_sampled_targets_through_zq2_keep_ids_and_counts(tiny_llama, corpus_docs):
    """extract --targets sampled:N --codec zq@2 stores the sampled layout: the same ids as the lossless
    codec, the same count ratios between drawn entries, tail 0."""
    from fusedata.codec import zq2

    docs = _docs(corpus_docs)
    raw = TopK.concat(_decode(_sampled_stage(tiny_llama, 6, codec="raw")(docs), 7))
    out = _sampled_stage(tiny_llama, 6, codec="zq@2")(docs)
    assert zq2.Model.from_bytes(out.column(zq2.COLUMN).combine_chunks().field("model")[0].as_py()).sampled
    got = TopK.concat(_decode(out, 7))
    np.testing.assert_array_equal(got.ids, raw.ids)
    assert np.all(got.tail_mass == 0)
    e, _ = zq2.Sampled.detect(raw)
    rows = np.arange(raw.n_positions)
    drawn = raw.ids != -1
    drawn[rows, e] = False  # the drawn entries: their log-prob differences are log count ratios
    first = drawn.argmax(axis=1)
    for t in (raw, got):
        t.logprobs[...] = np.where(drawn, t.logprobs - t.logprobs[rows, first][:, None], 0.0)
    np.testing.assert_allclose(got.logprobs, raw.logprobs, atol=1e-5)


def test_sampled_targets_are_reproducible_by_window(tiny_llama, references, corpus_docs):
    docs = _docs(corpus_docs)
    one = _sampled_stage(tiny_llama, 6, batch_tokens=1)(docs)  # one window per batch
    many = _sampled_stage(tiny_llama, 6, batch_tokens=100_000)(docs)
    other = _sampled_stage(tiny_llama, 6, sample_seed=1)(docs)
    a, b, c = (TopK.concat(_decode(t, 7)) for t in (one, many, other))
    np.testing.assert_array_equal(a.ids, b.ids)
    np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-5)
    assert (a.ids != c.ids).any()
    # the top-1 id carries its exact probability; the gold log-prob is the model's
    for w, ids in zip(_decode(one, 7), one.column("input_ids").to_pylist(), strict=True):
        ref = references[tiny_llama].logprobs(ids)[:-1].numpy()  # [P, V]
        top1 = ref.argmax(1)
        at = (w.ids == top1[:, None]).argmax(1)
        np.testing.assert_allclose(w.logprobs[np.arange(len(at)), at], ref[np.arange(len(at)), top1], atol=1e-4)
        np.testing.assert_allclose(w.gold_logprob, ref[np.arange(len(ref)), ids[1:]], atol=1e-4)
        assert (np.diff(w.logprobs, axis=1)[np.isfinite(w.logprobs[:, 1:])] <= 1e-6).all()  # sorted descending


@pytest.mark.parametrize("targets, message", [
    ("sampled", "number of draws"), ("sampled:0", ">= 1"), ("beam:3", "topk:K or sampled:N"), ("topk:5", "disagrees"),
])
def test_targets_option_is_checked(targets, message):
    from fusedata.errors import OptionError

    with pytest.raises(OptionError, match=message):
        ExtractConfig(model="m", targets=targets, top_k=7)


def test_targets_option_normalises_top_k():
    assert ExtractConfig(model="m").targets == "topk:10"
    assert ExtractConfig(model="m", targets="topk:5").top_k == 5
    sampled = ExtractConfig(model="m", targets="sampled:12")
    assert (sampled.top_k, sampled.sample_n) == (13, 12)
    from fusedata.errors import OptionError

    with pytest.raises(OptionError, match="hf backend"):
        ExtractConfig(model="m", targets="sampled:12", backend="vllm")


def test_sampled_targets_through_align_fuse_and_train(tiny_llama, tiny_gemma, spine, corpus_file, tmp_path):
    """A sampled source aligns onto a top-k target; fusing it with the target's top-k is refused
    by name, fusing it alone works; the trainer's loss is the cross-entropy toward the draws."""
    from fusedata.stages.align import AlignConfig, AlignJob, run_align
    from fusedata.stages.extract import ExtractJob, run_extract
    from fusedata.stages.fuse import FuseConfig, FuseJob, run_fuse
    from fusedata.train import collate, compute_loss, shard_windows

    quiet = {"quiet": True, "log": lambda m: None}
    manifest = run_extract(ExtractJob([str(corpus_file)], str(tmp_path / "topk-gemma"),
                                      ExtractConfig(model=str(tiny_gemma), targets="sampled:8", max_length=24),
                                      docs_per_shard=2, **quiet))
    assert (manifest.run["targets"], manifest.run["top_k"]) == ("sampled:8", 9)
    run_align(AlignJob(str(spine / "topk/llama"), str(tmp_path / "topk-gemma"), str(tmp_path / "aligned"),
                       AlignConfig(cache_dir=str(spine / "vocab")), **quiet))
    with pytest.raises(UsageError, match="cannot fuse sampled with top-k"):
        run_fuse(FuseJob(str(spine / "topk/llama"), [str(tmp_path / "aligned")], str(tmp_path / "mixed"), **quiet))
    run_fuse(FuseJob(str(spine / "topk/llama"), [str(tmp_path / "aligned")], str(tmp_path / "fused"),
                     FuseConfig(include_target=False), **quiet))
    from fusedata.models.spec import ModelRef, load_model

    model = load_model(ModelRef("tiny", str(tiny_llama)))
    rows = shard_windows(str(tmp_path / "fused"), "shard-00000.parquet", need_topk=True)[:2]
    batch = collate(rows, with_topk=True)
    _, parts = compute_loss(model, batch, lam=0.5)
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=batch.input_ids, attention_mask=batch.attention).logits[:, :-1].double(), -1)
    want, n = 0.0, 0
    for b, r in enumerate(rows):
        q = np.where(r["topk_ids"] >= 0, np.exp(r["topk_lp"].astype(np.float64)), 0.0)  # [P, k] the empirical target
        np.testing.assert_allclose(q.sum(1)[np.asarray(r["tail"]) == 0], 1.0, atol=0.05)  # mapped draws: no tail
        ids = np.maximum(r["topk_ids"], 0)
        want -= float((q * logp[b, : len(q)].numpy()[np.arange(len(q))[:, None], ids]).sum())
        want -= float((np.asarray(r["tail"], np.float64) * np.log1p(-(np.exp(
            logp[b, : len(q)].numpy()[np.arange(len(q))[:, None], ids]) * (q > 0)).sum(1).clip(max=1 - 1e-6))).sum())
        n += len(q)
    assert parts["distill"] == pytest.approx(want / n, rel=1e-4)
