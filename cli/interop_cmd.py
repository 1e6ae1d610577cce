"""`fusedata export` / `fusedata import`: a dataset in a layout other tools read, and back."""

from __future__ import annotations

import click

from cli.options import config_default, config_field, verify_option
from fusedata.interop.export import ExportConfig, ImportConfig
from fusedata.interop.layouts import LAYOUTS


def _log(m: str) -> None:
    click.echo(m, err=True)


@click.command("export")
@click.argument("path", type=click.Path(file_okay=False))
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Folder of the exported dataset.")
@click.option("--layout", type=click.Choice(list(config_field(ExportConfig, "layout").metadata["choices"])),
              default=config_default(ExportConfig, "layout"), show_default=True,
              help="; ".join(f"{name}: {lay.summary}" for name, lay in LAYOUTS.items()))
@click.option("--overwrite", is_flag=True, help="Replace an output folder that holds another run.")
@click.option("--quiet", is_flag=True)
@verify_option
def export_cmd(path, output, layout, overwrite, quiet, verify):
    """Write a topk, aligned or fused dataset in a layout that needs no fusedata to read."""
    from fusedata.interop.export import ExportJob, run_export

    run_export(ExportJob(path, output, ExportConfig(layout=layout), overwrite=overwrite, quiet=quiet,
                         verify=verify, log=_log))


@click.command("import")
@click.argument("path", type=click.Path(exists=True))
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Dataset folder to write.")
@click.option("--codec", default=config_default(ImportConfig, "codec"), show_default=True,
              help="Top-k column codec to encode into.")
@click.option("--model", default="", help="A plain dataset made elsewhere (no fusedata manifest): the model whose "
                                          "tokenizer made its token ids (spec as for extract).")
@click.option("--max-length", default=config_default(ImportConfig, "max_length"), show_default=True,
              help="A plain dataset made elsewhere: its window length (0: its longest row).")
@click.option("--overwrite", is_flag=True, help="Replace an output folder that holds another run.")
@click.option("--quiet", is_flag=True)
@verify_option
def import_cmd(path, output, codec, model, max_length, overwrite, quiet, verify):
    """Encode a plain-layout dataset back into the compact codec (to align, fuse or train it)."""
    from fusedata.interop.export import ImportJob, run_import

    config = ImportConfig(codec=codec, model=model, max_length=max_length)
    run_import(ImportJob(path, output, config, overwrite=overwrite, quiet=quiet, verify=verify, log=_log))
