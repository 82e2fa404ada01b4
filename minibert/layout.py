"""Where the stages read and write, relative to the project root: the one home of these paths.

The stage scripts' option defaults, `pretrain.Paths`, the `minibert` command and bench/ take them from
here; dvc.yaml has to spell them out itself, and tests/test_layout.py checks that it agrees.
"""
from pathlib import Path

PARAMS = Path("params.yaml")
RAW = Path("data/raw/corpus")               # download -> tokenize: wiki.{train,valid,test}.tokens
TOKENS = Path("data/tokens")                 # tokenize -> pairs: vocab.txt, {split}.safetensors
VOCAB = TOKENS / "vocab.txt"                 # -> pretrain, probe, `minibert encode`
PAIRS = Path("data/pairs")                   # pairs -> pretrain, evaluate: {split}.safetensors
TRAIN_PAIRS = PAIRS / "train.safetensors"
VALID_PAIRS = PAIRS / "valid.safetensors"
MODELS = Path("models")                      # pretrain -> evaluate, probe: bert.safetensors, bert.json
METRICS = Path("metrics")                    # every stage's metrics/<stage>.json
TRAIN_METRICS = METRICS / "train.json"       # also names the pretrain MLflow run later stages log into
EVAL_METRICS = METRICS / "eval.json"
PUBLISH_METRICS = METRICS / "publish.json"   # what publish logged (no store-specific numbers)
PROBE_METRICS = METRICS / "probe.json"
FINETUNE_METRICS = METRICS / "finetune.json"
PLOTS = Path("plots")
TRAIN_CURVE_CSV = PLOTS / "train_loss.csv"
TRAIN_CURVE_PNG = PLOTS / "train_loss.png"
VALID_CURVE_CSV = PLOTS / "valid_curve.csv"       # held-out curve during training (a DVC plot)
PROBE_HEATMAP = PLOTS / "probe_similarity.png"
FINETUNE_CURVES = PLOTS / "finetune_curves.csv"      # system, seed, labels, epoch, train/dev loss, dev_accuracy
FINETUNE_CONFUSION = PLOTS / "finetune_confusion.png"
FINETUNE_SEEDS = Path("finetune/per_seed.csv")     # system, seed, labels, accuracy, macro_f1, best epoch
FINETUNE_LABELS = PLOTS / "finetune_labels.csv"   # labels per class, system: accuracy (label efficiency)
BLIMP_METRICS = METRICS / "blimp.json"
BLIMP_TABLE = Path("blimp/paradigms.csv")          # per paradigm: pairs scored, accuracy per system
TRAIN_TOKENS = TOKENS / "train.safetensors"       # the unigram control's word counts
PROBE_TABLE = Path("probes/probe_table.parquet")  # and probe_table.csv beside it
CHECKPOINTS = Path("checkpoints")            # resumable pretrain state: outside DVC's outputs on purpose
