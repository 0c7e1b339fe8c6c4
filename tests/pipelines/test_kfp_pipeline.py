"""The KFP DAG: compiles, the checked-in YAML is current, and it runs end to end under kfp.local."""

import mlflow
import pytest
import yaml

from components.errors import StageError
from components.stage import STAGES
from pipelines.kfp_pipeline import compile_pipeline
from pipelines.local import run_local
from tests.conftest import REPO

CHECKED_IN = REPO / "pipelines" / "cascade_pipeline.yaml"


def _smoke_params(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text().replace("profile: tiny", "profile: smoke", 1))
    return params


def test_checked_in_pipeline_yaml_is_up_to_date(tmp_path):
    fresh = compile_pipeline(tmp_path / "p.yaml")
    assert fresh.read_text() == CHECKED_IN.read_text(), "run `cascade compile` and commit pipelines/cascade_pipeline.yaml"


def test_compiled_pipeline_has_the_stages_and_ui_parameters(tmp_path):
    spec, platform = yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml").read_text())
    tasks = spec["root"]["dag"]["tasks"]
    assert "exit-handler-1" in tasks and tasks["finish-pipeline"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"
    inner = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    assert {"start-pipeline", "data", "validate", "features", "evaluator", "tokenizer", "tokens", "base", "superres",
            "decoder-ft", "evaluate", "register"} <= set(inner)
    assert set(inner["tokens"]["dependentTasks"]) >= {"features", "tokenizer"}
    assert set(inner["evaluate"]["dependentTasks"]) >= {"decoder-ft", "evaluator", "superres"}
    assert set(inner["register"]["dependentTasks"]) >= {"evaluate", "decoder-ft"}
    assert inner["register"]["cachingOptions"] == {}  # never cached: every run registers a version
    ui = spec["root"]["inputDefinitions"]["parameters"]
    assert set(ui) == {"profile", "data_source", "model_name", "params", "max_fid", "min_clip_score",
                       "min_checker_single", "promotion_margin"}
    assert ui["profile"]["defaultValue"] == "tiny" and ui["max_fid"]["defaultValue"] == ""
    # the evaluation report reaches the KFP UI as HTML and Markdown visualizations
    outputs = spec["components"]["comp-evaluate"]["outputDefinitions"]["artifacts"]
    assert outputs["report"]["artifactType"]["schemaTitle"] == "system.HTML"
    assert outputs["summary"]["artifactType"]["schemaTitle"] == "system.Markdown"
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {"ghcr.io/cascade-t2i/cascade:0.1.0", "ghcr.io/cascade-t2i/cascade:0.1.0-cuda"}
    assert set(platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]) == set(spec["deploymentSpec"]["executors"])
    # no per-pod pip install: components run from the project image
    assert not any("pip install" in " ".join(e["container"].get("command", []))
                   for e in spec["deploymentSpec"]["executors"].values())


@pytest.mark.slow
def test_pipeline_runs_end_to_end_under_kfp_local_with_nested_mlflow_runs(tmp_path, mlflow_uri, monkeypatch):
    monkeypatch.chdir(tmp_path)
    outputs = run_local(tmp_path / "kfp", profile="smoke", params_path=_smoke_params(tmp_path),
                        arguments={"max_fid": "123456"})  # a gate set in the UI

    assert (outputs["data/dataset"] / "manifest.parquet").is_file()
    assert (outputs["validate/validated"] / "accepted.parquet").is_file()
    assert (outputs["validate/validated"] / "data_docs" / "index.html").is_file()
    assert "Quarantine reasons" in outputs["validate/report"].read_text()
    assert (outputs["features/text_features"] / "items.parquet").is_file()
    assert (outputs["tokenizer/tokenizers"] / "base" / "tokenizer.safetensors").is_file()
    assert (outputs["tokens/image_tokens"] / "superres" / "codes.safetensors").is_file()
    assert (outputs["base/base_model"] / "generator.safetensors").is_file()
    assert (outputs["superres/superres_model"] / "generator.safetensors").is_file()
    assert "| guidance |" in outputs["superres/samples"].read_text()  # the Markdown table for the KFP UI
    assert (outputs["evaluator/evaluator_model"] / "evaluator.safetensors").is_file()
    assert (outputs["decoder-ft/decoder"] / "tokenizer.safetensors").is_file()
    assert "data:image/png;base64," in outputs["evaluate/report"].read_text()
    assert "| guidance | FID | CLIP score |" in outputs["evaluate/summary"].read_text()
    registration = outputs["register/registration"].read_text()
    assert "Registered cascade-smoke version 1" in registration
    assert "max_fid 1.235e+05" in registration  # the UI's gate, not the profile's 1e6

    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("cascade").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("cascade.kind") == "pipeline")
    assert parent.info.status == "FINISHED" and parent.data.tags["cascade.launcher"] == "kfp"
    stages = {r.data.tags["cascade.stage"]: r for r in runs if r.data.tags.get("cascade.kind") == "stage"}
    assert set(stages) == set(STAGES)
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in stages.values())
    assert stages["validate"].data.metrics["n_accepted"] == 288
    # the registered version is the champion and records the pipeline run it came from
    version = client.get_model_version_by_alias("cascade-smoke", "champion")
    assert version.tags["pipeline_run_id"] == parent.info.run_id


@pytest.mark.slow
def test_a_failing_task_fails_the_run_and_the_exit_handler_marks_mlflow_failed(tmp_path, mlflow_uri, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StageError, match="local pipeline run failed"):
        run_local(tmp_path / "kfp", profile="smoke", params_path=_smoke_params(tmp_path),
                  data_source=str(tmp_path / "no-such-data"))
    client = mlflow.MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("cascade").experiment_id])
    parent = next(r for r in runs if r.data.tags.get("cascade.kind") == "pipeline")
    assert parent.info.status == "FAILED"
    assert parent.data.tags.get("cascade.failure")


def test_the_diffusion_family_runs_each_pixart_phase_as_its_own_task(tmp_path):
    """generator.family: diffusion compiles base as one task per PixArt-alpha phase, chained by the
    weights they pass on, each placed where base runs; super-res gets the images."""
    import json

    from pipelines.kfp_pipeline import build_pipeline
    from kfp import compiler

    tree = yaml.safe_load((REPO / "params.yaml").read_text())
    tree["generator"]["family"], tree["tokenizer"]["kind"] = "diffusion", "kl"
    out = tmp_path / "p.yaml"
    compiler.Compiler().compile(build_pipeline(json.dumps(tree), "tiny"), str(out))
    spec, platform = yaml.safe_load_all(out.read_text())
    inner = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    phases = {task["taskInfo"]["name"]: name for name, task in inner.items() if name.startswith("base")}
    assert list(phases) == ["base-pixel", "base-align", "base-finetune"]
    pixel, align, finetune = (inner[phases[n]] for n in phases)
    assert "init_model" not in pixel["inputs"].get("artifacts", {})
    for task, previous in ((align, phases["base-pixel"]), (finetune, phases["base-align"])):
        assert task["inputs"]["artifacts"]["init_model"]["taskOutputArtifact"]["producerTask"] == previous
        assert previous in task["dependentTasks"]
    assert inner["superres"]["inputs"]["artifacts"]["base_model"]["taskOutputArtifact"]["producerTask"] == phases["base-finetune"]
    assert "dataset" in inner["superres"]["inputs"]["artifacts"]
    placed = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in phases.values():
        executor = spec["components"][inner[name]["componentRef"]["name"]]["executorLabel"]
        assert executor in placed and placed[executor].get("nodeSelector")  # on the GPU pool, as base
