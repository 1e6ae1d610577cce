"""Does a fused dataset teach more than plain text? A paired experiment, on CPU by default.

Teachers: SmolLM2-135M (the target, whose tokenizer every student uses) and Gemma-3-270M (the
source, aligned onto SmolLM2 by MinED). One corpus, extracted once; one dataset per arm:
  untrained   the student before training (the seed's initial weights)
  clm         plain causal LM (λ = 1)
  self        distillation from the target model's own top-k (a control: does any soft target help?)
  gemma       distillation from the single source, aligned (fuse --no-target)
  mince       fused MinCE (per window, the teacher with the lowest CE per byte)
  avgce       fused AvgCE (teachers weighted by a softmax over -CE)
Every distillation arm runs at λ = 0.9 (the paper's) and at each lower λ of --lams ("mince@0.5").
Methods that need no vocabulary map or no top-k (issue 21), on the student track:
  sampled     the target's own distribution as 12 draws per position plus its exact top-1
              (extract --targets sampled:12): an unbiased target; compared with `self` (its top-k)
  uld         ULD (sorted probabilities) toward the single source's top-k; compared with `gemma`
  alm         ALM (binary KL of byte-chunk likelihoods) against the single source's stored gold
              log-probs (fuse --alm-source); compared with `gemma`

Two tracks:
  student    a Llama of 7.3M parameters (benchmarks/configs/student-llama.json, tied embeddings)
             built from scratch with SmolLM2's tokenizer: soft targets matter most to a young model.
  continual  SmolLM2-135M itself, continued on the same data (the paper's setting).

Paired design: every arm of one seed starts from the same weights and sees the same windows in the
same order (the fused datasets share the target's windows); only the loss target differs. Per seed,
each arm's held-out bits/byte minus the clm arm's; then the mean difference with a 95% t interval
over the seeds (fusedata.experiment). The peak learning rate is chosen per track by a sweep of the
clm arm on a validation split (not the test text) and used for every arm; warm-up is 10% of the run.

Held-out text: documents disjoint from training (other articles, other news items, other problems)
in the three training domains (encyclopedia, news, math), and code (HumanEval) as a domain the
corpus does not have, reported apart. Multiple-choice tasks are left out: the untrained target
scores at or below chance on the ones that ship here (quartz 0.46, socialiqa 0.30).

Outputs: a table (stdout and benchmarks/results/fusion.md), benchmarks/results/fusion.json,
benchmarks/results/fusion-<track>.png (learning curves). Everything is cached under --workdir: a
rerun only does what is missing, and a finished track only prints its table.

    .venv/bin/python benchmarks/fusion.py                       # the student track (~30 min on 2 cores)
    .venv/bin/python benchmarks/fusion.py --track continual     # SmolLM2 continued (~90 min on 2 cores)
    .venv/bin/python benchmarks/fusion.py --track continual --scale 20 --device cuda   # a GPU budget
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
TARGET, SOURCE = "smollm2-135m", "gemma3-270m"
IN_DOMAINS, OOD_DOMAIN = ("encyclopedia", "news", "math"), "code"
MAX_LENGTH = 256


@dataclass(frozen=True)
class Track:
    init_config: str  # "" = continue the pretrained target
    tokens: int  # training tokens per run (before --scale)
    batch_tokens: int
    lrs: tuple[float, ...]  # the clm arm's sweep
    low_lam_arms: tuple[str, ...]  # distillation arms also run at the lower λ values
    curve_points: int  # evaluations along a run (after step 0)
    method_arms: tuple[str, ...] = ()  # the arms of METHODS this track runs (at λ = --lams[0]; --method-lams)


TRACKS = {
    "student": Track(str(ROOT / "configs" / "student-llama.json"), 32_000, 1024, (1e-3, 3e-3, 1e-2, 3e-2),
                     ("self", "gemma", "mince", "avgce"), 2, ("sampled", "uld", "alm")),
    "continual": Track("", 12_288, 512, (1e-5, 3e-5, 1e-4, 3e-4, 1e-3), ("mince",), 1),
}
SOURCES = ("self", "gemma", "mince", "avgce")
SAMPLES = 12  # draws per position of the sampled arm ("about a dozen", Sparse Logit Sampling)
# arm -> (dataset, train loss, the arm it is compared with at the same λ)
METHODS = {"sampled": ("sampled", "sparse", "self"), "uld": ("gemma", "uld", "gemma"),
           "alm": ("alm", "alm", "gemma")}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- data ----------------------------------------------------------------------------------------
def _pieces(text: str, max_chars: int) -> list[str]:
    """A document as pieces of at most max_chars, cut at paragraph (else sentence) ends."""
    from fusedata.demo_corpus import _cut

    out = []
    while text:
        head = _cut(text, max_chars)
        out.append(head)
        text = text[len(head):].lstrip()
    return [p for p in out if len(p) > 200]


def build_corpus(work: Path, train_chars: int, test_chars: int, val_chars: int, ood_chars: int) -> dict[str, int]:
    """train / val / test JSONL from the in-domain sources and ood from code. A source document
    (a whole article, news item or problem) goes to one split only, test first, then val, then train."""
    from fusedata.demo_corpus import SOURCES as TEXTS

    if all((work / f"{s}.jsonl").is_file() for s in ("train", "val", "test", "ood")):
        return json.loads((work / "corpus.json").read_text())
    splits: dict[str, list[dict[str, str]]] = {"train": [], "val": [], "test": [], "ood": []}
    sizes = {"train": train_chars, "val": val_chars, "test": test_chars}
    for domain in (*IN_DOMAINS, OOD_DOMAIN):
        have = {s: 0 for s in splits}
        order = ["ood"] if domain == OOD_DOMAIN else ["test", "val", "train"]
        want = {"ood": ood_chars} if domain == OOD_DOMAIN else sizes
        for doc_id, text in TEXTS[domain]():
            split = next((s for s in order if have[s] < want[s]), None)
            if split is None:
                break
            for i, piece in enumerate(_pieces(text, 1500)[:4]):  # a long article gives its first 4 pieces
                splits[split].append({"id": f"{doc_id}#{i}", "domain": domain, "text": piece})
                have[split] += len(piece)
    work.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        (work / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
    counts = {f"{s}_bytes": sum(len(r["text"].encode()) for r in rows) for s, rows in splits.items()}
    counts |= {f"{s}_docs": len(rows) for s, rows in splits.items()}
    (work / "corpus.json").write_text(json.dumps(counts, indent=1))
    return counts


def build_datasets(work: Path, methods_wanted: bool = True) -> dict[str, Any]:
    """Top-k of both teachers on the training split, the alignment, and one fused dataset per
    source arm (each step resumable: a finished dataset is skipped)."""
    from fusedata.stages.align import AlignConfig, AlignJob, run_align
    from fusedata.stages.extract import ExtractConfig, ExtractJob, run_extract
    from fusedata.stages.fuse import FuseConfig, FuseJob, run_fuse

    # the work folder is the benchmark's own: a dataset whose run identity the code changed is rebuilt
    # (the runs trained on it are redone only if its content changed: `data_digest`)
    quiet = {"quiet": True, "log": log, "overwrite": True}
    corpus = [str(work / "train.jsonl")]
    for spec, folder in ((TARGET, "smollm2"), (SOURCE, "gemma3")):
        run_extract(ExtractJob(corpus, str(work / "topk" / folder),
                               ExtractConfig(model=spec, top_k=10, max_length=MAX_LENGTH), docs_per_shard=16, **quiet))
    aligned = run_align(AlignJob(str(work / "topk/smollm2"), str(work / "topk/gemma3"), str(work / "aligned/gemma3"),
                                 AlignConfig(), **quiet))
    target, gemma = str(work / "topk/smollm2"), [str(work / "aligned/gemma3")]
    as_run = {"temperature": 1.0}  # the datasets were built when AvgCE's default was 1 (it is in their identity)
    fused = {
        "self": run_fuse(FuseJob(target, [], str(work / "fused-self"), FuseConfig(method="mince", **as_run), **quiet)),
        "gemma": run_fuse(FuseJob(target, gemma, str(work / "fused-gemma"), FuseConfig(include_target=False, **as_run), **quiet)),
        "mince": run_fuse(FuseJob(target, gemma, str(work / "fused-mince"), FuseConfig(method="mince", **as_run), **quiet)),
        "avgce": run_fuse(FuseJob(target, gemma, str(work / "fused-avgce"), FuseConfig(method="avgce", **as_run), **quiet)),
    }
    methods: dict[str, Any] = {}
    if methods_wanted:
        # the sampled arm: the target's own distribution, sampled instead of cut to its top-k
        sampled = run_extract(ExtractJob(corpus, str(work / "topk" / "smollm2-sampled"),
                                         ExtractConfig(model=TARGET, targets=f"sampled:{SAMPLES}", max_length=MAX_LENGTH),
                                         docs_per_shard=16, **quiet))
        fused["sampled"] = run_fuse(FuseJob(str(work / "topk/smollm2-sampled"), [], str(work / "fused-sampled"),
                                            FuseConfig(method="mince"), **quiet))
        # the ALM arm: the target's windows with their byte chunks against Gemma-3's own tokens
        alm = run_fuse(FuseJob(target, [], str(work / "fused-alm"),
                               FuseConfig(method="mince", alm_source=str(work / "topk/gemma3")), **quiet))
        topk_bytes = run_extract(ExtractJob(corpus, str(work / "topk" / "smollm2"),
                                            ExtractConfig(model=TARGET, top_k=10, max_length=MAX_LENGTH),
                                            docs_per_shard=16, **quiet)).stats["bytes_per_token"]
        methods = {"sampled_targets": f"sampled:{SAMPLES}",
                   "sampled_bytes_per_token": round(sampled.stats["bytes_per_token"], 2),
                   "topk10_bytes_per_token": round(topk_bytes, 2), "alm_chunks": alm.stats["alm"]}
    quality = target_quality(work, [a for a in (*SOURCES, "sampled") if (work / f"fused-{a}").is_dir()])
    return {"train_tokens": fused["mince"].tokens, "align": aligned.stats, "target_quality": quality,
            "fuse": {k: {key: m.stats.get(key) for key in ("candidates", "winning_share", "mean_weights",
                                                            "mean_candidate_ce")} for k, m in fused.items()},
            "methods": methods}


def target_quality(work: Path, arms: list[str]) -> dict[str, dict[str, float]]:
    """What each arm's soft target says about the text it is trained on, read from the datasets:
    the probability the target puts on the gold next token (its cross-entropy in nats/token when
    the gold id is listed; the tail bounds it otherwise), how often the gold id is listed, and the
    mass left in the tail. A target that puts less mass on the gold token teaches the student a
    worse distribution, whatever its source."""
    import numpy as np
    import pyarrow.parquet as pq

    from fusedata.codec import decode_topk
    from fusedata.topk import PAD_ID

    out = {}
    for arm in arms:
        folder = work / f"fused-{arm}"
        listed = gold_p = tail = top1 = 0.0
        n = 0
        for shard in sorted(folder.glob("shard-*.parquet")):
            table = pq.read_table(shard)
            topk = decode_topk(table, shard.name)
            labels = table.column("labels").combine_chunks().values.to_numpy(zero_copy_only=False)  # [N]
            q = np.where(topk.ids == PAD_ID, 0.0, np.exp(topk.logprobs.astype(np.float64)))  # [N, k]
            hit = topk.ids == labels[:, None]  # [N, k]
            listed += float(hit.any(1).sum())
            gold_p += float((q * hit).sum())
            tail += float(topk.tail_mass.sum())
            top1 += float((topk.ids[:, 0] == labels).sum())
            n += len(labels)
        out[arm] = {"gold_listed": round(listed / n, 4), "mean_q_gold": round(gold_p / n, 4),
                    "top1_is_gold": round(top1 / n, 4), "mean_tail": round(tail / n, 4), "positions": n}
    return out


def data_digest(folder: Path) -> str:
    """The content of a dataset's shards (their Arrow data, not the files' bytes or metadata): a run
    trained on it is kept across a rebuild that wrote the same rows."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    h = hashlib.sha256()
    for shard in sorted(folder.glob("shard-*.parquet")):
        table = pq.read_table(shard).replace_schema_metadata(None).combine_chunks()
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        h.update(sink.getvalue().to_pybytes())
    return h.hexdigest()[:16]


def heldout_sets(work: Path) -> dict[str, Any]:
    """The held-out splits tokenised once with the target's tokenizer (all students share it)."""
    from fusedata.corpus import read_corpus
    from fusedata.evaluate import HeldOutText
    from fusedata.models.spec import load_tokenizer, resolve

    tokenizer = load_tokenizer(resolve(TARGET))
    sets = {}
    for name in ("val", "test", "ood"):
        docs, _ = read_corpus([str(work / f"{name}.jsonl")])
        sets[name] = HeldOutText.from_texts(tokenizer, docs.column("text").to_pylist(), MAX_LENGTH)
    return sets


# -- runs ----------------------------------------------------------------------------------------
def arms_of(track: Track, lams: list[float], method_lams: list[float] | None = None) -> dict[str, tuple[str, float, str]]:
    """arm name -> (dataset, λ, loss); the clm arm reads the mince dataset, whose labels all arms
    share. The method arms come last, so a run that stops early has finished the others."""
    arms = {"clm": ("mince", 1.0, "sparse")} | {s: (s, lams[0], "sparse") for s in SOURCES}
    for lam in lams[1:]:
        arms |= {f"{s}@{lam:g}": (s, lam, "sparse") for s in track.low_lam_arms}
    for lam in method_lams or lams[:1]:
        arms |= {m + ("" if lam == lams[0] else f"@{lam:g}"): (METHODS[m][0], lam, METHODS[m][1])
                 for m in track.method_arms}
    return arms


def train_run(work: Path, track_name: str, track: Track, dataset: str, lam: float, lr: float, seed: int, steps: int,
              device: str, evaluate_at: dict[int, list[Any]], loss: str = "sparse") -> dict[str, Any]:
    """One training run; `evaluate_at` maps a step to the held-out sets scored there. Returns the
    scores by step, the run's tokens and seconds. The checkpoint is removed once scored."""
    from fusedata.train import TrainConfig, train

    out = work / "ckpt" / f"{track_name}-{dataset}-{loss}-lam{lam:g}-lr{lr:g}-seed{seed}"
    shutil.rmtree(out, ignore_errors=True)  # a run killed before it was scored starts over
    scores: dict[int, dict[str, float]] = {}
    tokens_at: dict[int, int] = {}

    def on_step(step: int, tokens: int, model: Any) -> None:
        for name, held in evaluate_at.get(step, []):
            scores.setdefault(step, {})[name] = round(held.score(model)["bits_per_byte"], 6)
            tokens_at[step] = tokens

    cfg = TrainConfig(data=str(work / f"fused-{dataset}"), model=TARGET, output=str(out), lam=lam, lr=lr,
                      warmup_ratio=0.1, max_steps=steps, batch_tokens=track.batch_tokens, seed=seed, log_every=0,
                      init_config=track.init_config, device=device, loss=loss)
    t0 = time.perf_counter()
    result = train(cfg, log=lambda m: log(m) if m.startswith("warning") else None, on_step=on_step)
    shutil.rmtree(out, ignore_errors=True)
    return {"scores": {str(k): v for k, v in sorted(scores.items())}, "tokens_at": {str(k): v for k, v in tokens_at.items()},
            "tokens": result["tokens"], "seconds": round(time.perf_counter() - t0, 1)}


def run_track(work: Path, name: str, args: argparse.Namespace, sets: dict[str, Any]) -> dict[str, Any]:
    """Sweep, then every arm × seed, each result saved as it comes (a rerun continues)."""
    track = TRACKS[name]
    state_file = work / f"state-{name}.json"
    state: dict[str, Any] = json.loads(state_file.read_text()) if state_file.is_file() else {}
    tokens = int(track.tokens * args.scale)
    steps = max(1, tokens // track.batch_tokens)
    key = {"tokens": tokens, "steps": steps, "batch_tokens": track.batch_tokens, "lams": args.lams,
           "init_config": Path(track.init_config).name if track.init_config else "", "device": args.device}
    if state.get("key") != key:
        state = {"key": key, "sweep": {}, "runs": {}}

    def save() -> None:
        state_file.write_text(json.dumps(state, indent=1))

    curve = sorted({round(steps * (i + 1) / track.curve_points) for i in range(track.curve_points)})
    # the clm arm's peak learning rate, chosen on the validation split (seed of the first --seeds)
    for lr in track.lrs:
        if str(lr) not in state["sweep"]:
            log(f"{name}: sweep lr {lr:g} (clm, seed {args.seeds[0]}, {steps} steps)")
            r = train_run(work, name, track, "mince", 1.0, lr, args.seeds[0], steps, args.device, {steps: [("val", sets["val"])]})
            state["sweep"][str(lr)] = r["scores"][str(steps)]["val"]
            save()
    lr = min(track.lrs, key=lambda x: state["sweep"][str(x)])
    if lr in (track.lrs[0], track.lrs[-1]):
        log(f"{name}: warning: the best swept lr {lr:g} is at the edge of the sweep {track.lrs}")
    log(f"{name}: lr {lr:g} (validation bits/byte by lr: {state['sweep']})")
    state["lr"] = lr
    arms = arms_of(track, args.lams, args.method_lams)
    digests = {d: data_digest(work / f"fused-{d}") for d in {a[0] for a in arms.values()}}
    adopted = [k for k, r in state["runs"].items() if "data" not in r]
    for k in adopted:  # recorded before runs kept their dataset's digest: taken to be of today's data
        state["runs"][k]["data"] = digests.get(arms.get(k.split("/")[0], ("",))[0], "")
    if adopted:
        log(f"{name}: {len(adopted)} runs recorded without a dataset digest are taken to be of today's datasets")
    for seed in args.seeds:
        for arm, (dataset, lam, loss) in arms.items():
            run_key = f"{arm}/seed{seed}"
            done = state["runs"].get(run_key)
            if done and done.get("lr") == lr and done.get("data") == digests[dataset]:
                continue  # done at this lr on this data (another lr or changed data redoes the run)
            # the untrained model, scored on each seed's first run (a pretrained one only once)
            first = not any(k.endswith(f"/seed{seed}") for k in state["runs"]) and (
                bool(track.init_config) or not state.get("untrained"))
            at = {s: [("test", sets["test"])] for s in curve}
            at[steps] = [("test", sets["test"]), ("ood", sets["ood"])]
            if first:  # the untrained student of this seed: the same weights start every arm
                at[0] = [("test", sets["test"]), ("ood", sets["ood"])]
            log(f"{name}: {arm} (λ {lam:g}, loss {loss}) seed {seed}")
            r = train_run(work, name, track, dataset, lam, lr, seed, steps, args.device, at, loss) | {
                "lr": lr, "data": digests[dataset]}
            if first:
                state.setdefault("untrained", {})[str(seed)] = r["scores"].pop("0")
            state["runs"][run_key] = r
            save()
            log(f"{name}: {arm} seed {seed}: {r['scores'][str(steps)]['test']:.4f} bits/byte ({r['seconds']:.0f} s)")
    return summarise(name, state, args.seeds, arms, steps)


def summarise(name: str, state: dict[str, Any], seeds: list[int], arms: dict[str, tuple[str, float, str]],
              steps: int) -> dict[str, Any]:
    """The track's results in fusion.json's shape: per arm, bits/byte per seed and paired diffs."""
    from fusedata.experiment import paired_difference

    trained = state["runs"][f"clm/seed{seeds[0]}"]["tokens"]  # real (unpadded) tokens; every arm reads the same
    out: dict[str, Any] = {"seeds": seeds, "tokens": trained, "padded_token_budget": state["key"]["tokens"],
                           "steps": steps, "lr": state["lr"],
                           "lr_sweep_val_bits_per_byte": state["sweep"], "arms": {}}
    fixed = next(iter(state["untrained"].values()))  # a pretrained start is the same for every seed
    untrained = [state["untrained"].get(str(s), fixed) for s in seeds]
    out["arms"]["untrained"] = {"bits_per_byte": [u["test"] for u in untrained],
                                "ood_bits_per_byte": [u["ood"] for u in untrained]}
    for arm, (dataset, lam, loss) in arms.items():
        if any(f"{arm}/seed{s}" not in state["runs"] for s in seeds):
            out.setdefault("unfinished_arms", []).append(arm)  # a run stopped early: reported without it
            continue
        runs = [state["runs"][f"{arm}/seed{s}"] for s in seeds]
        entry: dict[str, Any] = {
            "dataset": dataset, "lam": lam, **({"loss": loss} if loss != "sparse" else {}),
            "bits_per_byte": [r["scores"][str(steps)]["test"] for r in runs],
            "ood_bits_per_byte": [r["scores"][str(steps)]["ood"] for r in runs],
            "curve": [[{"step": int(s), "tokens": r["tokens_at"].get(s, 0), "bits_per_byte": v["test"]}
                       for s, v in r["scores"].items()] for r in runs],
            "seconds": [r["seconds"] for r in runs],
        }
        out["arms"][arm] = entry
    clm = out["arms"]["clm"]
    for arm, entry in out["arms"].items():
        if arm != "clm" and len(seeds) >= 2:
            entry["diff_vs_clm"] = paired_difference(entry["bits_per_byte"], clm["bits_per_byte"]).as_dict()
            entry["ood_diff_vs_clm"] = paired_difference(entry["ood_bits_per_byte"], clm["ood_bits_per_byte"]).as_dict()
    # the fused arms against each single teacher at the same λ: does fusing beat the best one?
    for arm, entry in out["arms"].items():
        base, _, lam = arm.partition("@")
        if base in ("mince", "avgce") and len(seeds) >= 2:
            entry["diff_vs_single"] = {
                single: paired_difference(entry["bits_per_byte"], out["arms"][single]["bits_per_byte"]).as_dict()
                for single in (f"self@{lam}" if lam else "self", f"gemma@{lam}" if lam else "gemma")
                if single in out["arms"]}
        if base in METHODS and len(seeds) >= 2:  # each method against the arm with the same teacher and λ
            single = METHODS[base][2] + (f"@{lam}" if lam else "")
            if single in out["arms"]:
                entry["diff_vs_single"] = {single: paired_difference(entry["bits_per_byte"],
                                                                     out["arms"][single]["bits_per_byte"]).as_dict()}
    return out


# -- report --------------------------------------------------------------------------------------
def table(name: str, res: dict[str, Any]) -> str:
    import statistics

    def mean(v: list[float]) -> str:
        return f"{statistics.fmean(v):.4f}"

    def diff(d: dict[str, Any] | None) -> str:
        if d is None:
            return ""
        lo, hi = d["ci95"]
        return f"{d['mean']:+.4f} [{lo:+.4f}, {hi:+.4f}]"

    lines = [f"{name} track: {res['tokens']:,} training tokens per run ({res['steps']} steps), "
             f"seeds {res['seeds']}, peak lr {res['lr']:g} (clm sweep on validation)", "",
             "| arm | λ | held-out bits/byte | Δ vs clm [95% CI] | verdict | code (OOD) bits/byte | Δ OOD vs clm [95% CI] |",
             "|---|---:|---:|---:|---|---:|---:|"]
    for arm, e in res["arms"].items():
        d = e.get("diff_vs_clm")
        lam = "" if arm == "untrained" else f"{e['lam']:g}"
        verdict = "" if d is None else d["verdict"]
        lines.append(f"| {arm}{' (' + e['loss'] + ')' if 'loss' in e else ''} | {lam} | {mean(e['bits_per_byte'])} | "
                     f"{diff(d)} | {verdict} | "
                     f"{mean(e['ood_bits_per_byte'])} | {diff(e.get('ood_diff_vs_clm'))} |")
    if res.get("unfinished_arms"):
        lines += ["", f"Not finished for every seed (left out): {', '.join(res['unfinished_arms'])}"]
    fused = [(arm, e["diff_vs_single"]) for arm, e in res["arms"].items() if e.get("diff_vs_single")]
    if fused:
        lines += ["", "| fused or method arm | vs single teacher (same λ) | Δ bits/byte [95% CI] | verdict |",
                  "|---|---|---:|---|"]
        for arm, diffs in fused:
            lines += [f"| {arm} | {single} | {diff(d)} | {d['verdict']} |" for single, d in diffs.items()]
    return "\n".join(lines)


def plot(name: str, res: dict[str, Any], path: Path) -> None:
    """Left: learning curves (held-out bits/byte against training tokens, mean over seeds, the
    seed range shaded). Right: each arm's paired difference from clm at the end, with its 95% CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax, dx) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [3, 2]})
    start = np.array(res["arms"]["untrained"]["bits_per_byte"])[:, None]  # [seeds, 1]
    trained = [(arm, e) for arm, e in res["arms"].items() if arm != "untrained"]
    for arm, e in trained:
        tokens = np.array([[p["tokens"] for p in c] for c in e["curve"]], dtype=float).mean(0)
        values = np.array([[p["bits_per_byte"] for p in c] for c in e["curve"]])  # [seeds, points]
        values, tokens = np.concatenate([start, values], 1), np.concatenate([[0], tokens])  # every run starts untrained
        (line,) = ax.plot(tokens, values.mean(0), "--" if "@" in arm else "-", marker="o", ms=3, label=arm)
        ax.fill_between(tokens, values.min(0), values.max(0), color=line.get_color(), alpha=0.12)
    ax.set_yscale("log")
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out bits/byte, in-domain (log scale)")
    ax.set_title(f"{name} track: learning curves (mean over seeds, seed range shaded)", fontsize=10)
    ax.legend(ncol=2, fontsize=8)
    ax.grid(alpha=0.3, which="both")
    diffs = [(arm, e["diff_vs_clm"]) for arm, e in trained if "diff_vs_clm" in e]
    y = np.arange(len(diffs))
    means = np.array([d["mean"] for _, d in diffs])
    err = np.array([[d["mean"] - d["ci95"][0], d["ci95"][1] - d["mean"]] for _, d in diffs]).T
    dx.errorbar(means, y, xerr=err, fmt="o", capsize=3)
    dx.axvline(0, color="grey", lw=1)
    dx.set_yticks(y, [a for a, _ in diffs])
    dx.invert_yaxis()
    dx.set_xlabel("Δ bits/byte vs clm at the end (95% CI; < 0 is better)")
    dx.set_title("paired difference from clm", fontsize=10)
    dx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--track", choices=["student", "continual", "both"], default="student")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lams", type=float, nargs="+", default=[0.9, 0.5], help="the first is every arm's; the rest "
                   "are run for the track's low-λ arms")
    p.add_argument("--method-lams", type=float, nargs="+", default=None,
                   help="λ values of the method arms (sampled, uld, alm); default: the first of --lams")
    p.add_argument("--scale", type=float, default=1.0, help="multiply the training tokens per run (a GPU: 20)")
    p.add_argument("--train-tokens", type=int, default=48_000, help="size of the training corpus (teacher tokens)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--workdir", default="out/bench-fusion")
    args = p.parse_args()
    if len(args.seeds) < 3:
        log("warning: fewer than 3 seeds: the intervals are wide or absent")

    work = Path(args.workdir)
    t0 = time.perf_counter()
    # ~3.6 characters per SmolLM2 token on this text; held-out: ≥ 50 KB in-domain, 30 KB of code
    counts = build_corpus(work, train_chars=round(args.train_tokens * 3.6 / len(IN_DOMAINS)), test_chars=20_000,
                          val_chars=8_000, ood_chars=30_000)
    log(f"corpus: {counts}")
    data = build_datasets(work, args.track in ("student", "both"))
    log(f"datasets ready ({time.perf_counter() - t0:.0f} s): {data['train_tokens']:,} training tokens; "
        f"align kinds {data['align'].get('kinds')}; MinCE winners {data['fuse']['mince']['winning_share']}")
    sets = heldout_sets(work)
    RESULTS.mkdir(exist_ok=True)
    results_file = RESULTS / "fusion.json"
    tracks = ["student", "continual"] if args.track == "both" else [args.track]
    reports = []
    for name in tracks:
        t1 = time.perf_counter()
        res = run_track(work, name, args, sets)
        res["heldout"] = {"in_domain_bytes": sets["test"].nbytes, "ood_bytes": sets["ood"].nbytes,
                          "val_bytes": sets["val"].nbytes, "in_domains": list(IN_DOMAINS), "ood_domain": OOD_DOMAIN}
        res["data"] = data | {"corpus": counts}
        res["seconds_this_call"] = round(time.perf_counter() - t1)
        # read just before writing: another track may have finished meanwhile in another process
        results = json.loads(results_file.read_text()) if results_file.is_file() else {}
        results[name] = res
        results_file.write_text(json.dumps(results, indent=1))
        plot(name, res, RESULTS / f"fusion-{name}.png")
        reports.append(table(name, res))
    report = "\n\n".join(reports)
    print("\n" + report + "\n")
    md = RESULTS / "fusion.md"
    sections = {n: table(n, results[n]) for n in ("student", "continual") if n in results}
    md.write_text("\n\n".join(sections.values()) + "\n")
    log(f"wrote {results_file}, {md} and the learning curves ({time.perf_counter() - t0:.0f} s in all)")


if __name__ == "__main__":
    main()
