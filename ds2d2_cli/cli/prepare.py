"""`ds2d2 prepare-data` (placeholder until the data-preparation module lands)."""

import typer

app = typer.Typer(help="Convert DOTA / DIOR / COCO / synthetic data into COCO JSON.", no_args_is_help=True)
