"""Shared fixtures. Tests run from the repo root on CPU; nothing touches the network."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tests use tiny models, which gain nothing from intra-op threads; on a busy 2-core machine
    OpenMP barriers make each op wait for a descheduled thread (seconds per forward)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    """A private MLflow store for one test, so tests never write the repo's mlflow.db."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # for stage subprocesses (dvc, kfp.local)
    monkeypatch.delenv("CASCADE_PARENT_RUN_ID", raising=False)
    mlflow.set_tracking_uri(uri)  # in-process: an earlier test's set_tracking_uri would win over the env
    yield uri
    mlflow.set_tracking_uri(None)
