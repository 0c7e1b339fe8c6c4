"""`cascade submit --host`: compile for the profile, start a run with kfp.Client, clear errors."""

import pytest
import yaml
from typer.testing import CliRunner

from components.errors import StageError
from pipelines.cli import app
from pipelines.kfp_tasks import gate_overrides
from pipelines.submit import submit
from tests.conftest import REPO


class FakeClient:
    calls: list = []

    def __init__(self, host, namespace, existing_token):
        self.init = dict(host=host, namespace=namespace, existing_token=existing_token)

    def create_run_from_pipeline_package(self, pipeline_file, **kwargs):
        spec = next(yaml.safe_load_all(open(pipeline_file).read()))
        FakeClient.calls.append(dict(self.init, spec=spec, **kwargs))
        return type("Run", (), {"run_id": "run-42"})()


@pytest.fixture(autouse=True)
def fresh_calls():
    FakeClient.calls = []


def test_submit_compiles_for_the_profile_and_runs_under_the_pipeline_service_account():
    run = submit("http://kfp.example:8080/", REPO / "params.yaml", "base256",
                 ["data_source=gs://bucket/shards", "max_fid=20"], "cascade", "nightly", None, "tok",
                 client_factory=FakeClient)
    assert run.run_id == "run-42" and run.url == "http://kfp.example:8080/#/runs/details/run-42"
    call = FakeClient.calls[0]
    assert call["host"] == "http://kfp.example:8080/" and call["existing_token"] == "tok"
    assert call["namespace"] == "kubeflow" and call["service_account"] == "cascade-pipeline"
    assert call["arguments"] == {"profile": "base256", "data_source": "gs://bucket/shards", "max_fid": "20"}
    assert call["experiment_name"] == "cascade" and call["run_name"] == "nightly"
    # the package is the base256 placement: its multi-node base task is a CPU launcher
    assert call["spec"]["root"]["inputDefinitions"]["parameters"]["profile"]["defaultValue"] == "base256"


@pytest.mark.parametrize("pair, message", [
    ("max_fid", "expected KEY=VALUE"),
    ("learning_rate=3", "learning_rate: not a pipeline parameter"),
    ("profile=smoke", "global --params/--profile"),
])
def test_bad_parameters_are_refused_before_anything_is_sent(pair, message):
    with pytest.raises(StageError, match=message):
        submit("http://kfp", REPO / "params.yaml", None, [pair], "cascade", None, None, None, client_factory=FakeClient)
    assert FakeClient.calls == []


def test_an_unreachable_endpoint_is_one_line_from_the_cli(monkeypatch):
    import kfp

    class Unreachable:
        def __init__(self, **kwargs):
            raise ConnectionError("Max retries exceeded with url: /apis/v2beta1/healthz\nmore detail")

    monkeypatch.setattr(kfp, "Client", Unreachable)
    result = CliRunner().invoke(app, ["--params", str(REPO / "params.yaml"), "submit", "--host", "http://nowhere:1"])
    assert result.exit_code == 1
    assert "could not submit to Kubeflow Pipelines at http://nowhere:1: Max retries exceeded" in result.output
    assert "Traceback" not in result.output


def test_ui_gate_parameters_override_the_profile_only_when_set():
    assert gate_overrides({"max_fid": "", "min_clip_score": " ", "margin": ""}) == {}
    assert gate_overrides({"max_fid": "12.5", "min_checker_single": "none", "margin": "0.1"}) == {
        "register.gates.max_fid": 12.5, "register.gates.min_checker_single": None, "register.gates.margin": 0.1}
    with pytest.raises(StageError, match="max_fid='low': expected a number, or empty"):
        gate_overrides({"max_fid": "low"})
