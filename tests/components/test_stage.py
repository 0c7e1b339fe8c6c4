import json
from dataclasses import dataclass

import mlflow
import pandas as pd
import pytest

from components import tracking
from components.config import load_config
from components.errors import StageError
from components.stage import Layout, TrackedInput, is_rank_zero, tracked
from tests.conftest import REPO


@dataclass(frozen=True)
class _Result:
    metrics: dict


@pytest.fixture
def cfg():
    return load_config(REPO / "params.yaml", "smoke")


def _runs(experiment="cascade"):
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id])


def test_stage_run_nests_under_the_pipeline_run_with_params_metrics_and_inputs(tmp_path, mlflow_uri, cfg, monkeypatch):
    parent = tracking.start_pipeline_run("cascade", "smoke", launcher="test")
    monkeypatch.setenv(tracking.PARENT_RUN_ENV, parent)
    table = tmp_path / "manifest.parquet"
    pd.DataFrame({"key": ["a", "b"], "caption": ["x", "y"]}).to_parquet(table)
    metrics_file = tmp_path / "metrics" / "data.json"

    result = tracked("data", cfg, lambda: _Result({"n_items": 2}), metrics_file,
                     inputs=lambda: [TrackedInput(table, "manifest", "data")])
    tracking.finish_pipeline_run(parent, ok=True)

    assert result.metrics == {"n_items": 2}
    assert json.loads(metrics_file.read_text()) == {"n_items": 2.0}
    stage_run = next(r for r in _runs() if r.data.tags.get("cascade.stage") == "data")
    assert stage_run.data.tags["mlflow.parentRunId"] == parent
    assert stage_run.data.params["data.builtin.n_train"] == str(cfg.data.builtin.n_train)
    assert stage_run.data.metrics["n_items"] == 2
    inputs = mlflow.MlflowClient().get_run(stage_run.info.run_id).inputs.dataset_inputs
    assert [i.dataset.name for i in inputs] == ["manifest"] and inputs[0].dataset.digest
    assert mlflow.MlflowClient().get_run(parent).info.status == "FINISHED"


def test_a_stage_error_marks_the_run_failed_with_its_reason(tmp_path, mlflow_uri, cfg):
    def boom():
        raise StageError("validate: 50% quarantined")

    with pytest.raises(StageError):
        tracked("validate", cfg, boom, tmp_path / "m.json")
    run = next(r for r in _runs() if r.data.tags.get("cascade.stage") == "validate")
    assert run.info.status == "FAILED"
    assert run.data.tags["cascade.failure"] == "validate: 50% quarantined"
    assert not (tmp_path / "m.json").exists()


@pytest.mark.parametrize("env, zero", [({}, True), ({"RANK": "0"}, True), ({"RANK": "3"}, False),
                                       ({"LOCAL_RANK": "1"}, False), ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, False)])
def test_rank_zero_is_told_apart_from_the_other_distributed_ranks(monkeypatch, env, zero):
    for var in ("RANK", "LOCAL_RANK", "NODE_RANK"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert is_rank_zero() is zero


def test_only_rank_zero_records_a_stage(tmp_path, mlflow_uri, cfg, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    result = tracked("data", cfg, lambda: _Result({"n_items": 2}), tmp_path / "m.json")
    assert result.metrics == {"n_items": 2}
    assert not (tmp_path / "m.json").exists()
    assert mlflow.MlflowClient().get_experiment_by_name("cascade") is None or not _runs()


def test_non_finite_metrics_are_refused(tmp_path, mlflow_uri, cfg):
    with pytest.raises(StageError, match="non-finite metrics"):
        tracked("data", cfg, lambda: _Result({"loss": float("nan")}), tmp_path / "m.json")


def test_pipeline_run_is_found_by_kfp_job_id(mlflow_uri):
    run_id = tracking.start_pipeline_run("cascade", "smoke", "kfp", tags={tracking.JOB_ID_TAG: "job-123"})
    assert tracking.find_pipeline_run("cascade", "job-123") == run_id
    assert tracking.find_pipeline_run("cascade", "job-999") is None


def test_tracking_uri_defaults_to_sqlite_in_the_working_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"


def test_layout_matches_dvc_yaml():
    import yaml

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    layout = Layout()
    for name, spec in stages.items():
        outs = [next(iter(o)) if isinstance(o, dict) else o for o in spec["outs"]]
        assert str(layout.out(name)) in outs
        assert spec["cmd"] == f"cascade stage {name}"
        assert str(layout.metrics(name)) in [next(iter(m)) for m in spec["metrics"]]
