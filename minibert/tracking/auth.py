"""One clear line when a team server refuses a client (MLflow's basic auth, or a proxy in front).

MLflow's own message for a wrong password is a 300-character REST dump ending in a docs link; the
fix is always the same two environment variables (or a permission the admin grants).
"""
from __future__ import annotations

import os

_USER = "MLFLOW_TRACKING_USERNAME"


def refusal(e: BaseException, uri: str, experiment: str) -> str | None:
    """The one line for an authentication (401) or permission (403) refusal; None for anything else."""
    code = getattr(e, "error_code", None)
    text = str(e)
    user = os.environ.get(_USER)
    who = f"user {user!r}" if user else f"no user ({_USER} is not set)"
    if code == "UNAUTHENTICATED" or " 401 " in text:
        return (f"MLflow server {uri} refused the login of {who} (401: wrong or missing credentials); "
                f"set {_USER} and MLFLOW_TRACKING_PASSWORD to an account on that server "
                "(docs/team-tracking.md), or unset MLFLOW_TRACKING_URI to log into ./mlflow.db")
    if code == "PERMISSION_DENIED" or " 403 " in text:
        return (f"MLflow server {uri}: {who} may not write to experiment {experiment!r} (403); ask the "
                "server's admin for EDIT permission on it, or set tracking.experiment to one of your own")
    return None
