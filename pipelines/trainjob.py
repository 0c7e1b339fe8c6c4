"""Multi-node stages: a Kubeflow Trainer TrainJob running the same `cascade stage` under torchrun.

When a training stage's placement asks for more than one node (`kubeflow.stages.<stage>.nodes`),
its KFP task only launches: it stages the input artifacts on the shared checkpoint claim, submits
a TrainJob (runtime `kubeflow.trainer.runtime`, torch-distributed) whose every node runs
`torchrun --no-python cascade stage <stage> --root <work dir>`, watches it, and copies rank 0's
outputs back into its KFP artifacts. Lightning joins the torchrun processes for DDP; checkpoints
sit on the claim, so a retried launcher re-submits and the nodes resume.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from components import tracking
from components.config import CascadeConfig
from components.errors import StageError
from components.stage import CHECKPOINT_DIR_ENV, Layout

GROUP, VERSION, PLURAL = "trainer.kubeflow.org", "v1alpha1", "trainjobs"
NODE_JOB = "node"  # the torch-distributed runtime's replicated job (and container) name
PATCH_MANAGER = "cascade.pipelines/trainjob"  # owner of our runtimePatches entry

# What each training stage reads, as Layout stage folders (the same as `cascade stage` reads).
STAGE_INPUTS = {
    "tokenizer": ("data", "validate"),
    "evaluator": ("data", "validate", "features"),
    "base": ("tokens", "features", "tokenizer", "validate"),
    "superres": ("tokens", "features", "tokenizer", "validate", "base"),
    "decoder_ft": ("data", "validate", "tokens", "tokenizer", "base", "superres", "evaluator", "features"),
}


def stage_inputs(cfg: CascadeConfig, stage: str) -> tuple[str, ...]:
    """STAGE_INPUTS for cfg's generator family: the diffusion super-res model trains on pixels."""
    needed = STAGE_INPUTS[stage]
    if stage == "superres" and cfg.generator.family == "diffusion":
        needed = needed + ("data",)
    return needed


def trainjob_name(stage: str, parent_run_id: str, phase: str | None = None) -> str:
    """A DNS-1123 name, one per stage (and phase) per pipeline run (a retried launcher finds its job again)."""
    stage = f"{stage}-{phase}" if phase else stage
    name = f"cascade-{stage}-{parent_run_id[:16]}".lower().replace("_", "-")
    return re.sub(r"[^a-z0-9-]", "-", name)[:63].rstrip("-")


def work_dir(cfg: CascadeConfig, stage: str, parent_run_id: str, phase: str | None = None) -> Path:
    """Where a TrainJob's inputs and outputs live on the claim (beside, never inside, checkpoints)."""
    return Path(cfg.kubeflow.checkpoints.mount_path) / parent_run_id / f"trainjob-{stage}{'-' + phase if phase else ''}"


INIT_INPUT = "base_init"  # a PixArt phase's starting weights, staged as artifacts/base_init


def render_trainjob(cfg: CascadeConfig, stage: str, parent_run_id: str, phase: str | None = None,
                    with_init: bool = False) -> dict:
    """The TrainJob manifest for `stage` (one PixArt `phase` of the diffusion base, started from the
    staged previous phase when `with_init`) from params (`kubeflow:` placement and trainer settings)."""
    kf = cfg.kubeflow
    place = getattr(kf.stages, stage)
    pool = getattr(kf.pools, place.pool)
    work = work_dir(cfg, stage, parent_run_id, phase)
    stage_args = ["stage", stage, "--root", str(work)]
    if phase:
        stage_args += ["--phase", phase]
    if with_init:
        stage_args += ["--init", str(Layout(root=work).out(INIT_INPUT))]
    resources = {"cpu": place.cpu, "memory": place.memory}
    if place.accelerators:
        resources[pool.accelerator_resource] = str(place.accelerators)
    env = {tracking.PARENT_RUN_ENV: parent_run_id,
           CHECKPOINT_DIR_ENV: str(Path(kf.checkpoints.mount_path) / parent_run_id)}
    if kf.mlflow_tracking_uri:
        env["MLFLOW_TRACKING_URI"] = kf.mlflow_tracking_uri
    tolerations = [{k: v for k, v in dict(key=t.key, operator=t.operator, value=t.value, effect=t.effect).items()
                    if v is not None} for t in pool.tolerations]
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "TrainJob",
        "metadata": {"name": trainjob_name(stage, parent_run_id, phase), "namespace": kf.namespace,
                     "labels": {"app.kubernetes.io/part-of": "cascade", "cascade/stage": stage.replace("_", "-")}},
        "spec": {
            "runtimeRef": {"name": kf.trainer.runtime, "apiGroup": GROUP, "kind": "ClusterTrainingRuntime"},
            "trainer": {
                "image": getattr(kf.images, pool.image),
                # torchrun reads the node grid (PET_NNODES, PET_NODE_RANK, PET_MASTER_ADDR, ...) that the
                # torch-distributed runtime sets; --no-python runs our console script on every process.
                "command": ["torchrun", "--no-python", "cascade", "--params", str(work / "params.yaml"),
                            "--profile", cfg.profile, *stage_args],
                "numNodes": place.nodes,
                "numProcPerNode": max(place.accelerators, 1),
                "resourcesPerNode": {"requests": resources, "limits": resources},
                "env": [{"name": k, "value": v} for k, v in env.items()],
            },
            **node_pod_patch(kf.trainer.pod_patch, {
                "serviceAccountName": kf.service_account,
                "nodeSelector": dict(pool.node_selector),
                "tolerations": tolerations,
                "volumes": [{"name": "checkpoints", "persistentVolumeClaim": {"claimName": kf.checkpoints.pvc}}],
                "containers": [{"name": NODE_JOB, "volumeMounts": [
                    {"name": "checkpoints", "mountPath": kf.checkpoints.mount_path}]}],
            }),
        },
    }


def node_pod_patch(api: str, pod_spec: dict) -> dict:
    """`pod_spec` applied to the runtime's `node` pods, in the shape the installed Trainer takes."""
    if api == "pod_template_overrides":  # Trainer v2.1
        return {"podTemplateOverrides": [{"targetJobs": [{"name": NODE_JOB}], "spec": pod_spec}]}
    pod_template = {"template": {"spec": {"template": {"spec": pod_spec}}}}  # Job -> Pod template
    return {"runtimePatches": [{
        "manager": PATCH_MANAGER,
        "trainingRuntimeSpec": {"template": {"spec": {"replicatedJobs": [{"name": NODE_JOB, **pod_template}]}}},
    }]}


@dataclass(frozen=True)
class TrainJobState:
    phase: str  # Complete | Failed | Suspended | Running | Pending
    message: str


def trainjob_state(obj: dict) -> TrainJobState:
    """The TrainJob's phase from its status conditions (Trainer v2 sets Complete / Failed / Suspended)."""
    conditions = {c.get("type"): c for c in (obj.get("status") or {}).get("conditions") or []}
    for phase in ("Failed", "Complete", "Suspended"):
        cond = conditions.get(phase)
        if cond and cond.get("status") == "True":
            return TrainJobState(phase, cond.get("message") or cond.get("reason") or "")
    jobs = (obj.get("status") or {}).get("jobsStatus") or []
    if any(j.get("active") for j in jobs):
        return TrainJobState("Running", "")
    return TrainJobState("Pending", "")


def _kubernetes_api():
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()  # `cascade` run from a workstation
    return client.CustomObjectsApi()


def run_trainjob(spec: dict, *, api=None, poll_seconds: float = 30, timeout_s: float = 72 * 3600,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic,
                 echo: Callable[[str], None] = print) -> dict:
    """Create (or re-attach to) the TrainJob and wait for it; StageError when it fails or times out."""
    from kubernetes.client.exceptions import ApiException

    api = api or _kubernetes_api()
    ns, name = spec["metadata"]["namespace"], spec["metadata"]["name"]
    try:
        api.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, spec)
        echo(f"TrainJob {ns}/{name}: created ({spec['spec']['trainer']['numNodes']} nodes)")
    except ApiException as err:
        if err.status != 409:
            raise StageError(f"TrainJob {ns}/{name}: the Kubernetes API refused it ({err.status} {err.reason}); "
                             f"check the Trainer is installed and the service account may create trainjobs") from None
        # A retried launcher: keep a live or finished job, replace a failed one (its nodes resume
        # from the checkpoints on the claim).
        existing = api.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
        if trainjob_state(existing).phase == "Failed":
            api.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
            api.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, spec)
            echo(f"TrainJob {ns}/{name}: re-created after a failed attempt")
        else:
            echo(f"TrainJob {ns}/{name}: attached to the existing job")
    deadline = clock() + timeout_s
    last = None
    while True:
        obj = api.get_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
        state = trainjob_state(obj)
        if state != last:
            echo(f"TrainJob {ns}/{name}: {state.phase}" + (f" ({state.message})" if state.message else ""))
            last = state
        if state.phase == "Complete":
            return obj
        if state.phase == "Failed":
            raise StageError(f"TrainJob {ns}/{name} failed: {state.message or 'no message'}; "
                             f"see `kubectl -n {ns} logs -l jobset.sigs.k8s.io/jobset-name={name}`")
        if clock() > deadline:
            api.delete_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, name)
            raise StageError(f"TrainJob {ns}/{name} did not finish within {timeout_s / 3600:g} h "
                             f"(kubeflow.trainer.timeout_hours); deleted it, checkpoints are kept")
        sleep(poll_seconds)


def run_remote_stage(cfg: CascadeConfig, params_text: str, stage: str, parent_run_id: str,
                     inputs: dict[str, Path], output: Path, metrics_file: Path, api=None,
                     phase: str | None = None) -> dict[str, float]:
    """Stage inputs on the claim, run the TrainJob, copy rank 0's outputs back; returns its metrics.
    phase: one PixArt phase of the diffusion base (inputs[INIT_INPUT]: the previous phase's weights)."""
    missing = set(stage_inputs(cfg, stage)) - set(inputs)
    if missing:
        raise StageError(f"{stage}: TrainJob launcher is missing inputs {sorted(missing)}")
    work = work_dir(cfg, stage, parent_run_id, phase)
    layout = Layout(root=work)
    for dep, path in inputs.items():
        shutil.copytree(path, layout.out(dep), dirs_exist_ok=True)
    (work / "params.yaml").write_text(params_text)
    run_trainjob(render_trainjob(cfg, stage, parent_run_id, phase, with_init=INIT_INPUT in inputs), api=api, poll_seconds=cfg.kubeflow.trainer.poll_seconds,
                 timeout_s=cfg.kubeflow.trainer.timeout_hours * 3600)
    if not layout.metrics(stage).is_file():
        raise StageError(f"TrainJob for {stage} completed but wrote no {layout.metrics(stage)}")
    shutil.copytree(layout.out(stage), output, dirs_exist_ok=True)
    metrics = json.loads(layout.metrics(stage).read_text())
    metrics_file.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(layout.metrics(stage), metrics_file)
    return metrics
