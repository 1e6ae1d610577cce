"""`fusedata.load` (a datasets.Dataset with lazily decoded top-k), the PyTorch IterableDataset and
collator, `fusion_loss` against a dense reference, and the README's training-loop example run as is."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

import fusedata
from cli.main import main
from fusedata.codec import decode_topk
from fusedata.torch_data import FusionIterableDataset, collate_fusion
from fusedata.train import collate, fusion_loss, shard_windows
from schemas.manifest import Manifest

README = Path(__file__).parents[1] / "README.md"


@pytest.fixture(scope="module")
def fused_plain(spine, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("load") / "fused-plain"
    r = CliRunner().invoke(main, ["export", str(spine / "fused"), "--output", str(out), "--quiet"])
    assert r.exit_code == 0, r.output
    return out


def test_load_decodes_rows_on_access(spine, fused_plain, tmp_path):
    want = decode_topk(pq.read_table(spine / "fused"))
    off = want.offsets()
    for folder in (spine / "fused", fused_plain):  # the codec and the plain layout give the same rows
        ds = fusedata.load(folder, cache_dir=str(tmp_path / "cache"))
        assert ds.num_rows == Manifest.read(spine / "fused").rows
        assert ds.format["type"] == "custom"  # a transform: nothing decoded until a row is read
        for i in (0, ds.num_rows - 1):
            row, s = ds[i], slice(int(off[i]), int(off[i + 1]))
            np.testing.assert_array_equal(row["topk_ids"], want.ids[s])
            np.testing.assert_array_equal(row["topk_logprobs"], want.logprobs[s])
            np.testing.assert_array_equal(row["gold_logprob"], want.gold_logprob[s])
            np.testing.assert_array_equal(row["tail_mass"], want.tail_mass[s])
            assert len(row["input_ids"]) == row["topk_ids"].shape[0] + 1
        batch = ds.select([1, 2])[:]  # through datasets' own API: a selection, then a slice
        np.testing.assert_array_equal(batch["topk_ids"][1], want.ids[int(off[2]):int(off[3])])
        assert "winner" in batch and "topk_zq" not in batch


def test_iterable_dataset_gives_the_trainers_windows_and_batches(spine, fused_plain):
    shards = [s.name for s in Manifest.read(spine / "fused").shards]
    want = [w for sh in shards for w in shard_windows(str(spine / "fused"), sh, need_topk=True)]
    for folder in (spine / "fused", fused_plain):
        got = list(FusionIterableDataset(folder, shuffle=False))
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            assert g["input_ids"] == w["input_ids"] and g["labels"] == w["labels"]
            np.testing.assert_array_equal(g["topk_ids"], w["topk_ids"])
            np.testing.assert_array_equal(g["topk_lp"], w["topk_lp"])
    shuffled = FusionIterableDataset(spine / "fused", seed=3)
    first = [r["input_ids"] for r in shuffled]
    shuffled.set_epoch(1)
    second = [r["input_ids"] for r in shuffled]
    assert sorted(map(tuple, first)) == sorted(map(tuple, second)) == sorted(tuple(w["input_ids"]) for w in want)
    assert first != second  # another epoch, another order
    batch = collate_fusion(want[:3])
    ref = collate(want[:3], with_topk=True)
    for key, value in (("input_ids", ref.input_ids), ("attention_mask", ref.attention), ("labels", ref.labels),
                       ("topk_ids", ref.topk_ids), ("topk_q", ref.topk_q), ("tail", ref.tail)):
        assert torch.equal(batch[key], value), key


def dense_reference(logits: torch.Tensor, batch: dict, lam: float) -> float:
    """λ·CLM + (1−λ)·distill written out position by position with the full softmax."""
    clm = distill = 0.0
    n = 0
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)
    B, T1 = batch["labels"].shape
    for b in range(B):
        for t in range(T1):
            y = int(batch["labels"][b, t])
            if y == -100:
                continue
            n += 1
            clm -= float(logp[b, t, y])
            q = batch["topk_q"][b, t].double()
            ids = batch["topk_ids"][b, t]
            listed = [j for j in range(len(ids)) if q[j] > 0]
            p_listed = sum(float(logp[b, t, ids[j]].exp()) for j in listed)
            distill -= sum(float(q[j]) * float(logp[b, t, ids[j]]) for j in listed)
            distill -= float(batch["tail"][b, t]) * np.log(1 - p_listed)
    return lam * clm / n + (1 - lam) * distill / n


def test_fusion_loss_matches_a_dense_reference(spine):
    rows = shard_windows(str(spine / "fused"), Manifest.read(spine / "fused").shards[0].name, need_topk=True)
    batch = collate_fusion(rows[:3])
    torch.manual_seed(0)
    vocab = int(Manifest.read(spine / "fused").run["vocab_size"])
    logits = torch.randn(*batch["input_ids"].shape, vocab)
    for lam in (0.9, 0.0):
        loss, parts = fusion_loss(logits, batch, lam)
        assert float(loss) == pytest.approx(dense_reference(logits, batch, lam), rel=1e-5)
        assert set(parts) == {"clm", "distill"}


def test_readme_training_loop_runs_on_a_tiny_model(spine, tiny_llama):
    text = README.read_text(encoding="utf-8")
    block = re.search(r"<!-- example: torch-loop -->\n```python\n(.*?)```", text, re.S).group(1)
    first, rest = block.split("\n", 1)
    assert first.startswith("MODEL, DATA = ")
    code = f"MODEL, DATA = {str(tiny_llama)!r}, {str(spine / 'fused')!r}\n" + rest
    scope: dict = {}
    out = io.StringIO()
    torch.manual_seed(0)
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md example", "exec"), scope)
    assert re.findall(r"epoch (\d): clm [\d.]+  distill [\d.]+", out.getvalue()) == ["0", "1"]

    # the loop trained: the loss over the whole dataset is below that of the untrained model
    from transformers import AutoModelForCausalLM

    def total(model) -> float:
        model.eval()
        with torch.no_grad():
            return sum(float(fusion_loss(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                         b, 0.9)[0]) for b in scope["loader"])

    before = total(AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32))
    assert total(scope["model"]) < before
