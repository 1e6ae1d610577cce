"""`fusedata train` on an sft dataset (explore's prompt/response pairs): the completion-only label
mask in the plain and the chat-template format, the fallback when the prompt is not a token
prefix, truncation, a short run that overfits a pair, the loss against a direct computation,
exact resume, and refusal of other dataset kinds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from safetensors.torch import load_file

from fusedata.dataset import DatasetDir
from fusedata.errors import UsageError
from fusedata.train import STATE_NAME, TrainConfig, sft_rows, train
from schemas.explore import SFT_SCHEMA

# A small chat template (role markers as plain text); `bos_token or ''` keeps it valid for the
# byte-level tokenizer, which has no BOS, and writes <bos> itself for the Gemma-style one.
CHAT_TEMPLATE = (
    "{{ bos_token or '' }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

PAIRS = [
    ("What does the keeper write in his book?", "The weather, every morning."),
    ("Name a river town landmark.", "The old stone bridge over the river."),
    ("Write a function that adds two numbers.", "def add(a, b):\n    return a + b"),
    ("How long did it rain?", "Three days; the buses stopped running."),
    ("Où est le café?", "À Paris, l'été. 😀"),
    ("Who wrote the letter?", "She wrote it to her brother in the north."),
]


def write_sft(folder: Path, pairs: list[tuple[str, str]], per_shard: int = 3) -> Path:
    """An sft dataset folder as `fusedata explore` writes it: SFT_SCHEMA shards and a manifest."""
    run = {"stage": "explore-test", "pairs": len(pairs)}
    out = DatasetDir(folder)
    out.begin(run=run)
    names = []
    for s in range(0, len(pairs), per_shard):
        rows = [{
            "id": f"r{s // per_shard}-{i}", "prompt": p, "response": r, "domain_path": ["test", "leaf"],
            "style": "short", "leader": "a", "winner": "b", "source_won": True, "reward": 1,
            "models": ["a", "b"], "answers": ["x", r], "scores": [0.2, 0.8], "judge": "j",
            "shown_winner": "b", "swapped_winner": None, "round": s // per_shard,
        } for i, (p, r) in enumerate(pairs[s: s + per_shard])]
        name = f"shard-{s // per_shard:05d}.parquet"
        out.write_shard(name, pa.Table.from_pylist(rows, schema=SFT_SCHEMA), SFT_SCHEMA)
        names.append(name)
    out.finish("sft", run, names, stats={})
    return folder


def with_chat_template(model_dir: Path, folder: Path, template: str = CHAT_TEMPLATE) -> Path:
    """A copy of a tiny model whose tokenizer has `template` as its chat template."""
    from transformers import AutoTokenizer

    shutil.copytree(model_dir, folder)
    tok = AutoTokenizer.from_pretrained(folder)
    tok.chat_template = template
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sft_dir(tmp_path_factory) -> Path:
    return write_sft(tmp_path_factory.mktemp("sft") / "sft", PAIRS)


@pytest.fixture(scope="module")
def chat_llama(tiny_llama, tmp_path_factory) -> Path:
    return with_chat_template(tiny_llama, tmp_path_factory.mktemp("chat") / "llama")


@pytest.fixture(scope="module")
def chat_gemma(tiny_gemma, tmp_path_factory) -> Path:
    return with_chat_template(tiny_gemma, tmp_path_factory.mktemp("chat") / "gemma")


def _reference(tok, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """(prompt-part ids, whole ids), tokenised independently of the trainer's code."""
    if tok.chat_template:
        user = [{"role": "user", "content": prompt}]
        head = tok.apply_chat_template(user, add_generation_prompt=True)["input_ids"]
        whole = tok.apply_chat_template(user + [{"role": "assistant", "content": response}])["input_ids"]
        return head, whole
    head = tok(f"Question: {prompt}\nAnswer:")["input_ids"]
    whole = tok(f"Question: {prompt}\nAnswer: {response}")["input_ids"] + [tok.eos_token_id]
    return head, whole


def _cfg(data: Path, model: Path, out: Path, **kw) -> TrainConfig:
    base = dict(lr=3e-3, warmup_steps=2, max_steps=6, batch_tokens=64, seed=3, log_every=0)
    base.update(kw)
    return TrainConfig(data=str(data), model=str(model), output=str(out), **base)


@pytest.mark.parametrize("which", ["llama", "gemma", "chat_llama", "chat_gemma"])
def test_labels_cover_exactly_the_response(which, request, sft_dir):
    from transformers import AutoTokenizer

    folder = request.getfixturevalue({"llama": "tiny_llama", "gemma": "tiny_gemma"}.get(which, which))
    tok = AutoTokenizer.from_pretrained(folder)
    assert bool(tok.chat_template) == which.startswith("chat")
    rows = [r for shard in ("shard-00000.parquet", "shard-00001.parquet") for r in sft_rows(str(sft_dir), shard, tok, 1024)]
    assert len(rows) == len(PAIRS)
    for row, (prompt, response) in zip(rows, PAIRS, strict=True):
        head, whole = _reference(tok, prompt, response)
        assert whole[: len(head)] == head  # these formats keep the prompt a token prefix
        assert row["input_ids"] == whole
        assert row["labels"] == [-100] * (len(head) - 1) + whole[len(head):]
        assert len(row["labels"]) == len(row["input_ids"]) - 1
        learned = tok.decode(whole[len(head):])
        assert learned == (f"{response}{tok.eos_token}\n" if tok.chat_template else f" {response}{tok.eos_token}")
        if tok.bos_token_id is not None:
            assert whole.count(tok.bos_token_id) == 1  # the template's <bos>, not a second one


def test_prompt_not_a_token_prefix_falls_back_to_separate_parts(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    # the generation prompt ends inside a word ("Th" + "e dog ..."): "The" is one token in the whole
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}\n"
                "{% else %}Th{{ m['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}Th{% endif %}")
    folder = with_chat_template(tiny_llama, tmp_path / "odd", template)
    tok = AutoTokenizer.from_pretrained(folder)
    data = write_sft(tmp_path / "sft", [("Who sleeps?", "e dog sleeps in the sun.")])
    head = tok("Who sleeps?\nTh", add_special_tokens=False)["input_ids"]
    assert tok("Who sleeps?\nThe dog sleeps in the sun.", add_special_tokens=False)["input_ids"][: len(head)] != head
    (row,) = sft_rows(str(data), "shard-00000.parquet", tok, 1024)
    rest = tok("e dog sleeps in the sun.", add_special_tokens=False)["input_ids"]
    assert row["input_ids"] == head + rest
    assert row["labels"] == [-100] * (len(head) - 1) + rest


def test_truncation_and_pairs_without_room_for_the_response(tiny_llama, sft_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    heads = [len(_reference(tok, p, r)[0]) for p, r in PAIRS[:3]]
    limit = sorted(heads)[1] + 1  # room for the response of the pairs with the shorter prompts only
    rows = sft_rows(str(sft_dir), "shard-00000.parquet", tok, limit)
    assert len(rows) == sum(h < limit for h in heads) and 1 <= len(rows) < 3
    for row in rows:
        assert len(row["input_ids"]) == limit and len(row["labels"]) == limit - 1
        assert row["labels"][-1] != -100


def test_short_run_overfits_one_pair(tiny_llama, tmp_path):
    data = write_sft(tmp_path / "sft", PAIRS[:1])
    out = tmp_path / "ckpt"
    logs: list[str] = []
    result = train(_cfg(data, tiny_llama, out, lr=1e-2, max_steps=20, warmup_steps=2), log=logs.append)
    losses = [h["loss"] for h in result["history"]]
    assert len(losses) == 20 and "distill" not in result["history"][0]
    assert losses[-1] < 0.3 * losses[0]
    assert logs == ["sft data: 1 pairs; completion-only CLM (λ=1)"]
    state = json.loads((out / STATE_NAME).read_text())
    assert state["step"] == 20 and state["config"]["lam"] == 1.0  # the default --lam 0.9 does not apply
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()


def test_loss_is_mean_cross_entropy_over_response_tokens(chat_llama, sft_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # lr 0: the one step leaves the model as it is; all three pairs of the first shard fit one
    # micro-batch, so the logged loss is over a padded batch and the reference over unpadded pairs
    data = write_sft(tmp_path / "sft", PAIRS[:3])
    result = train(_cfg(data, chat_llama, tmp_path / "ckpt", lr=0.0, max_steps=1, batch_tokens=4096),
                   log=lambda m: None)
    tok = AutoTokenizer.from_pretrained(chat_llama)
    model = AutoModelForCausalLM.from_pretrained(chat_llama).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for prompt, response in PAIRS[:3]:
            head, whole = _reference(tok, prompt, response)
            ids = torch.tensor([whole])  # [1, n]
            logits = model(input_ids=ids).logits[0, :-1]  # [n-1, V]: position i predicts whole[i+1]
            ce = torch.nn.functional.cross_entropy(logits.float(), ids[0, 1:], reduction="none")  # [n-1]
            total += float(ce[len(head) - 1:].sum())  # the response tokens only
            count += len(whole) - len(head)
    assert result["final_loss"] == pytest.approx(total / count, abs=2e-5)
    assert result["tokens"] == sum(len(_reference(tok, p, r)[1]) for p, r in PAIRS[:3])


def test_resume_continues_exactly(chat_llama, sft_dir, tmp_path):
    # 6 pairs, one per micro-batch: 8 steps cross into the second epoch
    whole = tmp_path / "whole"
    reference = train(_cfg(sft_dir, chat_llama, whole, max_steps=8), log=lambda m: None)

    class Stop(Exception):
        pass

    def stop_at_step_5(msg: str) -> None:
        if msg.startswith("step 5/"):
            raise Stop

    broken = tmp_path / "broken"
    with pytest.raises(Stop):
        train(_cfg(sft_dir, chat_llama, broken, max_steps=8, save_every=4, log_every=1), log=stop_at_step_5)
    assert json.loads((broken / STATE_NAME).read_text())["step"] == 4
    # --lam has no effect on sft data, so another value resumes the same run
    resumed = train(_cfg(sft_dir, chat_llama, broken, max_steps=8, save_every=4, lam=0.5), log=lambda m: None)
    assert resumed["history"] == reference["history"]
    assert np.isfinite([h["loss"] for h in reference["history"]]).all()
    a, b = load_file(whole / "model.safetensors"), load_file(broken / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    with pytest.raises(UsageError, match="different training run"):
        train(_cfg(sft_dir, chat_llama, broken, max_steps=8, max_length=64), log=lambda m: None)


def test_refuses_other_dataset_kinds(tiny_llama, tmp_path):
    folder = tmp_path / "topk"
    run = {"stage": "extract"}
    d = DatasetDir(folder)
    d.begin(run=run)
    d.finish("topk", run, [], stats={})
    with pytest.raises(UsageError, match="is a 'topk' dataset; expected a fused or sft dataset"):
        train(_cfg(folder, tiny_llama, tmp_path / "ckpt"), log=lambda m: None)
