"""MLflow tracking: one parent run per pipeline run, one nested run per stage.

The tracking URI defaults to `sqlite:///mlflow.db` in the working directory (the repo root under
`dvc repro`) and is overridden by $MLFLOW_TRACKING_URI. A pipeline launcher (`cascade repro`, the
KFP pipeline) creates the parent run and hands its id to stages through $CASCADE_PARENT_RUN_ID.
"""

from __future__ import annotations

import logging
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

PARENT_RUN_ENV = "CASCADE_PARENT_RUN_ID"
JOB_ID_TAG = "cascade.pipeline_job_id"

# MLflow/alembic log a page of migrations on first use of a new SQLite store; keep stage output readable.
for _noisy in ("alembic", "mlflow.store.db.utils", "mlflow.tracking.fluent"):
    logging.getLogger(_noisy).setLevel(logging.WARNING)


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def _mlflow():
    import mlflow  # imported lazily: `cascade --help` should not pay for it

    mlflow.set_tracking_uri(tracking_uri())
    return mlflow


def git_commit() -> str:
    if os.environ.get("CASCADE_GIT_COMMIT"):
        return os.environ["CASCADE_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def start_pipeline_run(experiment: str, profile: str, launcher: str, tags: dict[str, str] | None = None) -> str:
    """Create the parent run of one pipeline run and return its id (left open until finish)."""
    mlflow = _mlflow()
    mlflow.set_experiment(experiment)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    run = client.create_run(
        exp.experiment_id,
        run_name=f"pipeline-{profile}",
        tags={"cascade.kind": "pipeline", "cascade.profile": profile, "cascade.launcher": launcher,
              "mlflow.source.git.commit": git_commit(), **(tags or {})},
    )
    return run.info.run_id


def find_pipeline_run(experiment: str, pipeline_job_id: str) -> str | None:
    """The parent run a KFP pipeline job opened, found by its job-id tag."""
    mlflow = _mlflow()
    exp = mlflow.MlflowClient().get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = mlflow.MlflowClient().search_runs(
        [exp.experiment_id], filter_string=f"tags.`{JOB_ID_TAG}` = '{pipeline_job_id}'", max_results=1)
    return runs[0].info.run_id if runs else None


def finish_pipeline_run(run_id: str, ok: bool, reason: str | None = None) -> None:
    mlflow = _mlflow()
    client = mlflow.MlflowClient()
    if reason:
        client.set_tag(run_id, "cascade.failure", reason[:5000])
    client.set_terminated(run_id, status="FINISHED" if ok else "FAILED")


@contextmanager
def stage_run(stage: str, experiment: str, profile: str, params: dict, parent_run_id: str | None = None) -> Iterator[object]:
    """A run for one stage, nested under the pipeline's parent run when one is given."""
    mlflow = _mlflow()
    mlflow.set_experiment(experiment)
    parent_run_id = parent_run_id or os.environ.get(PARENT_RUN_ENV) or None
    tags = {"cascade.kind": "stage", "cascade.stage": stage, "cascade.profile": profile,
            "mlflow.source.git.commit": git_commit()}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id  # nests without making the parent the active run
    with mlflow.start_run(run_name=stage, tags=tags) as run:
        mlflow.log_params({k: _param_value(v) for k, v in params.items()})
        yield run


@contextmanager
def phase_run(name: str, params: dict) -> Iterator[object]:
    """A run nested under the active stage run, for one part of a stage (a PixArt training phase)."""
    mlflow = _mlflow()
    parent = mlflow.active_run()
    if parent is None:  # not recording (a non-zero rank): nothing to nest under
        yield None
        return
    tags = {"cascade.kind": "phase", "cascade.stage": parent.data.tags.get("cascade.stage", ""),
            "cascade.phase": name, "mlflow.source.git.commit": git_commit()}
    with mlflow.start_run(run_name=name, nested=True, tags=tags) as run:
        mlflow.log_params({k: _param_value(v) for k, v in params.items()})
        yield run


def _param_value(value) -> str:
    text = str(value)
    return text if len(text) <= 6000 else text[:5997] + "..."


def log_input_table(path: str | Path, name: str, context: str, digest: str | None = None) -> None:
    """Log a parquet table as a run input (mlflow.log_input) with its content digest."""
    import warnings

    import pandas as pd

    mlflow = _mlflow()
    df = pd.read_parquet(path)
    with warnings.catch_warnings():  # MLflow's schema-inference hints are about serving, not inputs
        warnings.filterwarnings("ignore", message=".*can be interpreted in multiple ways.*")
        warnings.filterwarnings("ignore", message=".*Inferred schema contains integer column.*")
        dataset = mlflow.data.from_pandas(df, source=str(Path(path).resolve()), name=name, digest=digest)
        mlflow.log_input(dataset, context=context)


def lightning_logger(prefix: str = ""):
    """An MLFlowLogger writing Lightning's training curves into the active (stage) MLflow run; None
    without one (a non-zero distributed rank: rank 0 records the stage)."""
    import mlflow
    from lightning.pytorch.loggers import MLFlowLogger

    if mlflow.active_run() is None:
        return None
    return MLFlowLogger(tracking_uri=tracking_uri(), run_id=mlflow.active_run().info.run_id, prefix=prefix)
