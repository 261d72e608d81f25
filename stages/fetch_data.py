"""``ferd fetch-data``: the dataset as the pipeline's first DVC output (params: data).

Writes ``<data.root>/<data.name>`` (``data/raw/fashion-mnist`` by default) from the folder or
archive ``data.source`` names, the usual places (Debian's Fashion-MNIST) or a download
(``data.download: true``), checksums verified; see :func:`ferd.data.fetch_dataset`. Every stage
that reads the dataset depends on this output, which is what lets ``dvc exp run --queue`` run
experiments in temporary copies of the repository and ``dvc push`` share the data.
"""

from __future__ import annotations

import typer

from stages._ui import RichProgress, console, handles_errors, load_stage_params, print_config, timed

SECTIONS = ("data",)


@handles_errors
def command(ctx: typer.Context) -> None:
    """Copy, verify or download the dataset into data/raw/<data.name>, the DVC output every stage reads."""
    from ferd.data import fetch_dataset

    params = load_stage_params(ctx, SECTIONS)
    print_config("fetch-data", params, SECTIONS)
    with timed("fetch-data"), RichProgress() as progress:
        result = fetch_dataset(params.data, progress=progress)
    console.print(f"{result.dataset}: {result.files} files, {result.bytes / 1e6:.1f} MB from {result.source}; "
                  f"checksums: {result.checked}")
    console.print(f"wrote {result.path}")
