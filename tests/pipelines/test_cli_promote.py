"""`cascade promote` through typer's CliRunner, against a private MLflow registry."""

from __future__ import annotations

import mlflow

from tests.components.test_registry import GOOD, NAME, new_version
from tests.conftest import REPO
from tests.pipelines.test_cli import assert_clean_failure, invoke


def promote(*args):
    return invoke("--params", REPO / "params.yaml", "--profile", "smoke", "promote", "--model", NAME, *args)


def test_promote_has_help():
    result = invoke("promote", "--help")
    assert result.exit_code == 0 and "--force" in result.stdout and "--reason" in result.stdout


def test_promote_applies_the_params_gates(mlflow_uri):
    client = mlflow.MlflowClient()
    v1, v2 = new_version(client, GOOD), new_version(client, GOOD)
    first = promote("--version", v1)
    assert first.exit_code == 0, first.output
    assert f"version {v1}: promoted -> alias champion" in first.stdout and "no current champion" in first.stdout
    second = promote("--version", v2)  # equal to the champion: margin 0 is not beaten
    assert second.exit_code == 0, second.output
    assert "rejected -> alias challenger" in second.stdout and "FAIL: checker_single" in second.stdout
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == v1


def test_force_needs_a_reason_and_then_records_it(mlflow_uri):
    client = mlflow.MlflowClient()
    v1, v2 = new_version(client, GOOD), new_version(client, GOOD | {"fid": float("nan")})
    assert promote("--version", v1).exit_code == 0
    line = assert_clean_failure(promote("--version", v2, "--force"))
    assert "--reason" in line
    assert client.get_model_version(NAME, v2).aliases == []  # nothing changed
    result = promote("--version", v2, "--force", "--reason", "rollback of a bad tokenizer")
    assert result.exit_code == 0, result.output
    assert "forced -> alias champion" in result.stdout
    assert client.get_model_version(NAME, v2).tags["cascade.forced_reason"] == "rollback of a bad tokenizer"


def test_an_unknown_model_or_version_is_one_line(mlflow_uri):
    new_version(mlflow.MlflowClient(), GOOD)
    assert "has no version '7'" in assert_clean_failure(promote("--version", "7"))
    other = invoke("--params", REPO / "params.yaml", "promote", "--model", "nope", "--version", "1")
    assert "'nope' has no version" in assert_clean_failure(other)
