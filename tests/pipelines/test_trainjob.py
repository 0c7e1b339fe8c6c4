"""Multi-node stages as Kubeflow Trainer TrainJobs: the rendered spec, the watch loop, the launcher."""

import json
import re

import pytest
from kubernetes.client.exceptions import ApiException

from components import tracking
from components.config import load_config
from components.errors import StageError
from components.stage import Layout
from pipelines.trainjob import render_trainjob, run_remote_stage, run_trainjob, trainjob_name
from tests.conftest import REPO, communicate_all, free_port

RUN_ID = "0123456789abcdef0123456789abcdef"


@pytest.fixture
def cfg():
    """base256 with its base stage on 4 nodes (what infra/SCALING.md suggests from batch 2048)."""
    return load_config(REPO / "params.yaml", "base256",
                       {"kubeflow.stages.base.nodes": 4, "base.train.batch_size": 2048})


def test_the_trainjob_spec_is_rendered_from_params(cfg):
    spec = render_trainjob(cfg, "base", RUN_ID)
    assert spec["apiVersion"] == "trainer.kubeflow.org/v1alpha1" and spec["kind"] == "TrainJob"
    assert spec["metadata"]["namespace"] == cfg.kubeflow.namespace
    assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", spec["metadata"]["name"])  # RFC 1035, as Trainer checks
    assert spec["spec"]["runtimeRef"]["name"] == "torch-distributed"
    trainer = spec["spec"]["trainer"]
    assert trainer["numNodes"] == 4 and trainer["numProcPerNode"] == 8  # params: 4 nodes x 8 GPUs
    assert trainer["image"] == cfg.kubeflow.images.gpu
    assert trainer["resourcesPerNode"]["limits"] == {"cpu": "96", "memory": "1000Gi", "nvidia.com/gpu": "8"}
    work = f"/mnt/cascade/{RUN_ID}/trainjob-base"
    assert trainer["command"] == ["torchrun", "--no-python", "cascade", "--params", f"{work}/params.yaml",
                                  "--profile", "base256", "stage", "base", "--root", work]
    env = {e["name"]: e["value"] for e in trainer["env"]}
    assert env[tracking.PARENT_RUN_ENV] == RUN_ID  # the nodes' stage run nests under the pipeline run
    assert env["CASCADE_CHECKPOINT_DIR"] == f"/mnt/cascade/{RUN_ID}"  # checkpoints beside the work folder
    assert env["MLFLOW_TRACKING_URI"] == cfg.kubeflow.mlflow_tracking_uri
    patch = spec["spec"]["runtimePatches"][0]  # Trainer v2.2+ (params kubeflow.trainer.pod_patch)
    assert patch["manager"] and "podTemplateOverrides" not in spec["spec"]
    node_job = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert node_job["name"] == "node"
    pod = node_job["template"]["spec"]["template"]["spec"]  # Job spec -> Pod template -> Pod spec
    assert pod["serviceAccountName"] == "cascade-pipeline"
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "cascade-checkpoints"
    assert pod["containers"][0]["volumeMounts"][0]["mountPath"] == "/mnt/cascade"


def test_trainer_v2_1_gets_the_same_pod_settings_as_pod_template_overrides(cfg):
    from dataclasses import replace

    v21 = replace(cfg, kubeflow=replace(cfg.kubeflow, trainer=replace(cfg.kubeflow.trainer,
                                                                     pod_patch="pod_template_overrides")))
    old, new = render_trainjob(v21, "base", RUN_ID)["spec"], render_trainjob(cfg, "base", RUN_ID)["spec"]
    assert "runtimePatches" not in old
    override = old["podTemplateOverrides"][0]
    assert override["targetJobs"] == [{"name": "node"}]
    new_pod = new["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert override["spec"] == new_pod["template"]["spec"]["template"]["spec"]


def test_the_trainjob_command_is_a_valid_cascade_invocation(cfg, tmp_path):
    """The argv after `torchrun --no-python cascade` parses as our CLI (here: up to a missing params file)."""
    from typer.testing import CliRunner

    from pipelines.cli import app

    argv = render_trainjob(cfg, "decoder_ft", RUN_ID)["spec"]["trainer"]["command"][3:]
    assert argv[argv.index("stage") + 1] == "decoder_ft"
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 1 and "params file not found" in result.output  # parsed; failed on the path only


def test_names_are_dns_labels_and_unique_per_stage_and_run():
    names = {trainjob_name(stage, run) for stage in ("base", "decoder_ft") for run in (RUN_ID, "f" * 32)}
    assert len(names) == 4 and all(len(n) <= 63 and "_" not in n for n in names)


class FakeTrainer:
    """The Kubernetes custom-objects API as the launcher uses it; phases advance one per poll."""

    def __init__(self, phases, existing=None, create_error=None, on_create=None):
        self.phases, self.existing, self.create_error, self.on_create = list(phases), existing, create_error, on_create
        self.created, self.deleted = [], []

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        if self.create_error:
            err, self.create_error = self.create_error, None
            raise err
        self.created.append(body)
        if self.on_create:
            self.on_create(body)

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        if self.existing is not None:
            existing, self.existing = self.existing, None
            return existing
        phase = self.phases.pop(0) if len(self.phases) > 1 else self.phases[0]
        return phase if isinstance(phase, dict) else _status(phase)

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.deleted.append(name)


def _status(phase, message=""):
    if phase == "Running":
        return {"status": {"jobsStatus": [{"name": "node", "active": 4}]}}
    if phase == "Pending":
        return {"status": {}}
    return {"status": {"conditions": [{"type": phase, "status": "True", "message": message}]}}


def _run(api, spec, **kw):
    lines = []
    run_trainjob(spec, api=api, poll_seconds=0, sleep=lambda s: None, echo=lines.append, **kw)
    return lines


def test_the_launcher_reports_each_phase_until_the_job_completes(cfg):
    api = FakeTrainer(["Pending", "Running", "Running", "Complete"])
    lines = _run(api, render_trainjob(cfg, "base", RUN_ID))
    assert len(api.created) == 1
    assert [line.split(": ", 1)[1] for line in lines] == ["created (4 nodes)", "Pending", "Running", "Complete"]


def test_a_failed_trainjob_fails_the_task_with_its_message(cfg):
    api = FakeTrainer(["Running", _status("Failed", "node-0 OOMKilled")])
    with pytest.raises(StageError, match="failed: node-0 OOMKilled.*kubectl -n kubeflow logs"):
        _run(api, render_trainjob(cfg, "base", RUN_ID))


def test_a_retried_launcher_replaces_a_failed_job_and_attaches_to_a_live_one(cfg):
    spec = render_trainjob(cfg, "base", RUN_ID)
    conflict = ApiException(status=409, reason="AlreadyExists")
    failed = FakeTrainer(["Complete"], existing=_status("Failed", "preempted"), create_error=conflict)
    lines = _run(failed, spec)
    assert failed.deleted == [spec["metadata"]["name"]] and len(failed.created) == 1
    assert any("re-created" in line for line in lines)

    live = FakeTrainer(["Complete"], existing=_status("Running"), create_error=ApiException(status=409))
    lines = _run(live, spec)
    assert live.deleted == [] and live.created == [] and any("attached" in line for line in lines)


def test_refused_and_timed_out_jobs_give_actionable_errors(cfg):
    spec = render_trainjob(cfg, "base", RUN_ID)
    with pytest.raises(StageError, match="refused it \\(403 Forbidden\\).*service account may create trainjobs"):
        _run(FakeTrainer(["Running"], create_error=ApiException(status=403, reason="Forbidden")), spec)
    api = FakeTrainer(["Running"])
    clock = iter(range(0, 10**6, 3600))
    with pytest.raises(StageError, match="did not finish within 2 h.*deleted it, checkpoints are kept"):
        run_trainjob(spec, api=api, poll_seconds=0, timeout_s=7200, sleep=lambda s: None,
                     clock=lambda: next(clock), echo=lambda line: None)
    assert api.deleted == [spec["metadata"]["name"]]


def test_the_launcher_stages_inputs_on_the_claim_and_returns_rank_zeros_outputs(tmp_path):
    mount = tmp_path / "claim"
    cfg = load_config(REPO / "params.yaml", "base256", {"kubeflow.checkpoints.mount_path": str(mount),
                                                        "kubeflow.stages.base.nodes": 4})
    inputs = {}
    for dep in ("tokens", "features", "tokenizer", "validate"):
        inputs[dep] = tmp_path / "kfp" / dep
        inputs[dep].mkdir(parents=True)
        (inputs[dep] / "part.bin").write_text(dep)

    def nodes_run_the_stage(body):  # what the TrainJob's rank 0 leaves behind on the claim
        work = Layout(root=mount / RUN_ID / "trainjob-base")
        assert all((work.out(dep) / "part.bin").read_text() == dep for dep in inputs)
        assert (work.root / "params.yaml").read_text() == "profile: base256\n"
        work.out("base").mkdir(parents=True)
        (work.out("base") / "generator.safetensors").write_text("weights")
        work.metrics("base").parent.mkdir(parents=True)
        work.metrics("base").write_text(json.dumps({"loss": 1.5}))

    api = FakeTrainer(["Complete"], on_create=nodes_run_the_stage)
    metrics = run_remote_stage(cfg, "profile: base256\n", "base", RUN_ID, inputs, tmp_path / "out" / "base_model",
                               tmp_path / "out" / "stage_metrics.json", api=api)
    assert metrics == {"loss": 1.5}
    assert (tmp_path / "out" / "base_model" / "generator.safetensors").read_text() == "weights"
    assert json.loads((tmp_path / "out" / "stage_metrics.json").read_text()) == {"loss": 1.5}

    with pytest.raises(StageError, match="missing inputs \\['base'\\]"):
        run_remote_stage(cfg, "", "superres", RUN_ID, inputs, tmp_path / "o", tmp_path / "m.json", api=api)


@pytest.mark.slow
def test_two_torchrun_nodes_run_the_stage_as_one_ddp_job_and_only_rank_zero_records_it(
        smoke_cascade, tmp_path, mlflow_uri):
    """What a 2-node TrainJob runs, on this machine: `torchrun --nnodes 2 --no-python cascade stage base --root W`."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import mlflow

    art = smoke_cascade.art
    work = Layout(root=tmp_path / "work")
    for dep, src in {"tokens": smoke_cascade.tokens, "features": art.features, "tokenizer": art.tokenizer,
                     "validate": art.validate}.items():
        shutil.copytree(src, work.out(dep))
    params = tmp_path / "work" / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    parent = tracking.start_pipeline_run("cascade", "smoke", launcher="kfp")
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_uri, tracking.PARENT_RUN_ENV: parent, "OMP_NUM_THREADS": "1",
           "CASCADE_CHECKPOINT_DIR": str(tmp_path / "claim" / parent)}
    port = free_port()
    nodes = [subprocess.Popen(
        [str(bin_dir / "torchrun"), "--nnodes=2", f"--node-rank={rank}", "--nproc-per-node=1",
         "--master-addr=127.0.0.1", f"--master-port={port}", "--no-python", str(bin_dir / "cascade"),
         "--params", str(params), "--profile", "smoke", "stage", "base", "--root", str(work.root)],
        env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in range(2)]
    logs = communicate_all(nodes, timeout=300)
    assert [node.returncode for node in nodes] == [0, 0], logs[0][-3000:] + logs[1][-3000:]

    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in logs[0] and "GLOBAL_RANK: 1, MEMBER: 2/2" in logs[1]  # one DDP job
    assert (work.out("base") / "generator.safetensors").is_file()  # rank 0's result
    assert json.loads(work.metrics("base").read_text())["parameters"] > 0
    assert (tmp_path / "claim" / parent / "base" / "last.ckpt").is_file()  # checkpoints on the claim
    client = mlflow.MlflowClient()
    stage_runs = [r for r in client.search_runs([client.get_experiment_by_name("cascade").experiment_id])
                  if r.data.tags.get("cascade.stage") == "base"]
    assert len(stage_runs) == 1 and stage_runs[0].data.tags["mlflow.parentRunId"] == parent


def test_a_pixart_phase_runs_as_its_own_trainjob_from_the_staged_previous_phase(tmp_path):
    """Diffusion family: each phase of base is a TrainJob of its own (name, work folder, --phase)
    that starts from the previous phase's weights staged as artifacts/base_init."""
    from typer.testing import CliRunner

    from pipelines.cli import app
    from pipelines.trainjob import INIT_INPUT

    mount = tmp_path / "claim"
    cfg = load_config(REPO / "params.yaml", "base256", {"generator.family": "diffusion", "tokenizer.kind": "kl",
                                                        "tokenizer.base.resolution": 64,
                                                        "tokenizer.base.downsample": 8,
                                                        "tokenizer.base.channels": [128, 256, 256, 512],
                                                        "kubeflow.checkpoints.mount_path": str(mount),
                                                        "kubeflow.stages.base.nodes": 2})
    spec = render_trainjob(cfg, "base", RUN_ID, phase="align", with_init=True)
    argv = spec["spec"]["trainer"]["command"][3:]
    work = mount / RUN_ID / "trainjob-base-align"
    assert argv[argv.index("--phase") + 1] == "align"
    assert argv[argv.index("--init") + 1] == str(Layout(root=work).out(INIT_INPUT))
    assert "align" in spec["metadata"]["name"] != render_trainjob(cfg, "base", RUN_ID, phase="pixel")["metadata"]["name"]
    assert "--init" not in render_trainjob(cfg, "base", RUN_ID, phase="pixel")["spec"]["trainer"]["command"]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 1 and "params file not found" in result.output  # --phase/--init parse

    inputs = {}
    for dep in ("tokens", "features", "tokenizer", "validate", INIT_INPUT):
        inputs[dep] = tmp_path / "kfp" / dep
        inputs[dep].mkdir(parents=True)
        (inputs[dep] / "part.bin").write_text(dep)

    def nodes_run_the_phase(body):
        assert "--phase" in body["spec"]["trainer"]["command"]
        layout = Layout(root=work)
        assert (layout.out(INIT_INPUT) / "part.bin").read_text() == INIT_INPUT
        layout.out("base").mkdir(parents=True)
        (layout.out("base") / "diffusion.safetensors").write_text("weights")
        layout.metrics("base").parent.mkdir(parents=True)
        layout.metrics("base").write_text(json.dumps({"align.final_loss": 0.5}))

    api = FakeTrainer(["Complete"], on_create=nodes_run_the_phase)
    metrics = run_remote_stage(cfg, "profile: base256\n", "base", RUN_ID, inputs, tmp_path / "out", tmp_path / "m.json",
                               api=api, phase="align")
    assert metrics == {"align.final_loss": 0.5}
    with pytest.raises(StageError, match="missing inputs \\['data'\\]"):  # pixel super-res reads the images
        run_remote_stage(cfg, "", "superres", RUN_ID, {**inputs, "base": tmp_path}, tmp_path / "o",
                         tmp_path / "m2.json", api=api)
