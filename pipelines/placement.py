"""Per-stage placement of the KFP tasks: image, resources, node pool, accelerators, PVC, retries.

Everything comes from params.yaml's `kubeflow:` section of the profile being compiled (placement is
fixed at compile time; Kubernetes needs it before a pod exists). `check_placement` refuses
settings that could only fail on the cluster, with the params key to fix.
"""

from __future__ import annotations

from kfp import kubernetes

from components.config import CascadeConfig, ConfigError, KubeflowConfig, StagePlacement
from components.stage import CHECKPOINT_DIR_ENV

# Stages that train with Lightning: they checkpoint, can resume, and may span nodes (TrainJob).
TRAINING_STAGES = ("evaluator", "tokenizer", "base", "superres", "decoder_ft")
# What the launcher of a multi-node stage asks for: it only stages files and watches the TrainJob.
LAUNCHER = StagePlacement(pool="cpu", cpu="2", memory="8Gi", accelerators=0, nodes=1)


def check_placement(cfg: CascadeConfig) -> None:
    """Settings that Kubernetes or Lightning would reject later, refused now with the key to fix."""
    kf = cfg.kubeflow
    for stage in kf.stages.__dataclass_fields__:
        place: StagePlacement = getattr(kf.stages, stage)
        key = f"kubeflow.stages.{stage}"
        pool = getattr(kf.pools, place.pool)
        if place.accelerators < 0 or place.nodes < 1:
            raise ConfigError(f"params.yaml: {key}: accelerators must be >= 0 and nodes >= 1")
        if place.accelerators and not pool.accelerator_resource:
            raise ConfigError(f"params.yaml: {key}: asks for {place.accelerators} accelerators but pool "
                              f"{place.pool!r} has no accelerator_resource (kubeflow.pools.{place.pool})")
        if place.nodes > 1 and stage not in TRAINING_STAGES:
            raise ConfigError(f"params.yaml: {key}.nodes: only training stages ({', '.join(TRAINING_STAGES)}) "
                              f"can span nodes; {stage} runs on one")
        if place.nodes > 1 and place.pool == "tpu":
            raise ConfigError(f"params.yaml: {key}: multi-host TPU slices are not run through the torch-distributed "
                              "TrainJob runtime; use one TPU host (nodes: 1) or the gpu pool")
        if stage in TRAINING_STAGES and place.accelerators:
            section = stage
            if stage in ("base", "superres") and cfg.generator.family == "diffusion":
                section = f"diffusion.{stage}"  # the diffusion family's training settings
            node = cfg
            for part in section.split("."):
                node = getattr(node, part)
            devices = node.train.devices
            if devices != place.accelerators:
                raise ConfigError(f"params.yaml: {key}.accelerators ({place.accelerators}) must equal "
                                  f"{section}.train.devices ({devices}): Lightning trains on one process per accelerator")


def image_for(kf: KubeflowConfig, place: StagePlacement) -> str:
    return getattr(kf.images, getattr(kf.pools, place.pool).image)


def place_task(task, stage: str, kf: KubeflowConfig) -> None:
    """Apply the stage's placement to its KFP task (a multi-node stage's task is only the launcher)."""
    place: StagePlacement = getattr(kf.stages, stage)
    pod = LAUNCHER if place.nodes > 1 else place
    pool = getattr(kf.pools, pod.pool)
    task.set_container_image(image_for(kf, pod))
    task.set_cpu_request(pod.cpu).set_cpu_limit(pod.cpu)
    task.set_memory_request(pod.memory).set_memory_limit(pod.memory)
    if pod.accelerators:
        task.set_accelerator_type(pool.accelerator_resource).set_accelerator_limit(pod.accelerators)
    _on_pool(task, pool, kf)
    if stage in TRAINING_STAGES:
        # Checkpoints (and a TrainJob's staged inputs/outputs) live on the shared claim, so a
        # retried task resumes instead of starting over.
        kubernetes.mount_pvc(task, pvc_name=kf.checkpoints.pvc, mount_path=kf.checkpoints.mount_path)
        task.set_env_variable(CHECKPOINT_DIR_ENV, kf.checkpoints.mount_path)
    task.set_retry(num_retries=kf.retry.attempts, backoff_duration=kf.retry.backoff,
                   backoff_factor=kf.retry.factor, backoff_max_duration=kf.retry.max_backoff)


def place_service_task(task, kf: KubeflowConfig) -> None:
    """The MLflow bookkeeping tasks (open/close the parent run): CPU pool, small, no retry (a retried
    start would open a second parent run)."""
    task.set_container_image(kf.images.cpu)
    task.set_cpu_request("500m").set_memory_request("1Gi").set_memory_limit("2Gi")
    _on_pool(task, kf.pools.cpu, kf)


def _on_pool(task, pool, kf: KubeflowConfig) -> None:
    """The pool's node selector and tolerations, and the MLflow server every task logs to."""
    for label, value in pool.node_selector.items():
        kubernetes.add_node_selector(task, label_key=label, label_value=value)
    for tol in pool.tolerations:
        kubernetes.add_toleration(task, key=tol.key, operator=tol.operator, value=tol.value, effect=tol.effect)
    if kf.mlflow_tracking_uri:
        task.set_env_variable("MLFLOW_TRACKING_URI", kf.mlflow_tracking_uri)
