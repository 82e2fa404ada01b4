"""download stage: the corpus `data.corpus` names → `data/raw/corpus/wiki.{train,valid,test}.tokens`.

WikiText-2 / WikiText-103: `MINIBERT_DATA` alone when set (a local `<corpus>-v1.zip`, or a folder
holding the three `.tokens` files or the Hugging Face parquet files; no network), otherwise the
mirrors in `params.yaml` `data` in order. Every file is checked against the corpus's pinned
checksums before the output folder appears; see `minibert.data.corpus`. `text`: the user's `.txt`
files (`data.text_glob`), normalised and split by the rules in `minibert.data.text`.
"""
from __future__ import annotations

import os
from pathlib import Path

import typer

from minibert import layout
from minibert.config import load_config
from minibert.data.fetch import fetch_wikitext
from minibert.data.text import fetch_text
from minibert.errors import stage_errors

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(
    params: Path = typer.Option(layout.PARAMS, help="The params file (its `data` section)."),
    out: Path = typer.Option(layout.RAW, help="Output folder (replaced whole)."),
) -> None:
    """Fetch, verify and place the corpus."""
    with stage_errors("download"):
        cfg = load_config(params).data
        # An empty value counts as unset, so `MINIBERT_DATA= dvc repro` uses the mirrors.
        local = os.environ.get("MINIBERT_DATA") or None
        if cfg.corpus == "text":
            source = fetch_text(cfg.text_glob, out)
        else:
            source = fetch_wikitext(cfg, out, local)
    done = "normalised" if cfg.corpus == "text" else "verified"
    print(f"download: {out}: {cfg.corpus} wiki.{{train,valid,test}}.tokens {done} (from {source})")


if __name__ == "__main__":
    app()
