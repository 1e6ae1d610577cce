"""The trainer layouts, read by the trainers' own code on CPU: TRL's SFTTrainer (installed with the
dev extra) trains a step on `--layout trl`; in axolotl's own environment (`make axolotl`: it pins an
older transformers than fusedata), axolotl's KD collator pads `--layout axolotl` rows into a batch that
holds the fused target at the right positions, and its KD trainer's loss on that batch equals the KL
toward that target computed with fusedata's own pairing of logits and positions."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from cli.main import main
from fusedata.codec import decode_topk
from fusedata.topk import PAD_ID

ROOT = Path(__file__).parents[1]


def export(src: Path, out: Path, layout: str) -> Path:
    r = CliRunner().invoke(main, ["export", str(src), "--output", str(out), "--layout", layout, "--quiet"])
    assert r.exit_code == 0, r.output
    return out


def test_trl_layout_trains_with_trls_sft_trainer(spine, tiny_llama, tmp_path):
    pytest.importorskip("trl", reason="trl is in the dev extra (pip install -e '.[dev]')")
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    out = export(spine / "fused", tmp_path / "trl", "trl")
    ds = datasets.load_dataset(str(out), split="train", cache_dir=str(tmp_path / "cache"))
    want = pq.read_table(spine / "fused").column("input_ids").to_pylist()
    assert ds["input_ids"] == want
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    args = SFTConfig(output_dir=str(tmp_path / "ckpt"), max_steps=2, per_device_train_batch_size=2, report_to=[],
                     use_cpu=True, save_strategy="no", logging_steps=1, max_length=None, dataloader_num_workers=0)
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in (0, 1)])  # TRL's own collator
    for b in (0, 1):
        n = len(want[b])
        assert batch["input_ids"][b, :n].tolist() == want[b]
        assert batch["labels"][b, :n].tolist() == want[b] and bool((batch["labels"][b, n:] == -100).all())
    result = trainer.train()
    assert result.global_step == 2 and np.isfinite(result.training_loss)


def axolotl_python() -> str | None:
    exe = os.environ.get("FUSEDATA_AXOLOTL_PYTHON") or str(ROOT / ".venv-axolotl" / "bin" / "python")
    return exe if Path(exe).is_file() else None


AXOLOTL_SCRIPT = """
import json, sys
from types import SimpleNamespace
import datasets, numpy as np, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from axolotl.integrations.kd.collator import DataCollatorForKD
from axolotl.integrations.kd.kernels.liger import LigerFusedLinearKLTopKLogprobLoss
from axolotl.integrations.kd.trainer import AxolotlKDTrainer
print("imported", flush=True)
data, model_dir, out = sys.argv[1:4]
ds = datasets.load_dataset(data, split="train", cache_dir=out + "/cache")
tok = AutoTokenizer.from_pretrained(model_dir)
rows = [dict(ds[i]) for i in range(3)]
batch = DataCollatorForKD(tokenizer=tok, return_tensors="pt")(rows)
np.savez(out + "/batch.npz", **{k: v.numpy() for k, v in batch.items()})
# the KD trainer's own compute_loss on that batch, with the loss its __init__ builds for kd_ce_alpha 0,
# kd_alpha 1, kd_temperature 1, kd_beta unset (forward KL), kd_normalize_topk unset (the student's
# log-probs are not renormalised over the k ids); compiled=False: no torch.compile on CPU
kd = LigerFusedLinearKLTopKLogprobLoss(0.0, 1.0, 1.0, 0.0, compiled=False, compute_ce_loss=False,
                                       normalize_topk=False)
trainer = SimpleNamespace(args=SimpleNamespace(sample_packing=False), model_accepts_loss_kwargs=True,
                          _kd_loss_fn=kd)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
with torch.no_grad():
    loss = AxolotlKDTrainer.compute_loss(trainer, model, dict(batch))
json.dump({"loss": float(loss)}, open(out + "/loss.json", "w"))
"""


@pytest.mark.axolotl
def test_axolotl_layout_loads_with_axolotls_kd_collator_and_loss(tiny_llama, tmp_path, request):
    import torch
    from transformers import AutoModelForCausalLM

    from fusedata.train import sparse_distill_loss

    python = axolotl_python()
    if python is None:
        pytest.skip("no axolotl environment: `make axolotl` builds .venv-axolotl (axolotl pins transformers 5.16, "
                    "older than fusedata needs), or set FUSEDATA_AXOLOTL_PYTHON")
    spine = request.getfixturevalue("spine")  # built only once an environment is there
    out = export(spine / "fused", tmp_path / "axolotl", "axolotl")
    # .pyc files may be written into axolotl's environment: without them every run compiles its whole
    # import stack again (tens of seconds)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}
    env |= {"HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    proc = subprocess.run([python, "-c", AXOLOTL_SCRIPT, str(out), str(tiny_llama), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and "imported" not in proc.stdout:  # one interpreter start (axolotl imports slowly)
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"{python} cannot import axolotl's KD collator and trainer ({why}): rebuild it with `make axolotl`")
    assert proc.returncode == 0, proc.stderr[-3000:]
    batch = dict(np.load(tmp_path / "batch.npz"))
    axolotl_loss = json.loads((tmp_path / "loss.json").read_text())["loss"]

    table = pq.read_table(spine / "fused")
    fused = decode_topk(table)
    off = fused.offsets()
    ids = table.column("input_ids").to_pylist()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    kl_sum, labels = 0.0, 0
    for b in range(3):
        n = len(ids[b])
        assert batch["input_ids"][b, :n].tolist() == ids[b]
        assert batch["labels"][b, :n].tolist() == ids[b]
        assert batch["attention_mask"][b, :n].tolist() == [1] * n
        assert not batch["target_mask"][b, n - 1 :].any()  # the last token predicts nothing; padding is masked
        for i in range(n - 1):  # row i: the fused distribution made at position i (of token i + 1)
            pos = int(off[b]) + i
            real = fused.ids[pos] != PAD_ID
            m = batch["target_mask"][b, i].astype(bool)
            assert m.sum() == real.sum()
            assert batch["target_token_ids"][b, i][m].tolist() == fused.ids[pos][real].tolist()
            q = np.exp(fused.logprobs[pos][real].astype(np.float64))
            np.testing.assert_allclose(np.exp(batch["target_logprobs"][b, i][m]), q / q.sum(), rtol=1e-5, atol=1e-7)
        # the reference: fusedata's sparse distillation toward the renormalised target (no tail), with
        # logits[i] against position i as fusion_loss pairs them, minus the target's entropy = KL
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids[b]])).logits[0, :-1].double(), -1)  # [n-1, V]
        rows = fused.ids[off[b]:off[b + 1]]  # [n-1, k]
        q = np.where(rows != PAD_ID, np.exp(fused.logprobs[off[b]:off[b + 1]].astype(np.float64)), 0.0)
        q /= q.sum(axis=1, keepdims=True)
        qt = torch.from_numpy(q)
        picked = logp.gather(1, torch.from_numpy(np.where(rows != PAD_ID, rows, 0).astype(np.int64)))
        ce = float(sparse_distill_loss(picked, qt, torch.zeros(n - 1, dtype=torch.float64)))
        kl_sum += ce + float((qt * torch.log(qt.clamp_min(1e-300))).sum())
        labels += n  # axolotl divides by its labels' count (every token of a row)
    assert axolotl_loss == pytest.approx(kl_sum / labels, rel=1e-4)
    assert json.loads((out / "_manifest.json").read_text())["kind"] == "axolotl-kd"
