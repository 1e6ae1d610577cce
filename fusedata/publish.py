"""`fusedata publish`: share a finished dataset folder (topk, aligned or fused) on the Hugging Face Hub.

What lands in the dataset repo:
- `data/shard-NNNNN.parquet`: the shards, byte for byte (their sha256 is checked against the manifest first);
- `fusedata_manifest.json`: the folder's `_manifest.json`, so provenance and checksums travel with the data;
- `README.md`: a generated dataset card (YAML `configs`/`data_files` for the viewer and
  `datasets.load_dataset`, column table, models and licences, how it was made, how to decode top-k).

Upload is resumable: shards go in several commits (batches by file count and bytes); shards already on
the remote with the same size and sha256 are skipped, so rerunning after a failure continues. The card
and the manifest go in the last commit, so a repo is only marked complete once every shard is there.
The token comes from `HF_TOKEN` or the user's login (`huggingface_hub.get_token()`) and is never printed.
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

import fusedata
from fusedata.dataset import open_dataset, sha256_file
from fusedata.errors import UsageError
from schemas.manifest import Manifest

DATA_DIR = "data"
CARD_NAME = "README.md"
MANIFEST_IN_REPO = "fusedata_manifest.json"
FILES_PER_COMMIT = 100
BYTES_PER_COMMIT = 4 << 30  # a failed commit costs at most this much re-upload
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")

# Licence names as recorded by fusedata (models/cache.py) -> Hub licence ids and where to read them.
LICENCES: dict[str, tuple[str, str]] = {
    "apache-2.0": ("apache-2.0", "https://www.apache.org/licenses/LICENSE-2.0"),
    "mit": ("mit", "https://opensource.org/license/mit"),
    "gemma terms of use": ("gemma", "https://ai.google.dev/gemma/terms"),
    "gemma": ("gemma", "https://ai.google.dev/gemma/terms"),
}

METHODS = {"mince": "MinCE", "avgce": "AvgCE"}
CARD_MAX_SHARD_ROWS = 50  # shards listed in the card; all of them are in the manifest

KIND_SUMMARY = {
    "topk": "per-position top-k next-token distributions of one model over a corpus (`fusedata extract`)",
    "aligned": "a source model's top-k distributions expressed on a target model's positions and vocabulary "
               "(`fusedata align`)",
    "fused": "a fusion dataset: the fused sparse top-k target distributions a student is distilled on "
             "(`fusedata fuse`, FuseLLM)",
}

TOPK_MEANING = ("top-k columns, codec `{codec}` v{version}: per position i (predicting token i+1) the top-{k} ids "
                "and log-probs (log-softmax over the full vocabulary, not renormalised), the gold token's "
                "log-prob and the tail mass 1 − Σ top-k probabilities; decode with `decode_topk`")

# Column meanings per dataset kind (the wording of the README's dataset formats section).
COLUMN_MEANINGS: dict[str, dict[str, str]] = {
    "topk": {
        "doc_id": "document id",
        "window": "window number within the document",
        "byte_start": "start of the window's span in the document's UTF-8 bytes",
        "byte_end": "end of the window's span in the document's UTF-8 bytes",
        "input_ids": "[n] the model's own tokens",
        "token_start": "[n] byte offset where each token starts in the document (BOS: empty span)",
        "token_end": "[n] byte offset where each token ends in the document",
        "ce": "mean cross-entropy (nats) of the window's n−1 predictions",
    },
    "aligned": {
        "doc_id": "document id",
        "window": "the target's window number (same rows and order as the target's topk shard)",
        "align_kind": "[n−1] per target position: 0 = 1:1, 1 = many:1, 2 = 1:many, 3 = fallback (one-hot on the label)",
        "mass_kept": "share of the source top-k mass that survived the vocabulary map",
        "source_nll": "the source's own NLL (nats) over the bytes the window predicts",
        "source_bytes": "bytes those source predictions cover (CE per byte = source_nll / source_bytes)",
    },
    "fused": {
        "doc_id": "document id",
        "window": "window number within the document",
        "byte_start": "start of the window's span in the document's UTF-8 bytes",
        "byte_end": "end of the window's span in the document's UTF-8 bytes",
        "input_ids": "[n] target tokens",
        "labels": "[n−1] next-token labels (`input_ids[1:]`)",
        "winner": "[n−1] MinCE: index of the winning candidate per position; AvgCE: −1",
        "weights": "[M] candidate weights (token unit: mean over the window)",
        "candidate_ce": "[M] each candidate's CE under the window metric (nats/byte by default)",
    },
}


@dataclass
class PlannedFile:
    path_in_repo: str
    size: int
    sha256: str
    local: Path | None = None  # a file to upload as is
    content: bytes | None = None  # generated content (card, manifest copy)

    def data(self) -> str | bytes:
        return str(self.local) if self.local is not None else self.content  # type: ignore[return-value]


@dataclass
class PublishPlan:
    folder: Path
    repo_id: str
    manifest: Manifest
    shards: list[PlannedFile]
    extras: list[PlannedFile]  # README.md and the manifest copy: the last commit
    card: str

    @property
    def files(self) -> list[PlannedFile]:
        return self.shards + self.extras

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass
class PublishResult:
    repo_id: str
    url: str
    revision: str
    commits: int = 0
    uploaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    dry_run: bool = False


# -- plan and card (no network) ------------------------------------------------------------------

def plan_publish(folder: str | Path, repo_id: str) -> PublishPlan:
    """Check that `folder` is a finished, intact fusedata dataset and list what would be uploaded."""
    check_repo_id(repo_id)
    folder = Path(folder)
    manifest = open_dataset(folder)  # no manifest / missing shard -> UsageError
    if not manifest.shards:
        raise UsageError(f"{folder}: the manifest lists no shards; nothing to publish")
    shards = []
    for entry in manifest.shards:
        path = folder / entry.name
        size = path.stat().st_size
        digest = sha256_file(path)
        if digest != entry.sha256 or size != entry.bytes:
            raise UsageError(f"{path}: sha256 {digest[:12]}… ({size:,} bytes) differs from the manifest's "
                             f"{entry.sha256[:12]}… ({entry.bytes:,} bytes); the shard was changed or damaged "
                             "after the run finished: rerun the stage to rebuild it")
        shards.append(PlannedFile(f"{DATA_DIR}/{entry.name}", size, digest, local=path))
    card = dataset_card(folder, manifest, repo_id)
    manifest_bytes = manifest.to_json().encode() + b"\n"
    card_bytes = card.encode()
    extras = [
        PlannedFile(MANIFEST_IN_REPO, len(manifest_bytes), hashlib.sha256(manifest_bytes).hexdigest(),
                    content=manifest_bytes),
        PlannedFile(CARD_NAME, len(card_bytes), hashlib.sha256(card_bytes).hexdigest(), content=card_bytes),
    ]
    return PublishPlan(folder, repo_id, manifest, shards, extras, card)


def check_repo_id(repo_id: str) -> None:
    if not REPO_ID.match(repo_id or "") or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise UsageError(f"--repo-id {repo_id!r}: expected 'org/name' (letters, digits, '-', '_', '.')")


def _licence(name: str | None, recorded: str | None) -> str:
    """The licence recorded in the manifest, else the bundled model's, else 'unknown'."""
    if recorded and recorded != "unknown":
        return recorded
    from fusedata.models.cache import BUNDLED

    if name in BUNDLED:
        return BUNDLED[name].licence
    return "unknown"


def _models(manifest: Manifest) -> list[dict[str, Any]]:
    """The models behind a dataset, with role, hashes and licence, from its manifest."""
    run = manifest.run
    if manifest.kind == "topk":
        return [{"role": "model", "model": run.get("model"), "model_hash": run.get("model_hash"),
                 "tokenizer_hash": run.get("tokenizer_hash"), "licence": _licence(run.get("model"), run.get("licence"))}]
    target = run.get("target") or {}
    out = [{"role": "target", "model": target.get("model"), "model_hash": target.get("model_hash"),
            "tokenizer_hash": target.get("tokenizer_hash"),
            "licence": _licence(target.get("model"), target.get("licence"))}]
    if manifest.kind == "aligned":
        src = run.get("source") or {}
        out.append({"role": "source", "model": src.get("model"), "model_hash": src.get("model_hash"),
                    "tokenizer_hash": src.get("tokenizer_hash"), "licence": _licence(src.get("model"), src.get("licence"))})
    elif manifest.kind == "fused":
        candidates = list(run.get("candidates") or [])
        include_target = (run.get("fuse") or {}).get("include_target", True)
        for i, name in enumerate(candidates):
            if include_target and i == 0:
                out[0]["role"] = "target, candidate 0"
                continue
            out.append({"role": f"source, candidate {i}", "model": name, "model_hash": None,
                        "tokenizer_hash": None, "licence": _licence(name, None)})
    return out


def _hub_licences(models: list[dict[str, Any]]) -> list[str]:
    ids = []
    for m in models:
        hub_id = LICENCES.get(str(m["licence"]).lower(), (None, None))[0]
        hub_id = hub_id or ("unknown" if m["licence"] == "unknown" else "other")
        if hub_id not in ids:
            ids.append(hub_id)
    return ids


def _size_category(rows: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                        (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")):
        if rows < limit:
            return name
    return "n>1B"


def _short(name: str | None) -> str:
    """A folder name for a model in the reproduce commands."""
    base = PurePosixPath(str(name or "model").rstrip("/")).name
    return re.sub(r"[^\w.-]+", "-", base) or "model"


def _q(value: Any) -> str:
    return shlex.quote(str(value))


def reproduce_commands(manifest: Manifest, codec_name: str) -> list[str]:
    """The fusedata commands that rebuild this dataset from the same corpus and models."""
    run = manifest.run

    def extract(model: str | None, top_k: Any, extra: str = "") -> str:
        return (f"fusedata extract --model {_q(model)} --input CORPUS --output topk/{_short(model)} "
                f"--top-k {top_k} --max-length {run.get('max_length')} --docs-per-shard {run.get('docs_per_shard')}"
                f"{extra}")

    if manifest.kind == "topk":
        return [extract(run.get("model"), run.get("top_k"), f" --codec {codec_name} --dtype {run.get('dtype')}")]
    target = (run.get("target") or {}).get("model")
    if manifest.kind == "aligned":
        src = (run.get("source") or {}).get("model")
        a = run.get("align") or {}
        return [extract(target, run.get("top_k")), extract(src, run.get("top_k")),
                f"fusedata align --target topk/{_short(target)} --source topk/{_short(src)} "
                f"--output aligned/{_short(src)} --vocab {a.get('vocab')} --sequence {a.get('sequence')} "
                f"--codec {a.get('codec')}"]
    f = run.get("fuse") or {}
    include_target = f.get("include_target", True)
    sources = list(run.get("candidates") or [])[1 if include_target else 0:]
    cmds = [extract(target, run.get("top_k"))] + [extract(s, run.get("top_k")) for s in sources]
    cmds += [f"fusedata align --target topk/{_short(target)} --source topk/{_short(s)} --output aligned/{_short(s)}"
             for s in sources]
    fuse = (f"fusedata fuse --target topk/{_short(target)} "
            + " ".join(f"--aligned aligned/{_short(s)}" for s in sources)
            + f" --output fused --method {f.get('method')} --unit {f.get('unit')} --metric {f.get('metric')}"
            + f" --temperature {f.get('temperature')} --codec {f.get('codec')}")
    if f.get("k_out"):
        fuse += f" --top-k {f['k_out']}"
    if not include_target:
        fuse += " --no-target"
    return cmds + [fuse]


def _type_name(t: pa.DataType) -> str:
    if pa.types.is_list(t):
        return f"list<{_type_name(t.value_type)}>"
    if pa.types.is_struct(t):
        return "struct<" + ", ".join(f"{f.name}: {_type_name(f.type)}" for f in t) + ">"
    return str(t)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def dataset_card(folder: Path, manifest: Manifest, repo_id: str) -> str:
    """The README.md of the published dataset: YAML metadata and a human description."""
    from fusedata.codec import codec_from_schema
    from schemas.common import k_of

    first = folder / manifest.shards[0].name
    schema = pq.read_schema(first)
    try:
        k = k_of(schema)
    except ValueError as exc:
        raise UsageError(f"{first}: {exc}") from None
    codec = codec_from_schema(schema, str(first))
    codec_cols = {f.name for f in codec.fields()}
    models = _models(manifest)
    run, stats = manifest.run, manifest.stats
    positions = int(stats.get("positions") or manifest.tokens - manifest.rows)
    total_bytes = sum(s.bytes for s in manifest.shards)
    licences = _hub_licences(models)

    meta: dict[str, Any] = {
        "license": licences[0] if len(licences) == 1 else licences,
        "pretty_name": f"{repo_id.split('/')[1]} (fusedata {manifest.kind})",
        "tags": ["fusedata", "knowledge-fusion", "distillation", "top-k-logits", f"fusedata-{manifest.kind}"],
        "task_categories": ["text-generation"],
        "size_categories": [_size_category(manifest.rows)],
        "configs": [{"config_name": "default",
                     "data_files": [{"split": "train", "path": f"{DATA_DIR}/shard-*.parquet"}]}],
    }
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    lines = [f"---\n{front}---", "", f"# {repo_id}", "",
             f"A [fusedata](https://pypi.org/project/fusedata/) **{manifest.kind}** dataset: "
             f"{KIND_SUMMARY.get(manifest.kind, manifest.kind)}.", ""]

    lines += ["## Summary", "", "| | |", "|---|---|",
              f"| kind | `{manifest.kind}` |",
              f"| rows (document windows) | {manifest.rows:,} |",
              f"| tokens | {manifest.tokens:,} |",
              f"| predicted positions | {positions:,} |",
              f"| shards | {len(manifest.shards)} ({total_bytes / 1e6:,.2f} MB) |",
              f"| k (entries per position) | {k} |",
              f"| codec | `{codec.name}` v{codec.version} |",
              f"| corpus sha256 | `{run.get('corpus_hash')}` |",
              f"| fusedata version | {manifest.fusedata_version} |",
              f"| created | {manifest.created} |", ""]
    if manifest.kind == "topk" and "mean_ce" in stats:
        lines += [f"Mean cross-entropy: {stats['mean_ce']:.4f} nats/token over {stats.get('docs', '?')} documents.", ""]
    if manifest.kind == "aligned" and "kinds" in stats:
        kinds = ", ".join(f"{name} {share:.1%}" for name, share in stats["kinds"].items())
        lines += [f"Alignment kinds: {kinds}; top-k mass kept {stats.get('mass_kept', 0):.1%}.", ""]

    lines += ["## Models and licences", "",
              "This data is derived from the outputs of the models below; their licences apply to it.", "",
              "| role | model | licence | model sha256 | tokenizer sha256 |", "|---|---|---|---|---|"]
    for m in models:
        lines.append(f"| {m['role']} | `{_cell(m['model'])}` | {_cell(m['licence'])} | "
                     f"{'`' + m['model_hash'][:16] + '…`' if m['model_hash'] else '—'} | "
                     f"{'`' + m['tokenizer_hash'][:16] + '…`' if m['tokenizer_hash'] else '—'} |")
    lines.append("")
    seen = set()
    unknown = [m["model"] for m in models if m["licence"] == "unknown"]
    if unknown:
        lines.append("- The licence of " + ", ".join(f"`{_cell(u)}`" for u in unknown)
                     + " was not recorded: check it before reusing this data.")
    for m in models:
        key = str(m["licence"]).lower()
        if key in seen or key == "unknown":
            continue
        seen.add(key)
        if key in LICENCES and LICENCES[key][0] == "gemma":
            lines.append(f"- Outputs of Gemma models are subject to the [Gemma Terms of Use]({LICENCES[key][1]}) "
                         "and its Prohibited Use Policy; anyone redistributing this data must pass those terms on.")
        elif key in LICENCES:
            lines.append(f"- {m['licence']}: {LICENCES[key][1]}")
        else:
            lines.append(f"- {m['licence']}")
    if manifest.kind == "fused":
        lines.append("- Full hashes of the target are in `fusedata_manifest.json`; those of the sources are in the "
                     "manifests of the aligned datasets this was fused from (run digests "
                     + ", ".join(f"`{d}`" for d in run.get("aligned_runs", [])) + ").")
    lines.append("")

    lines += ["## How it was made", ""]
    if manifest.kind == "topk":
        lines.append(f"`fusedata extract` with `{run.get('model')}`: top-{run.get('top_k')}, windows of at most "
                     f"{run.get('max_length')} tokens, {run.get('dtype')}, vocabulary {run.get('vocab_size'):,}.")
    elif manifest.kind == "aligned":
        a = run.get("align") or {}
        lines.append(f"`fusedata align`: vocabulary map `{a.get('vocab')}` "
                     f"({'minimum edit distance, MinED' if a.get('vocab') == 'mined' else 'exact match, EM'}), "
                     f"position alignment `{a.get('sequence')}`; target vocabulary {run.get('vocab_size'):,}.")
    elif manifest.kind == "fused":
        f = run.get("fuse") or {}
        cands = ", ".join(f"{i} = `{c}`" for i, c in enumerate(run.get("candidates") or []))
        lines.append(f"`fusedata fuse`: method **{METHODS.get(f.get('method'), f.get('method'))}**, unit `{f.get('unit')}`, metric "
                     f"`{f.get('metric')}` (CE per {'byte' if f.get('metric') == 'byte' else 'token'}), temperature "
                     f"{f.get('temperature')}, target included: {f.get('include_target')}. Candidates: {cands}.")
        if "winning_share" in stats:
            share = ", ".join(f"{s:.1%}" for s in stats["winning_share"])
            lines.append(f"Winning share per candidate: {share}; mean weights {stats.get('mean_weights')}.")
    lines += ["", "Commands that reproduce it (`CORPUS` is the corpus whose sha256 is above; the manifest records "
              "every setting):", "", "```bash"]
    lines += reproduce_commands(manifest, codec.name)
    lines += ["```", ""]

    lines += ["## Columns", "", "| column | type | meaning |", "|---|---|---|"]
    meanings = COLUMN_MEANINGS.get(manifest.kind, {})
    topk_meaning = TOPK_MEANING.format(codec=codec.name, version=codec.version, k=k)
    for f in schema:
        meaning = topk_meaning if f.name in codec_cols else meanings.get(f.name, "")
        lines.append(f"| `{f.name}` | {_cell(_type_name(f.type))} | {_cell(meaning)} |")
    lines.append("")
    if manifest.kind == "fused":
        lines += ["Candidate names (index order) are in the schema metadata (`fusedata.candidates`) and the "
                  "manifest.", ""]

    shard0 = f"{DATA_DIR}/{manifest.shards[0].name}"
    lines += ["## Reading the top-k columns", "",
              "The top-k columns are stored compactly by a fusedata codec; the codec (name, version, parameters) "
              "and k are in each Parquet file's schema metadata (`fusedata.codec`, `fusedata.k`). "
              "`datasets` drops that metadata, so pass `like=` a shard file to read it from:", "",
              "```python",
              "# pip install fusedata datasets",
              "from datasets import load_dataset",
              "from huggingface_hub import hf_hub_download",
              "from fusedata.codec import decode_topk", "",
              f'ds = load_dataset("{repo_id}", split="train")',
              f'shard = hf_hub_download("{repo_id}", "{shard0}", repo_type="dataset")',
              "topk = decode_topk(ds.data.table, like=shard)",
              "topk.ids, topk.logprobs        # int32 / float32 [positions, k]; padding entries: id -1, -inf",
              "topk.gold_logprob, topk.tail_mass, topk.lengths   # [positions], [positions], positions per row",
              "```", "",
              "With pyarrow the metadata is kept: `decode_topk(pyarrow.parquet.read_table(shard))`.", ""]

    lines += ["## Files and integrity", "",
              f"- `{DATA_DIR}/shard-*.parquet`: {len(manifest.shards)} Parquet shards (zstd).",
              f"- `{MANIFEST_IN_REPO}`: the run's manifest: inputs, model and tokenizer identity, k, codec, "
              "row and token counts, statistics, and every shard's rows, tokens, bytes and sha256.", "",
              "| shard | rows | tokens | bytes | sha256 |", "|---|---:|---:|---:|---|"]
    for s in manifest.shards[:CARD_MAX_SHARD_ROWS]:
        lines.append(f"| `{s.name}` | {s.rows:,} | {s.tokens:,} | {s.bytes:,} | `{s.sha256}` |")
    if len(manifest.shards) > CARD_MAX_SHARD_ROWS:
        lines.append(f"| … {len(manifest.shards) - CARD_MAX_SHARD_ROWS} more in `{MANIFEST_IN_REPO}` | | | | |")
    lines += ["", f"Published with `fusedata publish` (fusedata {fusedata.__version__}).", ""]
    return "\n".join(lines)


# -- upload --------------------------------------------------------------------------------------

def git_blob_sha1(path: Path) -> str:
    """The git object id of a file (what the Hub reports as `oid` for a non-LFS file)."""
    h = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _same_on_remote(planned: PlannedFile, remote: Any) -> bool:
    if remote is None or remote.size != planned.size:
        return False
    if remote.lfs is not None:  # LFS / Xet files: the Hub reports the content's sha256
        return remote.lfs.sha256 == planned.sha256
    return planned.local is not None and remote.blob_id == git_blob_sha1(planned.local)


def batches(files: list[PlannedFile], max_files: int, max_bytes: int) -> list[list[PlannedFile]]:
    out: list[list[PlannedFile]] = []
    size = 0
    for f in files:
        if not out or len(out[-1]) >= max_files or (out[-1] and size + f.size > max_bytes):
            out.append([])
            size = 0
        out[-1].append(f)
        size += f.size
    return out


def render_plan(plan: PublishPlan) -> str:
    """What a dry run prints: files, sizes and the card."""
    lines = [f"would publish {plan.folder} ({plan.manifest.kind}) to dataset repo {plan.repo_id}:"]
    for f in plan.files:
        lines.append(f"  {f.path_in_repo:<40} {f.size:>14,} bytes  sha256 {f.sha256[:16]}…")
    lines.append(f"  total {len(plan.files)} files, {plan.total_bytes:,} bytes")
    lines += ["", f"--- {CARD_NAME} ---", plan.card]
    return "\n".join(lines)


def publish(folder: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
            dry_run: bool = False, token: str | None = None, endpoint: str | None = None,
            files_per_commit: int = FILES_PER_COMMIT, bytes_per_commit: int = BYTES_PER_COMMIT,
            log: Callable[[str], None] = print) -> PublishResult:
    """Publish a finished dataset folder to a Hub dataset repo (see the module docstring)."""
    if files_per_commit < 1 or bytes_per_commit < 1:
        raise UsageError("files and bytes per commit must be at least 1")
    plan = plan_publish(folder, repo_id)
    branch = revision or "main"
    if dry_run:
        log(render_plan(plan))
        return PublishResult(repo_id, f"datasets/{repo_id}", branch, dry_run=True)

    from huggingface_hub import HfApi, constants, get_token

    try:
        token = token or get_token()
    except Exception as exc:  # noqa: BLE001  (e.g. HF_OIDC_RESOURCE set outside CI)
        raise UsageError(f"could not get a Hugging Face token: {type(exc).__name__}") from None
    if not token:
        raise UsageError("no Hugging Face token: set HF_TOKEN or log in with `hf auth login`")
    if constants.is_offline_mode():
        raise UsageError("HF_HUB_OFFLINE is set: unset it to publish to the Hub")
    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=token)

    def hub_error(exc: BaseException) -> str:  # one line, never the token
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return first.replace(token, "***")

    try:
        url = _ensure_repo(api, repo_id, private, branch, log)
        remote = _remote_files(api, repo_id, branch)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001  (HTTP and network errors become one clear line)
        raise UsageError(f"{repo_id}: {hub_error(exc)}") from None

    result = PublishResult(repo_id, url, branch)
    pending = []
    for f in plan.shards:
        if _same_on_remote(f, remote.get(f.path_in_repo)):
            result.skipped.append(f.path_in_repo)
        else:
            pending.append(f)
    if result.skipped:
        log(f"{len(result.skipped)} of {len(plan.shards)} shards already on the Hub with the same sha256: skipped")
    planned_paths = {f.path_in_repo for f in plan.shards}
    stale = sorted(p for p in remote if re.fullmatch(rf"{DATA_DIR}/shard-\d+\.parquet", p) and p not in planned_paths)

    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    groups = batches(pending, files_per_commit, bytes_per_commit)
    n_commits = len(groups) + 1
    for i, group in enumerate(groups, 1):
        names = f"{PurePosixPath(group[0].path_in_repo).name}" + (
            f" … {PurePosixPath(group[-1].path_in_repo).name}" if len(group) > 1 else "")
        size = sum(f.size for f in group)
        log(f"commit {i}/{n_commits}: {len(group)} shard(s), {size:,} bytes ({names})")
        try:
            api.create_commit(repo_id, [CommitOperationAdd(f.path_in_repo, f.data()) for f in group],
                              commit_message=f"fusedata publish: shards {names}", repo_type="dataset",
                              revision=revision)
        except Exception as exc:  # noqa: BLE001
            raise UsageError(_interrupted(repo_id, i, n_commits, hub_error(exc), plan, result)) from None
        result.commits += 1
        result.uploaded += [f.path_in_repo for f in group]

    ops: list[Any] = [CommitOperationAdd(f.path_in_repo, f.data()) for f in plan.extras]
    ops += [CommitOperationDelete(p) for p in stale]
    log(f"commit {n_commits}/{n_commits}: {CARD_NAME}, {MANIFEST_IN_REPO}"
        + (f", removing {len(stale)} stale shard(s)" if stale else ""))
    try:
        api.create_commit(repo_id, ops, commit_message=f"fusedata publish: dataset card and manifest "
                                                       f"({plan.manifest.kind}, {len(plan.shards)} shards)",
                          repo_type="dataset", revision=revision)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(_interrupted(repo_id, n_commits, n_commits, hub_error(exc), plan, result)) from None
    result.commits += 1
    result.deleted = stale
    log(f"published {plan.manifest.kind} dataset to {url} (revision {branch}): {len(plan.shards)} shards, "
        f"{len(result.uploaded)} uploaded, {len(result.skipped)} already there")
    return result


def _interrupted(repo_id: str, i: int, n: int, why: str, plan: PublishPlan, result: PublishResult) -> str:
    there = len(result.uploaded) + len(result.skipped)
    return (f"upload to {repo_id} stopped at commit {i}/{n}: {why}. {there} of {len(plan.shards)} shards are on the "
            f"Hub ({len(result.uploaded)} uploaded by this run); the dataset card was not written, so the repo is "
            "not marked complete. Rerun the same command to continue: shards already there are skipped")


def _ensure_repo(api: Any, repo_id: str, private: bool, branch: str, log: Callable[[str], None]) -> str:
    """Create the dataset repo (and branch) if needed; refuse an id that is another type of repo."""
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    try:
        api.whoami()
    except HfHubHTTPError as exc:
        if exc.response is not None and exc.response.status_code == 401:
            raise UsageError("the Hub refused the token (401): check HF_TOKEN or log in with `hf auth login`") from None
        raise
    try:
        info = api.repo_info(repo_id, repo_type="dataset")
        if private and not getattr(info, "private", False):
            log(f"dataset repo {repo_id} exists and is public: --private does not change an existing repo")
    except RepositoryNotFoundError:
        for other in ("model", "space"):
            if api.repo_exists(repo_id, repo_type=other):
                raise UsageError(f"{repo_id} exists on the Hub as a {other} repo, not a dataset repo; "
                                 "choose another --repo-id") from None
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        log(f"created {'private ' if private else ''}dataset repo {repo_id}")
    if branch != "main":
        api.create_branch(repo_id, branch=branch, repo_type="dataset", exist_ok=True)
    return f"{api.endpoint}/datasets/{repo_id}"


def _remote_files(api: Any, repo_id: str, branch: str) -> dict[str, Any]:
    """Files already under data/ on the remote branch (path -> RepoFile)."""
    from huggingface_hub.errors import EntryNotFoundError  # RemoteEntryNotFoundError derives from it

    try:
        entries = list(api.list_repo_tree(repo_id, path_in_repo=DATA_DIR, recursive=True, repo_type="dataset",
                                          revision=branch))
    except EntryNotFoundError:
        return {}
    return {e.path: e for e in entries if hasattr(e, "size")}

