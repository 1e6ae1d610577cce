"""The trainer layouts, read by the trainers' own code on CPU: TRL's SFTTrainer (installed with the
dev extra) trains a step on `--layout trl`; axolotl's KD collator, in axolotl's own environment
(`make axolotl`: it pins an older transformers than fusedata), pads `--layout axolotl` rows into the
batch its KD loss reads, and that batch holds the fused target at the right positions."""

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
import datasets, numpy as np, torch
from transformers import AutoTokenizer
from axolotl.integrations.kd.collator import DataCollatorForKD
data, model, out = sys.argv[1:4]
ds = datasets.load_dataset(data, split="train", cache_dir=out + "/cache")
tok = AutoTokenizer.from_pretrained(model)
rows = [dict(ds[i]) for i in range(3)]
batch = DataCollatorForKD(tokenizer=tok, return_tensors="pt")(rows)
np.savez(out + "/batch.npz", **{k: v.numpy() for k, v in batch.items()})
"""


def test_axolotl_layout_loads_with_axolotls_kd_collator(tiny_llama, tmp_path, request):
    python = axolotl_python()
    if python is None:
        pytest.skip("no axolotl environment: `make axolotl` builds .venv-axolotl (axolotl pins transformers 5.16, "
                    "older than fusedata needs), or set FUSEDATA_AXOLOTL_PYTHON")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)} | {"HF_HUB_OFFLINE": "1"}
    try:
        probe = subprocess.run([python, "-c", "import datasets, axolotl.integrations.kd.collator"], env=env,
                               capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        probe = None
    if probe is None or probe.returncode != 0:
        why = "timed out" if probe is None else probe.stderr.strip().splitlines()[-1]
        pytest.skip(f"{python} cannot import axolotl's KD collator ({why}): rebuild it with `make axolotl`")
    spine = request.getfixturevalue("spine")  # built only once the environment is known to work
    out = export(spine / "fused", tmp_path / "axolotl", "axolotl")
    proc = subprocess.run([python, "-c", AXOLOTL_SCRIPT, str(out), str(tiny_llama), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    batch = dict(np.load(tmp_path / "batch.npz"))

    table = pq.read_table(spine / "fused")
    fused = decode_topk(table)
    off = fused.offsets()
    ids = table.column("input_ids").to_pylist()
    for b in range(3):
        n = len(ids[b])
        assert batch["input_ids"][b, :n].tolist() == ids[b]
        assert batch["labels"][b, :n].tolist() == ids[b]
        assert batch["attention_mask"][b, :n].tolist() == [1] * n
        assert not batch["target_mask"][b, 0].any()  # nothing predicts token 0
        for t in range(1, n):  # row t: the fused distribution of token t, made at position t − 1
            pos = int(off[b]) + t - 1
            real = fused.ids[pos] != PAD_ID
            m = batch["target_mask"][b, t].astype(bool)
            assert m.sum() == real.sum()
            assert batch["target_token_ids"][b, t][m].tolist() == fused.ids[pos][real].tolist()
            q = np.exp(fused.logprobs[pos][real].astype(np.float64))
            np.testing.assert_allclose(np.exp(batch["target_logprobs"][b, t][m]), q / q.sum(), rtol=1e-5, atol=1e-7)
        assert not batch["target_mask"][b, n:].any()  # sequence padding is masked
    assert json.loads((out / "_manifest.json").read_text())["kind"] == "axolotl-kd"
