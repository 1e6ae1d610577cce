"""`fusedata publish`: upload a finished dataset folder to a Hugging Face Hub dataset repo."""

from __future__ import annotations

import click

from fusedata.publish import BYTES_PER_COMMIT, FILES_PER_COMMIT


@click.command("publish")
@click.argument("path", type=click.Path(file_okay=False))
@click.option("--repo-id", required=True, help="Dataset repo on the Hub, org/name (created if needed).")
@click.option("--plain", "plain", type=click.Path(file_okay=False), default=None,
              help="A plain export of PATH (fusedata export --layout plain): published beside it as a second "
                   "config, `plain` (the default the viewer shows) and `compact`.")
@click.option("--private", is_flag=True, help="Create the repo private (an existing repo keeps its visibility).")
@click.option("--revision", default=None, help="Branch to commit to (created if needed; default main).")
@click.option("--dry-run", is_flag=True, help="Print the files, sizes and the dataset card; upload nothing.")
@click.option("--files-per-commit", default=FILES_PER_COMMIT, show_default=True,
              help="Shards per commit (the unit of resume).")
@click.option("--commit-mb", default=BYTES_PER_COMMIT >> 20, show_default=True,
              help="At most this many MB of shards per commit.")
def publish(path, repo_id, plain, private, revision, dry_run, files_per_commit, commit_mb):
    """Publish a topk, aligned, fused or plain-exported dataset folder to the Hub with a generated dataset card.

    The token comes from HF_TOKEN or `hf auth login`; it is never printed. Rerunning after a failed
    upload continues: shards already on the Hub with the same sha256 are skipped."""
    from fusedata.publish import publish as run_publish

    result = run_publish(path, repo_id, plain=plain, private=private, revision=revision, dry_run=dry_run,
                         files_per_commit=files_per_commit, bytes_per_commit=max(commit_mb, 1) << 20,
                         log=lambda m: click.echo(m, err=not dry_run))
    if not dry_run:
        click.echo(result.url)
