"""`fusedata publish`: share a finished dataset folder (topk, aligned or fused) on the Hugging Face Hub.

This module is the Hub client (plan, resumable upload); the card is rendered by card.py.

What lands in the dataset repo:
- `data/shard-NNNNN.parquet`: the shards, byte for byte (their sha256 is checked against the manifest first);
- `fusedata_manifest.json`: the folder's `_manifest.json`, so provenance and checksums travel with the data;
- `README.md`: a generated dataset card (YAML `configs`/`data_files` for the viewer and
  `datasets.load_dataset`, column table, models and licences, how it was made, how to decode top-k).

Upload is resumable: shards go in several commits (batches by file count and bytes); shards already on
the remote with the same size and sha256 are skipped, so rerunning after a failure continues. The card
and the manifest go in the last commit, so a repo is only marked complete once every shard is there.
The token comes from `HF_TOKEN` or the user's login (`huggingface_hub.get_token()`) and is never printed.

A dataset on a URI (s3://…) is read through fusedata.storage: its shards are checked by streaming
them, and each commit's shards are downloaded into a temporary folder just before the commit and
deleted after it (the Hub client uploads local files), so the local disk holds one commit's worth
(at most `--commit-mb`), never the whole dataset.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath
from typing import Any

from fusedata.dataset import open_dataset, sha256_file
from fusedata.errors import UsageError
from fusedata.publish.card import DATA_DIR, MANIFEST_IN_REPO, MANIFEST_PLAIN_IN_REPO, PLAIN_DIR, dataset_card
from fusedata.storage import Location, PathLike, locate
from schemas.manifest import Manifest

CARD_NAME = "README.md"
FILES_PER_COMMIT = 100
BYTES_PER_COMMIT = 4 << 30  # a failed commit costs at most this much re-upload
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


@dataclass
class PlannedFile:
    path_in_repo: str
    size: int
    sha256: str
    local: Path | None = None  # a file to upload as is
    content: bytes | None = None  # generated content (card, manifest copy)
    remote: Location | None = None  # a file on a URI: downloaded just before its commit (`_local_copies`)

    def data(self) -> str | bytes:
        return str(self.local) if self.local is not None else self.content  # type: ignore[return-value]


@dataclass
class PublishPlan:
    folder: Location
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


# -- plan (no network) ---------------------------------------------------------------------------

def _checked_shards(folder: Location, manifest: Manifest, into: str) -> list[PlannedFile]:
    shards = []
    for entry in manifest.shards:
        path = folder / entry.name
        size = path.size()
        digest = sha256_file(path)
        if digest != entry.sha256 or size != entry.bytes:
            raise UsageError(f"{path}: sha256 {digest[:12]}… ({size:,} bytes) differs from the manifest's "
                             f"{entry.sha256[:12]}… ({entry.bytes:,} bytes); the shard was changed or damaged "
                             "after the run finished: rerun the stage to rebuild it")
        where = {"local": Path(path.path)} if path.is_local else {"remote": path}
        shards.append(PlannedFile(f"{into}/{entry.name}", size, digest, **where))
    return shards


def _content(path_in_repo: str, data: bytes) -> PlannedFile:
    return PlannedFile(path_in_repo, len(data), hashlib.sha256(data).hexdigest(), content=data)


def plan_publish(folder: PathLike | Location, repo_id: str, plain: PathLike | Location | None = None) -> PublishPlan:
    """Check that `folder` is a finished, intact fusedata dataset and list what would be uploaded.
    `plain`: a plain export of `folder` (`fusedata export --layout plain`), published beside it as a
    second config of the same repo (the card's `configs` list says which is which)."""
    from fusedata.dataset import run_digest

    check_repo_id(repo_id)
    folder = locate(folder)
    manifest = open_dataset(folder, verify=False)  # no manifest / missing shard; the sha256s are checked below
    if not manifest.shards:
        raise UsageError(f"{folder}: the manifest lists no shards; nothing to publish")
    shards = _checked_shards(folder, manifest, DATA_DIR)
    extra_files = []
    plain_pair = None
    if plain is not None:
        if manifest.kind == "plain":
            raise UsageError(f"{folder} is already a plain export; --plain goes with the compact dataset it came from")
        plain_dir = locate(plain)
        plain_manifest = open_dataset(plain_dir, "plain", verify=False)
        run = plain_manifest.run
        if run.get("source_digest") != run_digest(manifest.run) or \
                run.get("source_shards") != [s.sha256 for s in manifest.shards]:
            raise UsageError(f"--plain {plain_dir} is not an export of {folder} (another run or other shards); "
                             f"export it again: fusedata export {folder} --output {plain_dir} --layout plain --overwrite")
        shards += _checked_shards(plain_dir, plain_manifest, PLAIN_DIR)
        plain_pair = (plain_dir, plain_manifest)
        extra_files.append(_content(MANIFEST_PLAIN_IN_REPO, plain_manifest.to_json().encode() + b"\n"))
    card = dataset_card(folder, manifest, repo_id, plain_pair)
    extras = [_content(MANIFEST_IN_REPO, manifest.to_json().encode() + b"\n"), *extra_files,
              _content(CARD_NAME, card.encode())]
    return PublishPlan(folder, repo_id, manifest, shards, extras, card)


def check_repo_id(repo_id: str) -> None:
    if not REPO_ID.match(repo_id or "") or ".." in repo_id or repo_id.endswith((".git", ".")):
        raise UsageError(f"--repo-id {repo_id!r}: expected 'org/name' (letters, digits, '-', '_', '.')")


# -- upload --------------------------------------------------------------------------------------

def git_blob_sha1(path: PathLike | Location) -> str:
    """The git object id of a file (what the Hub reports as `oid` for a non-LFS file)."""
    loc = locate(path)
    h = hashlib.sha1(f"blob {loc.size()}\0".encode())
    for block in loc.blocks():
        h.update(block)
    return h.hexdigest()


def _same_on_remote(planned: PlannedFile, remote: Any) -> bool:
    if remote is None or remote.size != planned.size:
        return False
    if remote.lfs is not None:  # LFS / Xet files: the Hub reports the content's sha256
        return remote.lfs.sha256 == planned.sha256
    source = planned.local if planned.local is not None else planned.remote
    return source is not None and remote.blob_id == git_blob_sha1(source)


@contextmanager
def _local_copies(files: list[PlannedFile]) -> Iterator[list[PlannedFile]]:
    """`files` with each one on a URI downloaded into a temporary folder (checked against the sha256
    planned), which is deleted when the commit is done."""
    if all(f.remote is None for f in files):
        yield files
        return
    with tempfile.TemporaryDirectory(prefix="fusedata-publish-") as tmp:
        out = []
        for i, f in enumerate(files):
            if f.remote is None:
                out.append(f)
                continue
            local = Path(tmp) / f"{i:05d}-{f.remote.name}"
            digest = hashlib.sha256()
            with open(local, "wb") as dst:
                for block in f.remote.blocks():
                    digest.update(block)
                    dst.write(block)
            if digest.hexdigest() != f.sha256:
                raise UsageError(f"{f.remote}: changed since it was checked (its sha256 differs from the manifest's); "
                                 "rerun the stage that wrote it, then publish again")
            out.append(replace(f, local=local, remote=None))
        yield out


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


def publish(folder: PathLike | Location, repo_id: str, *, plain: PathLike | Location | None = None,
            private: bool = False,
            revision: str | None = None,
            dry_run: bool = False, token: str | None = None, endpoint: str | None = None,
            files_per_commit: int = FILES_PER_COMMIT, bytes_per_commit: int = BYTES_PER_COMMIT,
            log: Callable[[str], None] = print) -> PublishResult:
    """Publish a finished dataset folder to a Hub dataset repo (see the module docstring)."""
    if files_per_commit < 1 or bytes_per_commit < 1:
        raise UsageError("files and bytes per commit must be at least 1")
    plan = plan_publish(folder, repo_id, plain)
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
    stale = sorted(p for p in remote if re.fullmatch(rf"({DATA_DIR}|{PLAIN_DIR})/shard-\d+\.parquet", p)
                   and p not in planned_paths)

    from huggingface_hub import CommitOperationAdd, CommitOperationDelete

    groups = batches(pending, files_per_commit, bytes_per_commit)
    n_commits = len(groups) + 1
    for i, group in enumerate(groups, 1):
        names = f"{PurePosixPath(group[0].path_in_repo).name}" + (
            f" … {PurePosixPath(group[-1].path_in_repo).name}" if len(group) > 1 else "")
        size = sum(f.size for f in group)
        log(f"commit {i}/{n_commits}: {len(group)} shard(s), {size:,} bytes ({names})")
        try:
            with _local_copies(group) as files:
                api.create_commit(repo_id, [CommitOperationAdd(f.path_in_repo, f.data()) for f in files],
                                  commit_message=f"fusedata publish: shards {names}", repo_type="dataset",
                                  revision=revision)
        except UsageError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise UsageError(_interrupted(repo_id, i, n_commits, hub_error(exc), plan, result)) from None
        result.commits += 1
        result.uploaded += [f.path_in_repo for f in group]

    ops: list[Any] = [CommitOperationAdd(f.path_in_repo, f.data()) for f in plan.extras]
    ops += [CommitOperationDelete(p) for p in stale]
    log(f"commit {n_commits}/{n_commits}: {', '.join(f.path_in_repo for f in plan.extras)}"
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
    """Files already under data/ and plain/ on the remote branch (path -> RepoFile)."""
    from huggingface_hub.errors import EntryNotFoundError  # RemoteEntryNotFoundError derives from it

    found: dict[str, Any] = {}
    for folder in (DATA_DIR, PLAIN_DIR):
        try:
            entries = list(api.list_repo_tree(repo_id, path_in_repo=folder, recursive=True, repo_type="dataset",
                                              revision=branch))
        except EntryNotFoundError:
            continue
        found |= {e.path: e for e in entries if hasattr(e, "size")}
    return found
