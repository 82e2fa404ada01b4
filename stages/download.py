"""download stage: WikiText-2 → `data/raw/wikitext-2/wiki.{train,valid,test}.tokens`.

Sources: `MINIBERT_DATA` alone when set (a local wikitext-2-v1.zip, or a folder holding the
three `.tokens` files or the three Hugging Face parquet files; no network), otherwise the
mirrors in `params.yaml` `data` in order. Every file is checked by sha256 before the output
folder appears; see `minibert.corpus` for what is verified and how.
"""
from __future__ import annotations

import os
from pathlib import Path

import typer

from minibert import layout
from minibert.config import load_config
from minibert.corpus import fetch_wikitext
from minibert.errors import stage_errors

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    params: Path = typer.Option(layout.PARAMS, help="The params file (its `data` section)."),
    out: Path = typer.Option(layout.RAW, help="Output folder (replaced whole)."),
) -> None:
    """Fetch, verify and place WikiText-2 (v1, tokenized)."""
    with stage_errors("download"):
        cfg = load_config(params)
        # An empty value counts as unset, so `MINIBERT_DATA= dvc repro` uses the mirrors.
        local = os.environ.get("MINIBERT_DATA") or None
        source = fetch_wikitext(cfg.data, out, local)
    print(f"download: {out}: wiki.{{train,valid,test}}.tokens verified (from {source})")


if __name__ == "__main__":
    app()
