"""The MLflow UI view a user opens: the experiment's training-runs table with the columns worth
comparing, as experiment tags plus a URL (MLflow's UI keeps its view state in the URL and in tags).

What the MLflow 3.x UI (3.17, read from its JS bundle) does with them:
- `?workflowType=machine_learning` in the URL picks the "Machine learning" sidebar (Runs, Models,
  …) instead of the GenAI one (Overview, Traces, …); without it the UI falls back to the last
  choice kept in the browser's local storage, GenAI by default. The experiment tag
  `mlflow.experimentKind = custom_model_development` is what earlier 3.x releases read instead.
- `#/experiments/<id>/runs` is the runs tab; `compareRunsMode=TABLE|CHART` its table or chart view.
- `?viewStateShareKey=<key>` loads the saved view kept in the experiment tag
  `mlflow.sharedViewState.<key>`: a JSON envelope `{name, createdAt, updatedAt, state}` whose
  `state` is the JSON of the search facets and the UI state (`selectedColumns`, …). The same view
  is listed under the runs tab's "Saved views" menu.
"""
from __future__ import annotations

import json
from urllib.parse import urlencode

KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
VIEW_PREFIX = "mlflow.sharedViewState."
VIEW_KEY = "minibert-compare"
VIEW_NAME = "minibert: held-out loss by recipe"
VIEW_CREATED_MS = 1_764_028_800_000  # fixed, so re-writing the tag is a no-op when nothing changed

# each held-out figure with its trivial baseline beside it (minibert.evaluation.heldout.baselines)
METRICS = ("valid_mlm_loss", "baseline_unigram_mlm_loss", "valid_mlm_accuracy", "baseline_unigram_mlm_accuracy",
           "valid_nsp_accuracy", "baseline_majority_nsp_accuracy",
           # what pretraining is for: downstream accuracy beside its controls, and BLiMP zero-shot beside its own
           "finetune_accuracy.pretrained", "finetune_accuracy.random_init", "finetune_accuracy.bag_of_words",
           "finetune_accuracy_10.pretrained", "finetune_accuracy_10.random_init",
           "blimp_accuracy.pretrained", "blimp_accuracy.untrained", "blimp_accuracy.unigram",
           "mlm_loss", "nsp_loss", "pairs_per_sec")
PARAMS = ("preset", "train.lr", "train.max_steps", "train.batch_size", "train.schedule", "model.num_layers",
          "model.hidden", "model.heads", "model.norm", "model.dropout")
TAGS = ("params_diff",)
DATASETS_COLUMN = "attributes.`Dataset`"
CHARTS = "loss"  # chart view filter: mlm_loss, nsp_loss, valid_mlm_loss, … (the loss curves)


def view_state() -> dict:
    """Search facets (newest first, active runs) and the table columns of the saved view."""
    # Column ids as the UI writes them: metrics.`valid_mlm_loss`, params.`train.lr`, tags.`params_diff`.
    # Right after the held-out figure, the run's data (its dataset inputs: tracking/lineage.py); the
    # UI's id for that column is attributes.`Dataset`, and a saved view without it hides it.
    metrics = [f"metrics.`{k}`" for k in METRICS]
    columns = (metrics[:1] + [DATASETS_COLUMN] + metrics[1:] + [f"tags.`{k}`" for k in TAGS]
               + [f"params.`{k}`" for k in PARAMS])
    return {
        "searchFilter": "", "orderByKey": "attributes.start_time", "orderByAsc": False, "startTime": "ALL",
        "lifecycleFilter": "Active", "modelVersionFilter": "All Runs", "datasetsFilter": [],
        "selectedColumns": columns, "columnOrder": columns,  # the table sorts by name without an order
        "runsHiddenMode": "SHOW_ALL",  # the chart view plots every run, not only the first 10
        "chartsSearchFilter": CHARTS,  # the chart view opens on the loss curves, not 23 charts A-Z
    }


def experiment_tags() -> dict[str, str]:
    """Tags that make the experiment open as a training experiment with the saved view."""
    envelope = {"name": VIEW_NAME, "createdAt": VIEW_CREATED_MS, "updatedAt": VIEW_CREATED_MS,
                "state": json.dumps(view_state(), separators=(",", ":"))}
    return {KIND_TAG: KIND, VIEW_PREFIX + VIEW_KEY: json.dumps(envelope, separators=(",", ":"))}


def runs_url(base: str, experiment_id: str, chart: bool = False) -> str:
    """The training-runs table (or chart view) of the experiment with the saved view applied."""
    query = {"workflowType": "machine_learning", "viewStateShareKey": VIEW_KEY}
    if chart:
        query["compareRunsMode"] = "CHART"
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?{urlencode(query)}"
