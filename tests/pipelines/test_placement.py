"""Per-stage placement in the compiled pipeline: images, resources, node pools, PVC, retries."""

import pytest
import yaml

from components.config import ConfigError
from pipelines.kfp_pipeline import build_pipeline, compile_pipeline, params_default
from tests.conftest import REPO

STAGE_TASKS = {"data": "data", "validate": "validate", "features": "features", "evaluator": "evaluator",
               "tokenizer": "tokenizer", "tokens": "tokens", "base": "base", "superres": "superres",
               "decoder_ft": "decoder-ft", "evaluate": "evaluate", "register": "register"}


def _compiled(tmp_path, profile=None, edit=None):
    params = tmp_path / "params.yaml"
    text = (REPO / "params.yaml").read_text()
    params.write_text(edit(text) if edit else text)
    spec, platform = yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml", params, profile).read_text())
    containers = {name.removeprefix("exec-"): e["container"] for name, e in spec["deploymentSpec"]["executors"].items()}
    k8s = {name.removeprefix("exec-"): e for name, e in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].items()}
    tasks = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    return containers, k8s, tasks


def test_tiny_places_training_on_one_gpu_and_bookkeeping_on_the_cpu_pool(tmp_path):
    containers, k8s, tasks = _compiled(tmp_path)
    base = containers["base"]
    assert base["image"] == "ghcr.io/cascade-t2i/cascade:0.1.0-cuda"
    assert base["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert base["resources"]["accelerator"]["resourceCount"] == "1"
    assert base["resources"]["resourceCpuLimit"] == "8" and base["resources"]["resourceMemoryLimit"] == "32Gi"
    assert k8s["base"]["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert k8s["base"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    env = {e["name"]: e["value"] for e in base["env"]}
    assert env == {"MLFLOW_TRACKING_URI": "http://mlflow.mlflow.svc.cluster.local:5000",
                   "CASCADE_CHECKPOINT_DIR": "/mnt/cascade"}
    assert k8s["base"]["pvcMount"][0]["mountPath"] == "/mnt/cascade"
    assert k8s["base"]["pvcMount"][0]["constant"] == "cascade-checkpoints"

    data = containers["data"]
    assert data["image"] == "ghcr.io/cascade-t2i/cascade:0.1.0" and "accelerator" not in data["resources"]
    assert k8s["data"]["nodeSelector"]["labels"] == {"cloud.google.com/gke-nodepool": "cpu-pool"}
    assert "pvcMount" not in k8s["data"] and "tolerations" not in k8s["data"]
    # every training stage mounts the checkpoint claim; no other stage does
    mounted = {stage for stage, task in STAGE_TASKS.items() if "pvcMount" in k8s[task]}
    assert mounted == {"evaluator", "tokenizer", "base", "superres", "decoder_ft"}
    # every stage retries (a retried training task resumes from the claim); bookkeeping does not
    for task in STAGE_TASKS.values():
        assert tasks[task]["retryPolicy"]["maxRetryCount"] == 2, task
    assert "retryPolicy" not in tasks["start-pipeline"]
    assert k8s["start-pipeline"]["nodeSelector"]["labels"] == {"cloud.google.com/gke-nodepool": "cpu-pool"}


def test_smoke_fits_a_cpu_only_cluster(tmp_path):
    containers, k8s, _ = _compiled(tmp_path, "smoke")
    assert {c["image"] for c in containers.values()} == {"ghcr.io/cascade-t2i/cascade:0.1.0"}
    assert not any("accelerator" in c.get("resources", {}) for c in containers.values())
    assert not any("tolerations" in e for e in k8s.values())


def test_a_multi_node_stage_runs_a_small_launcher_pod(tmp_path):
    def base_on_four_nodes(text):
        old = 'base:       {cpu: "96", memory: 1000Gi, accelerators: 8}'
        assert old in text
        return text.replace(old, 'base:       {cpu: "96", memory: 1000Gi, accelerators: 8, nodes: 4}')

    containers, k8s, _ = _compiled(tmp_path, "base256", base_on_four_nodes)
    launcher = containers["base"]
    assert launcher["image"] == "ghcr.io/cascade-t2i/cascade:0.1.0" and "accelerator" not in launcher["resources"]
    assert k8s["base"]["nodeSelector"]["labels"] == {"cloud.google.com/gke-nodepool": "cpu-pool"}
    assert k8s["base"]["pvcMount"][0]["constant"] == "cascade-checkpoints"  # it stages inputs on the claim
    superres = containers["superres"]  # one node: the pod itself trains on 8 GPUs
    assert superres["resources"]["accelerator"]["resourceCount"] == "8"


def test_a_tpu_placement_asks_for_tpu_chips_on_the_tpu_pool(tmp_path):
    def base_on_tpu(text):
        return text.replace("    base:       {pool: gpu, cpu: \"8\", memory: 32Gi, accelerators: 1, nodes: 1}",
                            "    base:       {pool: tpu, cpu: \"8\", memory: 32Gi, accelerators: 1, nodes: 1}")

    containers, k8s, _ = _compiled(tmp_path, "tiny", base_on_tpu)
    assert containers["base"]["image"] == "ghcr.io/cascade-t2i/cascade:0.1.0-tpu"
    assert containers["base"]["resources"]["accelerator"]["resourceType"] == "google.com/tpu"
    assert k8s["base"]["nodeSelector"]["labels"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
                                                      "cloud.google.com/gke-tpu-topology": "2x4"}


@pytest.mark.parametrize("old, new, message", [
    ("base:       {pool: gpu, cpu: \"8\", memory: 32Gi, accelerators: 1",
     "base:       {pool: gpu, cpu: \"8\", memory: 32Gi, accelerators: 2",
     r"kubeflow.stages.base.accelerators \(2\) must equal base.train.devices \(1\)"),
    ("data:       {pool: cpu, cpu: \"2\", memory: 8Gi, accelerators: 0",
     "data:       {pool: cpu, cpu: \"2\", memory: 8Gi, accelerators: 1",
     r"kubeflow.stages.data: asks for 1 accelerators but pool 'cpu' has no accelerator_resource"),
    ("tokens:     {pool: gpu, cpu: \"8\", memory: 32Gi, accelerators: 1, nodes: 1}",
     "tokens:     {pool: gpu, cpu: \"8\", memory: 32Gi, accelerators: 1, nodes: 2}",
     r"kubeflow.stages.tokens.nodes: only training stages"),
    ("base:       {pool: gpu, cpu: \"8\", memory: 32Gi, accelerators: 1, nodes: 1}",
     "base:       {pool: tpu, cpu: \"8\", memory: 32Gi, accelerators: 1, nodes: 2}",
     r"kubeflow.stages.base: multi-host TPU"),
])
def test_placements_the_cluster_would_reject_fail_at_compile_time(old, new, message):
    text = (REPO / "params.yaml").read_text()
    assert old in text
    with pytest.raises(ConfigError, match=message):
        build_pipeline(text.replace(old, new, 1), "tiny")


def test_the_compiled_profile_is_the_default_of_the_profile_parameter(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    spec = next(yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml", params, "base256").read_text()))
    assert spec["root"]["inputDefinitions"]["parameters"]["profile"]["defaultValue"] == "base256"
    assert params_default(params).startswith('{"profile":"tiny"')  # the params text itself is unchanged


def test_training_tasks_keep_checkpoints_per_pipeline_run_on_the_claim(tmp_path, monkeypatch):
    """A retried task (same pipeline run) finds its checkpoints again; another run starts clean."""
    from pipelines.kfp_tasks import _checkpoint_root

    monkeypatch.setenv("CASCADE_CHECKPOINT_DIR", str(tmp_path / "claim"))
    first = _checkpoint_root("base", "run-a")
    assert first == tmp_path / "claim" / "run-a" / "base" == _checkpoint_root("base", "run-a")
    assert _checkpoint_root("base", "run-b") != first
    monkeypatch.delenv("CASCADE_CHECKPOINT_DIR")
    assert _checkpoint_root("base", "run-a").parent != _checkpoint_root("base", "run-a").parent  # scratch, never shared


def test_local_runs_leave_the_cluster_placement_out(tmp_path):
    """kfp.local applies task env vars: the in-cluster MLflow URI and the claim's path must not leak."""
    from kfp import compiler

    out = tmp_path / "local.yaml"
    compiler.Compiler().compile(build_pipeline(params_default(), cluster=False), str(out))
    docs = list(yaml.safe_load_all(out.read_text()))
    assert len(docs) == 1  # no Kubernetes platform spec
    assert not any("env" in e["container"] for e in docs[0]["deploymentSpec"]["executors"].values())
