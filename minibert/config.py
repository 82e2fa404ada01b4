"""Typed configuration: one frozen dataclass per `params.yaml` section.

`load_config(path)` is the only way in. Unknown keys, wrong types and out-of-range values
raise `ConfigError` naming the file, the dotted key, the bad value and what is allowed, so a
stage can print one line and exit. Components receive only their own section
(`build_model(cfg.model, ...)`), never the root.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from minibert import layout
from minibert.errors import MinibertError


class ConfigError(MinibertError):
    """A bad `params.yaml`: the message is one line naming the key and what is allowed."""


class _Invalid(Exception):
    """Raised inside `__post_init__`; the loader turns it into a `ConfigError` with the path."""

    def __init__(self, key: str, value: Any, allowed: str):
        super().__init__(key, value, allowed)
        self.key, self.value, self.allowed = key, value, allowed


def loopback(endpoint: str) -> bool:
    """True when host:port names this machine only (localhost, 127.0.0.0/8, ::1)."""
    host = endpoint.rsplit(":", 1)[0].strip("[]").lower()
    return host in ("localhost", "::1", "0:0:0:0:0:0:0:1") or host.startswith("127.")


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise _Invalid(key, value, allowed)


WIKITEXT_ZIP = "https://s3.amazonaws.com/research.metamind.io/wikitext/{}-v1.zip"  # the d2l book's mirror


@dataclass(frozen=True)
class Mirror:
    """Where one corpus can be downloaded: an archive, then a parquet copy."""
    zip_url: str = ""
    """The corpus archive (the d2l book's mirror); tried first."""
    parquet_urls: dict[str, str | tuple[str, ...]] = field(default_factory=dict)
    """Hugging Face parquet copy: per split (`train`, `valid`, `test`) one URL or a list (WikiText-103's
    train comes in two files); tried second."""

    def __post_init__(self):
        _require(not self.parquet_urls or set(self.parquet_urls) == {"train", "valid", "test"},
                 "parquet_urls", sorted(self.parquet_urls), "exactly the keys train, valid, test")


@dataclass(frozen=True)
class DataConfig:
    corpus: Literal["wikitext-2", "wikitext-103", "text"] = "wikitext-2"
    """`wikitext-2` (the book), `wikitext-103` (its own mirrors and pinned SHA-1s) or `text`: the
    user's own `.txt` files named by `text_glob` (one paragraph per line; see minibert/data/text.py)."""
    text_glob: str = ""
    """For `corpus: text`: a folder (every `*.txt` below it) or a glob of `.txt` files."""
    mirrors: dict[str, Mirror] = field(default_factory=lambda: {
        "wikitext-2": Mirror(WIKITEXT_ZIP.format("wikitext-2")), "wikitext-103": Mirror(WIKITEXT_ZIP.format("wikitext-103"))})
    """The mirrors of each downloadable corpus, keyed by its `corpus` name."""
    timeout_s: float = 30.0
    """Seconds before an HTTP connection or read gives up."""
    retries: int = 2
    """Extra attempts per URL after the first fails."""
    workers: int = 0
    """Processes of the tokenize and pairs stages (0: every usable core); never changes their bytes."""

    def __post_init__(self):
        _require(self.corpus != "text" or bool(self.text_glob.strip()), "text_glob", self.text_glob,
                 "a folder or glob of .txt files (corpus: text needs one)")
        _require(self.timeout_s > 0, "timeout_s", self.timeout_s, "a number > 0")
        _require(0 <= self.retries <= 10, "retries", self.retries, "an integer in [0, 10]")
        _require(self.workers >= 0, "workers", self.workers, "an integer >= 0 (0: every usable core)")


@dataclass(frozen=True)
class VocabConfig:
    min_freq: int = 5
    """Keep train tokens seen at least this often (the book: 5 → 20256 entries)."""

    def __post_init__(self):
        _require(self.min_freq >= 1, "min_freq", self.min_freq, "an integer >= 1")


@dataclass(frozen=True)
class PairsConfig:
    max_len: int = 64
    """Longest `<cls> a <sep> b <sep>` sequence; longer pairs are dropped."""
    mask_rate: float = 0.15
    """Share of a sequence's tokens chosen for MLM prediction (at least one)."""
    seed: int = 0
    """Seeds the train split's paragraph shuffle, NSP choices and masks."""
    heldout_seed: int = 12345
    """Seeds valid/test pairs, kept apart from `seed` so held-out figures compare across runs."""
    shard_tokens: int = 4_000_000
    """Tokens per pairs shard: the paragraph shuffle and NSP negatives are drawn within a shard, and a
    worker holds one shard (~100 MB per million tokens). WikiText-2's train split (1.9M) is one shard."""

    def __post_init__(self):
        _require(self.max_len >= 5, "max_len", self.max_len, "an integer >= 5 (<cls> a <sep> b <sep>)")
        _require(0.0 < self.mask_rate < 1.0, "mask_rate", self.mask_rate, "a number in (0, 1)")
        _require(self.seed >= 0, "seed", self.seed, "an integer >= 0")
        _require(self.heldout_seed >= 0, "heldout_seed", self.heldout_seed, "an integer >= 0")
        _require(self.shard_tokens >= 1000, "shard_tokens", self.shard_tokens, "an integer >= 1000")

    @property
    def max_preds(self) -> int:
        """Width of the prediction-slot arrays: round(mask_rate * max_len)."""
        return max(1, round(self.mask_rate * self.max_len))


@dataclass(frozen=True)
class ModelConfig:
    num_layers: int = 2
    """Encoder blocks."""
    hidden: int = 128
    """Width of embeddings and every block."""
    heads: int = 2
    """Attention heads; must divide `hidden`."""
    ffn_hidden: int = 256
    """Inner width of the position-wise feed-forward net."""
    dropout: float = 0.2
    """Dropout on attention weights and each residual branch."""
    max_len: int = 64
    """Rows of the learned positional embedding; must be >= pairs.max_len."""
    norm: Literal["post", "pre"] = "post"
    """`post`: the book's Add & Norm after each sublayer; `pre`: LayerNorm before (faster recipe)."""
    tie_decoder: bool = False
    """MLM decoder reuses the token embedding (V, H) as its weight, its input scaled by hidden**-0.5 so
    the initial logits have unit scale (T5's rule): V x H fewer parameters to learn. The book: its own Linear."""
    decoder_bias: bool = True
    """A (V,) bias on the MLM decoder (the book); false drops it (Cramming's cheaper head)."""

    def __post_init__(self):
        _require(self.num_layers >= 1, "num_layers", self.num_layers, "an integer >= 1")
        _require(self.hidden >= 1, "hidden", self.hidden, "an integer >= 1")
        _require(self.heads >= 1 and self.hidden % self.heads == 0, "heads", self.heads,
                 f"a positive divisor of hidden ({self.hidden})")
        _require(self.ffn_hidden >= 1, "ffn_hidden", self.ffn_hidden, "an integer >= 1")
        _require(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "a number in [0, 1)")
        _require(self.max_len >= 5, "max_len", self.max_len, "an integer >= 5")


# Field metadata of a train setting that cannot change what a run computes, only how it runs (logging,
# checkpoint cadence, process layout, thread count, compilation: the last two may move the last bits, as
# another machine would). A checkpoint fingerprint leaves these out, so a run resumes across a change of
# them; every other field, including one added later without this mark, is fingerprinted.
NOT_NUMERIC = {"numeric": False}


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 1e-3
    """Peak learning rate (the book: 1e-3, constant)."""
    schedule: Literal["constant", "linear"] = "constant"
    """`constant` (the book) or linear warmup then linear decay to 0 at `max_steps`: the schedule follows
    the budget, so a run of more steps stretches the same shape."""
    warmup_steps: int = 0
    """Warmup steps of the `linear` schedule."""
    warmup_share: float = 0.0
    """Warmup as a share of `max_steps` (rounded; used instead of `warmup_steps` when > 0), so the
    warmup scales with the budget."""
    optimizer: Literal["adam", "adamw"] = "adam"
    """`adam` (the book: no weight decay) or `adamw` (decoupled `weight_decay` on weight matrices and
    embeddings only; biases and LayerNorm parameters are never decayed)."""
    beta2: float = 0.999
    """Adam's second-moment decay (the book: torch's 0.999; 0.98 is BERT-at-a-budget's)."""
    weight_decay: float = 0.0
    """Decoupled weight decay of `adamw` (0.01 in RoBERTa/Cramming)."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this before each update (0: off, the book)."""
    masking: Literal["static", "dynamic"] = "static"
    """`static`: the pairs stage's masks, the same every epoch (the book). `dynamic`: every step redraws
    its batch's masks from (seed, step) at `mask_rate` by the same 80/10/10 rule (RoBERTa); the pairs
    files are untouched and held-out scoring keeps their static 15 % masks."""
    mask_rate: float = 0.15
    """Training mask rate of `dynamic` masking; `static` masking must match `pairs.mask_rate`."""
    budget_minutes: float = field(default=0.0, metadata=NOT_NUMERIC)
    """What `max_steps` was sized for (`minibert budget --minutes N` prints both): recorded in the run's
    name and description only; 0: no budget stated. Steps, not minutes, drive the run (reproducible)."""
    batch_size: int = 512
    """Global batch: split across all ranks under DDP."""
    micro_batches: int | Literal["auto"] = "auto"
    """Passes each process's batch is split into, gradients summed: the same gradient with 1/k of the
    activation memory. `auto`: 1 in bf16 on CPU (one pass is 20-45 % faster and peaks *lower*: each
    pass's width is a new bf16 GEMM shape that oneDNN caches), 4 for fp32 on CPU (~2 % slower than 1,
    ~450 MB lower peak), 1 on a GPU (which has the memory, and each pass costs launches)."""
    max_steps: int = 50
    """Optimizer steps (the book: 50)."""
    seed: int = 0
    """Seeds initialisation, dropout and the shuffled order."""
    device: str = "auto"
    """`auto` (cuda when available, else cpu), `cpu`, `cuda` or `cuda:N`."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "fp32"
    """Autocast dtype; losses stay fp32. `auto`: bf16 where the hardware runs it fast."""
    log_every: int = field(default=1, metadata=NOT_NUMERIC)
    """Steps between loss syncs to the host (and MLflow points)."""
    checkpoint_every: int = field(default=25, metadata=NOT_NUMERIC)
    """Steps between resumable checkpoints (0: only on SIGTERM/SIGINT)."""
    devices: int | Literal["auto"] = field(default=1, metadata=NOT_NUMERIC)  # the world size is fingerprinted
    """Processes per node: a number, or `auto` (one per visible GPU, else 1)."""
    nodes: int = field(default=1, metadata=NOT_NUMERIC)
    """Machines taking part; > 1 needs a rendezvous endpoint every node can reach."""
    rdzv_endpoint: str = field(default="localhost:29500", metadata=NOT_NUMERIC)
    """host:port of the c10d rendezvous used when the stage launches itself."""
    rdzv_id: str = field(default="minibert", metadata=NOT_NUMERIC)
    """Job id shared by every node of one run."""
    max_restarts: int = field(default=0, metadata=NOT_NUMERIC)
    """torchrun's --max-restarts when the stage launches itself: times a failed rank's group is restarted,
    each restart resuming from the last checkpoint (`checkpoint_every`)."""
    threads: int | Literal["auto"] = field(default=0, metadata=NOT_NUMERIC)
    """torch intra-op threads: a number, 0 (torch's default: one per core), or `auto` (this process's
    cores divided by the minibert trainings running on the machine, re-checked while training: set it for
    `dvc queue start -j N`). Beside other busy processes keep the default: two threads that wait briefly
    (minibert's `GOMP_SPINCOUNT`) made more progress than one (docs/performance.md, "Sharing the machine")."""
    compile: bool = field(default=False, metadata=NOT_NUMERIC)
    """Wrap the model in torch.compile (pays off on long runs only)."""
    eval_every: int = field(default=10, metadata=NOT_NUMERIC)  # evaluation never moves the training numbers
    """Steps between held-out evaluations during training, plus always the last step (0: none); each scores
    the fixed `eval.subset_pairs` valid pairs and logs `valid_*` per step (5 points on the book's 50 steps)."""

    def __post_init__(self):
        _require(self.lr > 0, "lr", self.lr, "a number > 0")
        _require(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "an integer >= 0")
        _require(0.0 <= self.warmup_share < 1.0, "warmup_share", self.warmup_share, "a number in [0, 1)")
        _require(not (self.warmup_share and self.warmup_steps), "warmup_share", self.warmup_share,
                 f"0 when warmup_steps is set ({self.warmup_steps}); give one of the two")
        _require(0.0 < self.beta2 < 1.0, "beta2", self.beta2, "a number in (0, 1)")
        _require(self.weight_decay >= 0.0, "weight_decay", self.weight_decay, "a number >= 0")
        _require(self.optimizer == "adamw" or self.weight_decay == 0.0, "weight_decay", self.weight_decay,
                 "0 with optimizer adam (decoupled decay needs optimizer: adamw)")
        _require(self.grad_clip >= 0.0, "grad_clip", self.grad_clip, "a number >= 0 (0: no clipping)")
        _require(0.0 < self.mask_rate < 1.0, "mask_rate", self.mask_rate, "a number in (0, 1)")
        _require(self.budget_minutes >= 0.0, "budget_minutes", self.budget_minutes, "a number >= 0 (0: none)")
        _require(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        _require(self.micro_batches == "auto" or self.micro_batches >= 1, "micro_batches", self.micro_batches,
                 "auto or an integer >= 1")
        _require(self.max_steps >= 1, "max_steps", self.max_steps, "an integer >= 1")
        _require(self.seed >= 0, "seed", self.seed, "an integer >= 0")
        _require(self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda"),
                 "device", self.device, "auto, cpu, cuda or cuda:N")
        _require(self.log_every >= 1, "log_every", self.log_every, "an integer >= 1")
        _require(self.checkpoint_every >= 0, "checkpoint_every", self.checkpoint_every, "an integer >= 0")
        _require(self.devices == "auto" or self.devices >= 1, "devices", self.devices, "auto or an integer >= 1")
        _require(self.nodes >= 1, "nodes", self.nodes, "an integer >= 1")
        _require(":" in self.rdzv_endpoint, "rdzv_endpoint", self.rdzv_endpoint, "host:port")
        _require(not (self.device.startswith("cuda:") and self.devices != 1 and self.devices != "auto"), "device",
                 self.device, f"cuda or auto with train.devices = {self.devices} (each process takes the GPU of its "
                 "local rank; cuda:N would put every process on GPU N)")
        _require(self.nodes == 1 or not loopback(self.rdzv_endpoint), "rdzv_endpoint", self.rdzv_endpoint,
                 f"a host:port every node can reach with train.nodes = {self.nodes} (a loopback address "
                 "makes each node wait at its own rendezvous)")
        _require(self.max_restarts >= 0, "max_restarts", self.max_restarts, "an integer >= 0")
        _require(self.threads == "auto" or self.threads >= 0, "threads", self.threads, "auto or an integer >= 0")
        _require(self.eval_every >= 0, "eval_every", self.eval_every, "an integer >= 0 (0: no held-out curve)")

    @property
    def warmup(self) -> int:
        """Warmup steps in effect: `warmup_share` of `max_steps` (half rounded up) when set, else `warmup_steps`."""
        return int(self.warmup_share * self.max_steps + 0.5) if self.warmup_share else self.warmup_steps


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = 1024
    """Pairs per forward pass when scoring the valid split."""
    subset_pairs: int = 512
    """Valid pairs scored during training (`train.eval_every`): evenly spaced rows of the valid split, the
    same for every run; the evaluate stage always scores all of them."""
    device: str = "cpu"
    """Where the evaluate and probe stages run the model: `cpu` (the figures are the same wherever it was
    trained), `cuda`, `cuda:N` or `auto` (a GPU when one is visible). The held-out curve during training
    runs where training does."""

    def __post_init__(self):
        _require(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        _require(self.subset_pairs >= 1, "subset_pairs", self.subset_pairs, "an integer >= 1")
        _require(self.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", self.device) is not None,
                 "device", self.device, "auto, cpu, cuda or cuda:N")


@dataclass(frozen=True)
class ProbeSpec:
    name: str
    """Row label in the probe table."""
    a: str
    """First sentence (whitespace-tokenised, lower-cased)."""
    b: str | None = None
    """Optional second sentence: the input becomes a pair."""
    word: str | None = None
    """A word whose contextual vector is reported (its first position)."""

    def __post_init__(self):
        _require(bool(self.name.strip()), "name", self.name, "a non-empty string")
        _require(bool(self.a.split()), "a", self.a, "a sentence with at least one word")
        words = self.a.lower().split() + (self.b.lower().split() if self.b else [])
        _require(self.word is None or self.word.lower() in words, "word", self.word,
                 f"one of the probe's words {words}")


@dataclass(frozen=True)
class ProbeConfig:
    sentences: tuple[ProbeSpec, ...] = ()
    """Inputs encoded after pretraining (the book's: `a crane is flying`; `a crane driver came` / `he just left`)."""
    word_similarity: tuple[Literal["simlex999", "wordsim353"], ...] = ("simlex999", "wordsim353")
    """Human similarity judgements the word vectors are scored against (Spearman); empty: none."""

    def __post_init__(self):
        _require(len(self.sentences) >= 1, "sentences", len(self.sentences), "at least one probe")
        names = [p.name for p in self.sentences]
        _require(len(set(names)) == len(names), "sentences", names, "unique probe names")


@dataclass(frozen=True)
class FinetuneConfig:
    task: Literal["bbc", "polarity", "snli", "file"] = "bbc"
    """`bbc` (BBC News, 5 topics), `polarity` (Pang & Lee sentences), `snli` (the book's next chapter:
    sentence pairs, 3 classes), or `file` (your own `train_file`). Data: `MINIBERT_TASK_DATA` or the
    pinned public source (minibert/data/pinned.py)."""
    train_file: str = ""
    """task `file`: a .tsv/.csv (header) or .jsonl with text, label and optionally text_b."""
    test_file: str = ""
    """task `file`: the held-out examples; empty: `test_share` of train_file is held out."""
    test_share: float = 0.2
    """Share held out when the task has no test split (bbc, polarity, a file without test_file)."""
    split_seed: int = 0
    """Seed of that split and of the `max_train`/`max_test` samples."""
    max_train: int = 0
    """At most this many training examples (0 = all; SNLI's 550k pairs take hours on a CPU)."""
    max_test: int = 0
    """At most this many test examples (0 = all)."""
    max_len: int = 64
    """Tokens per input including <cls>/<sep>; at most the pretrained model.max_len."""
    dev_share: float = 0.1
    """Share of each class of the training split held out as the dev split that early stopping reads
    (the test split is scored once, after training)."""
    epochs: int = 20
    """At most this many epochs; the rate decays linearly to 0 at the end of the last."""
    patience: int = 3
    """Stop after this many epochs without a better dev accuracy; the best epoch's weights are restored."""
    warmup_share: float = 0.1
    """Share of all steps of `epochs` spent warming the rate up linearly from 0."""
    min_epoch_examples: int = 320
    """A training set smaller than this is cycled (reshuffled each pass) to fill one epoch."""
    lr: float = 3e-4
    """Adam's peak rate for the BERT classifiers (pretrained and random-init alike)."""
    embedding_lr_scale: float = 1.0
    """The BERT classifiers' token, position and segment embeddings learn at `lr` × this: they start at
    N(0, 1) where the matrices are ~0.1, and Adam moves every weight by about the rate a step."""
    bow_lr: float = 0.05
    """Adam's peak rate for the bag-of-words control (a convex problem that takes a larger step)."""
    batch_size: int = 32
    pooling: Literal["cls", "mean", "both"] = "cls"
    """What the classifier reads: `cls` (the book: the <cls> vector through the NSP hidden layer), `mean`
    (the mean over real tokens through it) or `both` side by side."""
    clitics: bool = True
    """Split clitics off as WikiText does ("don't" → "do n't", "john's" → "john 's")."""
    label_counts: tuple[int, ...] = (0,)
    """Labelled examples per class for the label-efficiency curve: seeded class-stratified subsets of the
    training split (0 = all of it)."""
    adapt_steps: int = 0
    """Task-adaptive MLM steps on the training split's texts before fine-tuning the pretrained column
    (0 = off)."""
    adapt_lr: float = 1e-3
    """Peak rate of that adaptive MLM (linear warmup and decay over `adapt_steps`)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """One fine-tuning per seed, system and label count: the figures are mean ± std over them."""
    freeze: bool = False
    """True: the encoder stays as pretrained; only the <cls> hidden and output layers learn."""
    device: str = "cpu"
    """Where fine-tuning runs: cpu, cuda, cuda:N or auto."""

    def __post_init__(self):
        _require(self.task != "file" or bool(self.train_file.strip()), "train_file", self.train_file,
                 "a path to your labelled file when task is file")
        _require(0 < self.test_share < 1, "test_share", self.test_share, "a number between 0 and 1")
        for key in ("max_train", "max_test"):
            _require(getattr(self, key) >= 0, key, getattr(self, key), "an integer >= 0 (0 = all)")
        _require(self.max_len >= 3, "max_len", self.max_len, "an integer >= 3 (<cls>, a word, <sep>)")
        for key in ("epochs", "batch_size", "patience"):
            _require(getattr(self, key) >= 1, key, getattr(self, key), "an integer >= 1")
        _require(0 < self.dev_share < 1, "dev_share", self.dev_share, "a number between 0 and 1")
        _require(0 <= self.warmup_share < 1, "warmup_share", self.warmup_share, "a number in [0, 1)")
        for key in ("min_epoch_examples", "adapt_steps"):
            _require(getattr(self, key) >= 0, key, getattr(self, key), "an integer >= 0")
        _require(len(self.label_counts) >= 1 and all(n >= 0 for n in self.label_counts)
                 and len(set(self.label_counts)) == len(self.label_counts), "label_counts", self.label_counts,
                 "a list of distinct integers >= 0 (labelled examples per class; 0 = all)")
        for key in ("lr", "bow_lr", "adapt_lr", "embedding_lr_scale"):
            _require(getattr(self, key) > 0, key, getattr(self, key), "a number > 0")
        _require(len(self.seeds) >= 1 and len(set(self.seeds)) == len(self.seeds), "seeds", self.seeds,
                 "a list of distinct integers")
        _require(self.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", self.device) is not None,
                 "device", self.device, "auto, cpu, cuda or cuda:N")


@dataclass(frozen=True)
class BlimpConfig:
    enabled: bool = True
    """Score BLiMP's minimal pairs zero-shot by pseudo-log-likelihood (false: the stage writes no scores)."""
    max_pairs: int = 0
    """At most this many pairs of each of the 67 paradigms, in file order (0 = all 1,000)."""
    batch_size: int = 512
    """Masked copies of sentences per forward pass."""

    def __post_init__(self):
        _require(self.max_pairs >= 0, "max_pairs", self.max_pairs, "an integer >= 0 (0 = all)")
        _require(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")


@dataclass(frozen=True)
class TrackingConfig:
    experiment: str = "minibert"
    """MLflow experiment holding the runs."""
    enabled: bool = True
    """False: a do-nothing tracker (no MLflow at all)."""
    registered_model: str = "minibert-encoder"
    """Model Registry name the pretrain stage registers its text model under (a new version per run);
    the evaluate stage points its `champion` alias at the best held-out version. Empty: no registration."""
    system_metrics_every_s: float = 5.0
    """Seconds between `system/*` samples (CPU %, RSS, GPU) logged to the run; 0 = off."""

    def __post_init__(self):
        _require(bool(self.experiment.strip()), "experiment", self.experiment, "a non-empty string")
        _require(self.system_metrics_every_s == 0 or 0.1 <= self.system_metrics_every_s <= 3600,
                 "system_metrics_every_s", self.system_metrics_every_s,
                 "0 (off) or seconds between samples, 0.1 to 3600")
        _require(self.registered_model == "" or re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", self.registered_model)
                 is not None, "registered_model", self.registered_model,
                 "empty (no registration) or a name of letters, digits, '_', '.', '-'")


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    vocab: VocabConfig = field(default_factory=VocabConfig)
    pairs: PairsConfig = field(default_factory=PairsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    probe: ProbeConfig = field(default_factory=lambda: ProbeConfig(sentences=(
        ProbeSpec("crane_flying", "a crane is flying", word="crane"),
        ProbeSpec("crane_driver", "a crane driver came", "he just left", word="crane"))))
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    blimp: BlimpConfig = field(default_factory=BlimpConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    preset: str = "book"
    """Recipe applied on top of the sections: `book` (none) or a name under `presets:`."""

    def __post_init__(self):
        _require(self.model.max_len >= self.pairs.max_len, "model.max_len", self.model.max_len,
                 f"an integer >= pairs.max_len ({self.pairs.max_len})")
        _require(self.train.masking == "dynamic" or self.train.mask_rate == self.pairs.mask_rate,
                 "train.mask_rate", self.train.mask_rate,
                 f"pairs.mask_rate ({self.pairs.mask_rate}) with static masks (the pairs stage drew them); "
                 "set train.masking: dynamic to train at another rate")


# ---------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false",
            type(None): "null"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (list → tuple, dict → dataclass)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        _require(value in args, key, value, f"one of {', '.join(map(repr, args))}")
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return _coerce(value, arg, key)
            except _Invalid:
                continue
        raise _Invalid(key, value, _type_name(tp))
    if dataclasses.is_dataclass(tp):
        _require(isinstance(value, dict), key, value, f"a mapping of {tp.__name__} fields")
        return _build(tp, value, key)
    if origin is tuple:
        _require(isinstance(value, list), key, value, "a list")
        return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if origin is dict:
        _require(isinstance(value, dict), key, value, "a mapping")
        return {str(k): _coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        _require(isinstance(value, (int, float)) and not isinstance(value, bool), key, value, "a number")
        return float(value)
    if tp is int:
        _require(isinstance(value, int) and not isinstance(value, bool), key, value, "an integer")
        return value
    if tp is type(None):
        _require(value is None, key, value, "null")
        return None
    _require(isinstance(value, tp), key, value, _type_name(tp))
    return value


def _build(cls: type, raw: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for k in raw:
        _require(k in known, f"{prefix}.{k}".lstrip("."), raw[k],
                 f"a known key ({prefix or 'the top level'} takes {', '.join(sorted(known))})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}".lstrip(".")) for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except _Invalid as e:
        key = e.key if "." in e.key and not prefix else f"{prefix}.{e.key}".lstrip(".")
        raise _Invalid(key, e.value, e.allowed) from None
    except TypeError as e:  # a required field is missing
        raise _Invalid(prefix or cls.__name__, raw, str(e)) from None


def apply_preset(raw: dict) -> dict:
    """Merge `presets[preset]` (section -> {key: value}) over the sections; drop `presets`.

    Presets are named recipes kept beside the book's defaults, chosen with one key:
    `dvc exp run -S preset=fast`. `book` means the sections as written."""
    raw = dict(raw)
    presets, name = raw.pop("presets", None) or {}, raw.get("preset", "book")
    _require(isinstance(presets, dict), "presets", presets, "a mapping of preset name -> section overrides")
    _require(name == "book" or name in presets, "preset", name, f"one of {['book', *sorted(presets)]}")
    for section, values in (presets.get(name) or {}).items() if name != "book" else ():
        _require(isinstance(values, dict) and isinstance(raw.get(section, {}), dict), f"presets.{name}.{section}",
                 values, "a mapping of keys of that section")
        raw[section] = {**raw.get(section, {}), **values}
    return raw


def config_from_dict(raw: dict, source: str = "params") -> Config:
    """Build and validate a `Config` from parsed YAML; `source` names the file in errors."""
    try:
        _require(isinstance(raw, dict), "(top level)", type(raw).__name__, "a mapping of sections")
        return _build(Config, apply_preset(raw), "")
    except _Invalid as e:
        via = f" (with preset {raw['preset']!r})" if raw.get("preset", "book") != "book" else ""
        raise ConfigError(f"{source}: {e.key} = {e.value!r} is invalid{via}: expected {e.allowed}") from None


def load_config(path: str | Path = layout.PARAMS) -> Config:
    """Read `params.yaml`; missing sections take their defaults, anything unknown is an error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such params file; pass --params PATH to an existing params.yaml")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]}); fix the file's syntax") from None
    return config_from_dict(raw, str(path))


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """`{'model.num_layers': 2, ...}`: every leaf of a config, for MLflow params."""
    out: dict[str, Any] = {}
    items = dataclasses.asdict(cfg).items() if dataclasses.is_dataclass(cfg) else cfg.items()
    for k, v in items:
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        elif isinstance(v, (list, tuple)):
            for i, item in enumerate(v):
                out.update(flatten(item, f"{key}.{i}.") if isinstance(item, dict) else {f"{key}.{i}": item})
        else:
            out[key] = v
    return out
