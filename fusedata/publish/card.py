"""The dataset card (README.md) of a published dataset, rendered from its manifest and schema.

Column meanings come from the schemas' field metadata (`schemas.common.column`), the same text the
README's dataset tables are checked against; the "reproduce" commands are built from the configs
stored in the run record, option by option from the config dataclasses' fields.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import fields
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

import fusedata
from fusedata.errors import UsageError
from fusedata.storage import locate
from schemas.manifest import Manifest

DATA_DIR = "data"
MANIFEST_IN_REPO = "fusedata_manifest.json"

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

SCHEMAS = {"topk": "schemas.topk", "aligned": "schemas.aligned", "fused": "schemas.fused"}
PLAIN_DIR = "plain"  # where a plain export goes when it is published beside the compact dataset
CONFIG_NOTE = {
    "plain": "the plain layout: every top-k value as Parquet lists (`topk_ids`, `topk_logprobs`, `gold_logprob`, "
             "`tail_mass`), readable by the dataset viewer, `datasets`, pandas, polars, duckdb with no fusedata",
    "compact": "fusedata's compact layout: the top-k in the `{codec}` codec (~20% smaller or more); decode with "
               "`fusedata.load` or `decode_topk`",
}


def source_manifest(manifest: Manifest) -> Manifest:
    """The manifest that says where the rows came from: a plain export's source, else itself."""
    if manifest.kind != "plain":
        return manifest
    run = manifest.run
    return Manifest(kind=run["of"], fusedata_version=manifest.fusedata_version, run=run["source_run"],
                    shards=manifest.shards, stats=manifest.stats.get("source_stats", {}), created=manifest.created)


def plain_meanings(kind: str) -> dict[str, str]:
    """Column -> meaning of a plain export of `kind` (schemas/plain.py)."""
    from schemas.common import description
    from schemas.plain import TOPK_FIELDS, base_fields

    out = {}
    for f in base_fields(kind) + TOPK_FIELDS:
        meaning, shape = description(f)
        out[f.name] = f"{shape} {meaning}" if shape else meaning
    return out


def column_meanings(kind: str) -> dict[str, str]:
    """Column -> meaning of a dataset kind's base columns, from its schema's field metadata; list
    columns lead with their length per row ("[n] the model's own tokens")."""
    import importlib

    from schemas.common import description

    if kind not in SCHEMAS:
        return {}
    out = {}
    for f in importlib.import_module(SCHEMAS[kind]).BASE_FIELDS:
        meaning, shape = description(f)
        out[f.name] = f"{shape} {meaning}" if shape else meaning
    return out




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


def config_args(cls: type, values: dict[str, Any], flags: dict[str, str] | None = None,
                negated: dict[str, str] | None = None) -> str:
    """Command-line options for the stored config `values`, in the field order of `cls`: a field
    `top_k` is `--top-k` (or `flags[name]`), a true bool a bare flag, a false one `negated[name]`."""
    flags, negated = flags or {}, negated or {}
    out = []
    for f in fields(cls):
        if f.name not in values or f.metadata.get("internal"):
            continue
        value, flag = values[f.name], flags.get(f.name, "--" + f.name.replace("_", "-"))
        if f.name in negated:
            out += [] if value else [negated[f.name]]
        elif isinstance(value, bool):
            out += [flag] if value else []
        else:
            out.append(f"{flag} {_q(value)}")
    return " ".join(out)


def reproduce_commands(manifest: Manifest, codec_name: str) -> list[str]:
    """The fusedata commands that rebuild this dataset from the same corpus and models, with the
    settings its run record stores (read back through the config dataclasses)."""
    from fusedata.stages.align import AlignConfig
    from fusedata.stages.extract import ExtractConfig, ExtractJob
    from fusedata.stages.fuse import FuseConfig

    run = manifest.run

    def extract(model: str | None, settings: dict[str, Any]) -> str:
        return (f"fusedata extract --model {_q(model)} --input CORPUS --output topk/{_short(model)} "
                + config_args(ExtractConfig, settings) + " "
                + config_args(ExtractJob, {"docs_per_shard": run.get("docs_per_shard")
                                           or (run.get("target") or {}).get("docs_per_shard")})).rstrip()

    shared = {"top_k": run.get("top_k"), "max_length": run.get("max_length")
              or (run.get("target") or {}).get("max_length")}
    if manifest.kind == "topk":
        own = {"dtype": run.get("dtype"), "codec": codec_name, "backend": run.get("backend"),
               "targets": run.get("targets"), "sample_seed": run.get("sample_seed")}  # sampled targets only
        return [extract(run.get("model"), shared | {k: v for k, v in own.items() if v is not None})]
    target = (run.get("target") or {}).get("model")
    if manifest.kind == "aligned":
        src = (run.get("source") or {}).get("model")
        return [extract(target, shared), extract(src, shared),
                f"fusedata align --target topk/{_short(target)} --source topk/{_short(src)} "
                f"--output aligned/{_short(src)} " + config_args(AlignConfig, run.get("align") or {})]
    f = run.get("fuse") or {}
    include_target = f.get("include_target", True)
    sources = list(run.get("candidates") or [])[1 if include_target else 0:]
    alm = (run.get("alm_source") or {}).get("model")  # fuse --alm-source: that source's own extract
    cmds = [extract(target, shared)] + [extract(s, shared) for s in sources]
    cmds += [extract(alm, shared)] if alm and alm != target and alm not in sources else []
    cmds += [f"fusedata align --target topk/{_short(target)} --source topk/{_short(s)} --output aligned/{_short(s)}"
             for s in sources]
    cmds.append(f"fusedata fuse --target topk/{_short(target)} "
                + "".join(f"--aligned aligned/{_short(s)} " for s in sources)
                + "--output fused " + config_args(FuseConfig, f, flags={"k_out": "--top-k"},
                                                  negated={"include_target": "--no-target"})
                + (f" --alm-source topk/{_short(alm)}" if alm else ""))
    return cmds


def _type_name(t: pa.DataType) -> str:
    if pa.types.is_list(t):
        return f"list<{_type_name(t.value_type)}>"
    if pa.types.is_struct(t):
        return "struct<" + ", ".join(f"{f.name}: {_type_name(f.type)}" for f in t) + ">"
    return str(t)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def dataset_card(folder: Path, manifest: Manifest, repo_id: str, plain: tuple[Path, Manifest] | None = None) -> str:
    """The README.md of the published dataset: YAML metadata and a human description. `plain`: a plain
    export of this dataset published beside it as a second config (its folder and manifest)."""
    from fusedata.codec import codec_from_schema
    from schemas.common import k_of

    first = locate(folder) / manifest.shards[0].name
    schema = pq.read_schema(first.path, filesystem=first.fs)
    try:
        k = k_of(schema)
    except ValueError as exc:
        raise UsageError(f"{first}: {exc}") from None
    plain_only = manifest.kind == "plain"
    codec = None if plain_only else codec_from_schema(schema, str(first))
    codec_cols = {f.name for f in codec.fields()} if codec else set()
    exported = source_manifest(manifest)
    layouts = ["plain", "compact"] if plain else (["plain"] if plain_only else [])
    manifest = exported  # the rows' kind, models and run, whichever layout holds them
    models = _models(manifest)
    run, stats = manifest.run, manifest.stats
    positions = int(stats.get("positions") or manifest.tokens - manifest.rows)
    total_bytes = sum(s.bytes for s in manifest.shards)
    licences = _hub_licences(models)

    meta: dict[str, Any] = {
        "license": licences[0] if len(licences) == 1 else licences,
        "pretty_name": f"{repo_id.split('/')[1]} (fusedata {manifest.kind})",
        "tags": ["fusedata", "knowledge-fusion", "distillation", "top-k-logits", f"fusedata-{manifest.kind}"]
        + (["fusedata-plain"] if layouts else []),
        "task_categories": ["text-generation"],
        "size_categories": [_size_category(manifest.rows)],
        "configs": [{"config_name": "default",
                     "data_files": [{"split": "train", "path": f"{DATA_DIR}/shard-*.parquet"}]}],
    }
    if plain:  # the plain config first and default: the viewer shows numbers
        meta["configs"] = [
            {"config_name": "plain", "data_files": [{"split": "train", "path": f"{PLAIN_DIR}/shard-*.parquet"}],
             "default": True},
            {"config_name": "compact", "data_files": [{"split": "train", "path": f"{DATA_DIR}/shard-*.parquet"}]}]
    front = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True)
    lines = [f"---\n{front}---", "", f"# {repo_id}", "",
             f"A [fusedata](https://pypi.org/project/fusedata/) **{manifest.kind}** dataset: "
             f"{KIND_SUMMARY.get(manifest.kind, manifest.kind)}"
             + (", in the plain layout (no fusedata needed to read it)." if plain_only else "."), ""]
    codec_name = codec.name if codec else str((run.get("codec") or {}).get("name") or (run.get("fuse") or {}).get("codec")
                                              or (run.get("align") or {}).get("codec") or "zq")
    if plain:
        lines += ["## Configs", "", "| config | path | what it holds |", "|---|---|---|",
                  f"| `plain` (default) | `{PLAIN_DIR}/` | {CONFIG_NOTE['plain']} |",
                  f"| `compact` | `{DATA_DIR}/` | {CONFIG_NOTE['compact'].format(codec=codec_name)} |", "",
                  "Both hold the same rows in the same order: "
                  f'`load_dataset("{repo_id}", "plain")` or `load_dataset("{repo_id}", "compact")`.', ""]

    lines += ["## Summary", "", "| | |", "|---|---|",
              f"| kind | `{manifest.kind}` |",
              f"| rows (document windows) | {manifest.rows:,} |",
              f"| tokens | {manifest.tokens:,} |",
              f"| predicted positions | {positions:,} |",
              f"| shards | {len(manifest.shards)} ({total_bytes / 1e6:,.2f} MB) |",
              f"| k (entries per position) | {k} |",
              (f"| codec | `{codec.name}` v{codec.version} |" if codec else
               "| layout | plain: the top-k as Parquet lists, no codec |"),
              f"| corpus listing hash (`corpus_hash`) | `{run.get('corpus_hash')}` |",
              *([f"| corpus content (`corpus_content`) | `{stats['corpus_content']}` |"]
                if stats.get("corpus_content") else []),
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
                     f"`{f.get('metric')}` (CE per {'byte' if f.get('metric') == 'byte' else 'token'}), "
                     + (f"temperature {f.get('temperature')}, " if f.get("method") == "avgce" else "")
                     + f"target included: {f.get('include_target')}. Candidates: {cands}.")
        if "winning_share" in stats:
            share = ", ".join(f"{s:.1%}" for s in stats["winning_share"])
            lines.append(f"Winning share per candidate: {share}; mean weights {stats.get('mean_weights')}.")
    lines += ["", "Commands that reproduce it (`CORPUS` is the corpus whose sha256 is above; the manifest records "
              "every setting):", "", "```bash"]
    lines += reproduce_commands(manifest, codec.name if codec else codec_name)
    if layouts:
        lines.append(f"fusedata export {manifest.kind} --output {manifest.kind}-plain --layout plain")
    lines += ["```", ""]

    tables = []
    if plain or plain_only:
        plain_first = locate(plain[0]) / plain[1].shards[0].name if plain else None
        plain_schema = pq.read_schema(plain_first.path, filesystem=plain_first.fs) if plain_first else schema
        tables.append(("plain" if plain else "", plain_schema, plain_meanings(manifest.kind)))
    if codec:
        tables.append(("compact" if plain else "", schema, column_meanings(manifest.kind)))
    for name, table_schema, meanings in tables:
        lines += [f"## Columns{f' of the `{name}` config' if name else ''}", "", "| column | type | meaning |",
                  "|---|---|---|"]
        topk_meaning = TOPK_MEANING.format(codec=codec.name, version=codec.version, k=k) if codec else ""
        for f in table_schema:
            meaning = topk_meaning if f.name in codec_cols else meanings.get(f.name, "")
            lines.append(f"| `{f.name}` | {_cell(_type_name(f.type))} | {_cell(meaning)} |")
        lines.append("")
    if manifest.kind == "fused":
        lines += ["Candidate names (index order) are in the schema metadata (`fusedata.candidates`) and the "
                  "manifest.", ""]

    shard0 = f"{DATA_DIR}/{manifest.shards[0].name}"
    if layouts:
        config = ', "plain"' if plain else ""
        lines += ["## Reading the plain top-k", "", "```python",
                  "from datasets import load_dataset", "",
                  f'ds = load_dataset("{repo_id}"{config}, split="train")',
                  'row = ds[0]; row["topk_ids"][i], row["topk_logprobs"][i]   # position i: ids and log-probs, best first',
                  "```", "",
                  "A position lists only its real entries (a merged distribution may list fewer than k); "
                  "`tail_mass` is the probability outside them. `fusedata import` turns it back into the "
                  "compact layout.", ""]
    if codec is None:
        lines += _files_section(manifest, plain_only=True)
        return "\n".join(lines)
    lines += [f"## Reading the top-k columns{' of the `compact` config' if plain else ''}", "",
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

    lines += _files_section(manifest, plain_only=False, plain=plain)
    return "\n".join(lines)


MANIFEST_PLAIN_IN_REPO = "fusedata_manifest_plain.json"


def _files_section(manifest: Manifest, plain_only: bool, plain: tuple[Path, Manifest] | None = None) -> list[str]:
    what = "the plain layout" if plain_only else "the compact layout" if plain else ""
    lines = ["## Files and integrity", "",
             f"- `{DATA_DIR}/shard-*.parquet`: {len(manifest.shards)} Parquet shards (zstd){', ' + what if what else ''}.",
             f"- `{MANIFEST_IN_REPO}`: the run's manifest: inputs, model and tokenizer identity, k, codec, "
             "row and token counts, statistics, and every shard's rows, tokens, bytes and sha256."]
    if plain:
        lines += [f"- `{PLAIN_DIR}/shard-*.parquet`: the same rows in the plain layout; `{MANIFEST_PLAIN_IN_REPO}`: "
                  "its manifest (the export's run record names this dataset's run)."]
    lines += ["", "| shard | rows | tokens | bytes | sha256 |", "|---|---:|---:|---:|---|"]
    for s in manifest.shards[:CARD_MAX_SHARD_ROWS]:
        lines.append(f"| `{s.name}` | {s.rows:,} | {s.tokens:,} | {s.bytes:,} | `{s.sha256}` |")
    if len(manifest.shards) > CARD_MAX_SHARD_ROWS:
        lines.append(f"| … {len(manifest.shards) - CARD_MAX_SHARD_ROWS} more in `{MANIFEST_IN_REPO}` | | | | |")
    lines += ["", f"Published with `fusedata publish` (fusedata {fusedata.__version__}).", ""]
    return lines
