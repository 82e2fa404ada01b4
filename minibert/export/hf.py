"""`minibert export hf OUT`: a pretrained model as a folder Hugging Face `transformers` loads.

The folder holds `config.json` (with `auto_map` pointing at the shipped `modeling_minibert.py`),
`model.safetensors` (encoder + MLM + NSP heads), the tokenizer (`tokenizer.json` and its config)
and a model card (`README.md`). The tokenizer is a `tokenizers` WordLevel model over minibert's
vocabulary with the book's rule: lower-case, split on whitespace; unknown words become `<unk>`;
a pair is `<cls> a <sep> b <sep>` with segment 0 up to and including the first `<sep>`, 1 after.

minibert's config is never a stock `BertModel`: BERT always normalises the embeddings and the book
does not, so the model code ships with the weights (`trust_remote_code=True`).
"""
from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from minibert.artifacts import atomic_dir
from minibert.data.vocab import CLS, MASK, PAD, SEP, SPECIALS, UNK, Vocab
from minibert.errors import MinibertError

MODELING_FILE = Path(__file__).with_name("modeling_minibert.py")
HEADS = ("mlm.", "nsp_hidden.", "nsp.")  # minibert parameter prefixes outside the encoder
AUTO_MAP = {
    "AutoConfig": "modeling_minibert.MinibertConfig",
    "AutoModel": "modeling_minibert.MinibertModel",
    "AutoModelForMaskedLM": "modeling_minibert.MinibertForMaskedLM",
    "AutoModelForPreTraining": "modeling_minibert.MinibertForPreTraining",
}


def _transformers():
    try:
        import tokenizers  # noqa: F401
        import transformers
    except ImportError:
        raise MinibertError("export hf needs transformers and tokenizers: pip install -e '.[hf]'") from None
    return transformers


def hf_state_dict(bert: torch.nn.Module) -> dict[str, torch.Tensor]:
    """minibert's weights under the shipped model's names: the encoder moves under `minibert.`."""
    state = {(k if k.startswith(HEADS) else f"minibert.{k}"): v.detach().cpu().contiguous()
             for k, v in bert.state_dict().items()}
    # A tied or bias-free decoder (model.tie_decoder / decoder_bias) ships as the plain Linear the shipped
    # code has: the embedding with the tied input scale folded in, a zero bias: the same logits.
    decoder = bert.mlm[-1]
    last = f"mlm.{len(bert.mlm) - 1}"
    scale = getattr(decoder, "scale", 1.0)
    state.setdefault(f"{last}.weight", (decoder.weight.detach() * scale).cpu().contiguous())
    state.setdefault(f"{last}.bias", torch.zeros(decoder.weight.shape[0], dtype=decoder.weight.dtype))
    return state


def hf_config(cfg, vocab_size: int):
    """The shipped `MinibertConfig` for minibert's `ModelConfig` (field names as BERT's config has them)."""
    _transformers()
    from minibert.export.modeling_minibert import MinibertConfig

    config = MinibertConfig(vocab_size=vocab_size, hidden_size=cfg.hidden, num_hidden_layers=cfg.num_layers,
                            num_attention_heads=cfg.heads, intermediate_size=cfg.ffn_hidden,
                            max_position_embeddings=cfg.max_len, dropout=cfg.dropout, norm=cfg.norm,
                            pad_token_id=PAD, architectures=["MinibertForPreTraining"])
    config.auto_map = dict(AUTO_MAP)
    return config


def build_tokenizer(vocab: Vocab, max_len: int):
    """A `PreTrainedTokenizerFast` that splits and numbers text exactly as `minibert.evaluation.probes` does."""
    transformers = _transformers()
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel

    tok = Tokenizer(WordLevel({t: i for i, t in enumerate(vocab.tokens)}, unk_token=SPECIALS[UNK]))
    tok.normalizer = normalizers.Lowercase()  # the book: str.lower(), then str.split()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    cls, sep = SPECIALS[CLS], SPECIALS[SEP]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",  # ':1' = segment (token_type) 1
        special_tokens=[(cls, CLS), (sep, SEP)])
    tok.add_special_tokens(list(SPECIALS))  # matched before lower-casing: `<mask>` in text is the mask
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, model_max_length=max_len, padding_side="right",
        pad_token=SPECIALS[PAD], unk_token=SPECIALS[UNK], mask_token=SPECIALS[MASK],
        cls_token=cls, sep_token=sep, model_input_names=["input_ids", "token_type_ids", "attention_mask"])


def _fmt(v) -> str:
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() else f"{v:.4f}"  # MLflow stores counts as floats too
    return str(v)


def model_card(meta: dict, eval_metrics: dict | None, n_params: int) -> str:
    """README.md of the folder: what the model is, what it was trained on, how well it does, how to load it."""
    m = meta["model"]
    lines = [
        "---", "library_name: transformers", "pipeline_tag: fill-mask", "tags: [minibert, bert, d2l]", "---", "",
        "# minibert: the d2l.ai \"Pretraining BERT\" model", "",
        f"A {m['num_layers']}-layer BERT ({m['norm']}-LN blocks, hidden {m['hidden']}, {m['heads']} heads, "
        f"FFN {m['ffn_hidden']}, dropout {m['dropout']}, max_len {m['max_len']}; {n_params:,} parameters) "
        f"pretrained with masked language modelling and next sentence prediction for {meta.get('step', '?')} "
        "steps on WikiText-2 (train split, the book's sentence pairs and 15 % masks) by "
        "[minibert](https://d2l.ai/chapter_natural-language-processing-pretraining/bert-pretraining.html).", "",
        "| param | value |", "|---|---|",
        *(f"| model.{k} | {v} |" for k, v in m.items()),
        f"| vocab_size | {meta['vocab_size']} |",
        f"| vocab_sha256 | `{meta.get('vocab_sha256', '?')}` |",
        f"| train_pairs_sha256 | `{meta.get('train_pairs_sha256', '?')}` |",
        f"| mlflow_run_id | `{meta.get('mlflow_run_id') or '-'}` |", "",
    ]
    if eval_metrics:
        ours = {k: v for k, v in eval_metrics.items() if not k.startswith("baseline_")}
        base = {k: v for k, v in eval_metrics.items() if k.startswith("baseline_")}
        lines += ["## Held-out figures (WikiText-2 valid pairs, fixed masks)", "",
                  "| metric | this model |", "|---|---|", *(f"| {k} | {_fmt(v)} |" for k, v in ours.items()), ""]
        if base:
            lines += ["Baselines on the same pairs (no pretraining; see minibert's README):", "",
                      "| baseline | value |", "|---|---|", *(f"| {k} | {_fmt(v)} |" for k, v in base.items()), ""]
    lines += [
        "## Load it", "",
        "```python",
        "from transformers import AutoTokenizer, AutoModel, pipeline",
        "tok = AutoTokenizer.from_pretrained(PATH, trust_remote_code=True)  # plain tokenizers JSON; the flag only skips a prompt",
        "enc = AutoModel.from_pretrained(PATH, trust_remote_code=True)(**tok(\"a crane is flying\", return_tensors=\"pt\")).last_hidden_state",
        "pipeline(\"fill-mask\", model=PATH, trust_remote_code=True)(\"the <mask> is flying\")",
        "```", "",
        "`AutoModelForMaskedLM` adds the MLM head; `AutoModelForPreTraining` both heads (`prediction_logits`, "
        "`seq_relationship_logits`: index 1 = the second sentence follows the first). Pairs: "
        "`tok(a, b)` gives `<cls> a <sep> b <sep>` with `token_type_ids` 0 then 1, as in pretraining.", "",
        "## Why custom code and not `BertModel`", "",
        "The book's encoder adds token, segment and position embeddings and feeds the sum to the first block "
        "with no LayerNorm; `BertModel` always normalises its embeddings, so no `BertConfig` reproduces this model. "
        "The heads would fit BERT's (ReLU MLM transform, Tanh pooler), the embeddings do not. "
        "`modeling_minibert.py` (about 150 lines, torch + transformers only) is the model; "
        "`trust_remote_code=True` runs it from this folder.", "",
        "Outputs at padded positions are computed (and meaningless); minibert itself returns zeros there.", "",
    ]
    return "\n".join(lines)


def export_hf(bert: torch.nn.Module, vocab: Vocab, meta: dict, out: Path, eval_metrics: dict | None = None) -> Path:
    """Write the folder `out` (replaced whole, atomically) and return it."""
    if len(vocab) != bert.vocab_size:
        raise MinibertError(f"vocabulary has {len(vocab)} entries, the model {bert.vocab_size}; "
                            "pass the vocab.txt the model was trained with")
    config = hf_config(bert.cfg, bert.vocab_size)
    tokenizer = build_tokenizer(vocab, bert.cfg.max_len)
    state = hf_state_dict(bert)
    with atomic_dir(Path(out)) as tmp:
        config.save_pretrained(tmp)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save_pretrained(tmp)
        shutil.copyfile(MODELING_FILE, tmp / MODELING_FILE.name)
        n_params = sum(v.numel() for v in state.values())
        card = model_card({**meta, "model": asdict(bert.cfg), "vocab_size": bert.vocab_size}, eval_metrics, n_params)
        (tmp / "README.md").write_text(card, encoding="utf-8")
    return Path(out)
