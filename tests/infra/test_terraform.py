"""infra/terraform/gke agrees with params.yaml `kubeflow:`: pool names and the labels GKE puts on
their nodes match the pools' node selectors, taints match tolerations, and every stage's
accelerators, node count, CPU and memory fit the pool it is placed on (for every profile)."""

from __future__ import annotations

import re

import pytest

from tests.infra.helpers import (
    PROFILES, block, blocks, k8s_get, kubeflow, node_pool, terraform, tf_locals, tf_resolve, tf_resources,
    tf_variables,
)

POOLS = {"cpu": "cpu-pool", "gpu": "gpu-pool", "tpu": "tpu-pool"}
EFFECTS = {"NO_SCHEDULE": "NoSchedule", "PREFER_NO_SCHEDULE": "PreferNoSchedule", "NO_EXECUTE": "NoExecute"}
# Independent of the Terraform's own table: TPU machine family -> GKE's gke-tpu-accelerator label.
TPU_FAMILIES = {"ct4p": "tpu-v4-podslice", "ct5lp": "tpu-v5-lite-podslice", "ct5p": "tpu-v5p-slice",
                "ct6e": "tpu-v6e-slice"}
# Machine type -> (vCPUs, memory GiB, accelerators per node), from the Compute Engine machine docs.
MACHINES = {
    "e2-standard-8": (8, 32, 0), "e2-standard-16": (16, 64, 0), "e2-standard-32": (32, 128, 0),
    "n2-standard-16": (16, 64, 0), "a3-highgpu-8g": (208, 1872, 8), "ct5lp-hightpu-1t": (24, 48, 1),
    "ct5lp-hightpu-4t": (112, 192, 4), "ct5lp-hightpu-8t": (224, 384, 8),
}
DAEMONSET_HEADROOM = (0.5, 1.0)  # CPUs, GiB left for GKE's own per-node pods


def _stages(profile: str, pools: tuple[str, ...] = ("cpu", "gpu", "tpu")):
    stages = kubeflow(profile).stages
    return [(name, getattr(stages, name)) for name in stages.__dataclass_fields__
            if getattr(stages, name).pool in pools]


def _stage_params(pools=("cpu", "gpu", "tpu")):
    return [pytest.param(p, name, place, id=f"{p}-{name}") for p in PROFILES for name, place in _stages(p, pools)]


def _pool_params():
    return [pytest.param(p, pool, id=f"{p}-{pool}") for p in PROFILES for pool in POOLS]


def _accelerators_per_node(pool: str) -> int:
    if pool == "gpu":
        return tf_resolve(block(block(node_pool("gpu-pool"), "node_config"), "guest_accelerator")["count"])
    if pool == "tpu":
        return tf_resolve("${local.tpu.chips}")
    return 0


def _machine_type(pool: str) -> str:
    return tf_resolve(block(node_pool(POOLS[pool]), "node_config")["machine_type"])


def _cpu(q: str) -> float:
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def _gib(q: str) -> float:
    units = {"Ki": 2**-20, "Mi": 2**-10, "Gi": 1, "Ti": 2**10}
    m = re.fullmatch(r"([\d.]+)(Ki|Mi|Gi|Ti)", q)
    assert m, f"memory {q!r}: use Ki/Mi/Gi/Ti"
    return float(m.group(1)) * units[m.group(2)]


def _allocatable(vcpus: float, mem: float) -> tuple[float, float]:
    """GKE Standard node allocatable (its documented reservation tiers), minus daemonset headroom."""
    cpu_res = sum(rate * max(0.0, min(vcpus, hi) - lo) for lo, hi, rate in
                  ((0, 1, 0.06), (1, 2, 0.01), (2, 4, 0.005), (4, float("inf"), 0.0025)))
    mem_res = sum(rate * max(0.0, min(mem, hi) - lo) for lo, hi, rate in
                  ((0, 4, 0.25), (4, 8, 0.2), (8, 16, 0.1), (16, 128, 0.06), (128, float("inf"), 0.02))) + 0.1
    return vcpus - cpu_res - DAEMONSET_HEADROOM[0], mem - mem_res - DAEMONSET_HEADROOM[1]


# ----------------------------------------------------------------------------- provider, cluster


def test_versions_pinned():
    tf = terraform()["terraform"][0]
    assert tf["required_version"] == ">= 1.5"
    google = tf["required_providers"][0]["google"]
    assert google["source"] == "hashicorp/google" and re.fullmatch(r"~> 6\.\d+(\.\d+)?", google["version"])


def test_cluster():
    (cluster,) = tf_resources("google_container_cluster").values()
    assert cluster["remove_default_node_pool"] is True
    assert tf_resolve(cluster["name"]) == "cascade"
    assert block(cluster, "workload_identity_config")["workload_pool"] == "${local.workload_pool}"
    assert tf_locals()["workload_pool"] == "${var.project_id}.svc.id.goog"
    assert tf_resolve(block(cluster, "release_channel")["channel"]) in ("RAPID", "REGULAR", "STABLE")
    # standard-rwx (the checkpoint PVC's class) exists only with the Filestore CSI driver on.
    addons = block(cluster, "addons_config")
    assert block(addons, "gcp_filestore_csi_driver_config")["enabled"] is True
    pvc = k8s_get("PersistentVolumeClaim", kubeflow("tiny").checkpoints.pvc)
    assert pvc["spec"]["storageClassName"] == "standard-rwx"


def test_exactly_the_three_pools():
    names = sorted(body["name"] for body in tf_resources("google_container_node_pool").values())
    assert names == sorted(POOLS.values())
    for body in tf_resources("google_container_node_pool").values():
        assert body["cluster"] == "${google_container_cluster.cascade.id}"
        assert block(block(body, "node_config"), "workload_metadata_config")["mode"] == "GKE_METADATA"
        scaling = block(body, "autoscaling")
        assert 0 <= tf_resolve(scaling["min_node_count"]) <= tf_resolve(scaling["max_node_count"])


# ----------------------------------------------------------------------------- labels and taints


@pytest.mark.parametrize("profile,pool", _pool_params())
def test_node_selector_matches_gke_node_labels(profile, pool):
    selector = getattr(kubeflow(profile).pools, pool).node_selector
    labels = {k: tf_resolve(v) for k, v in tf_locals()["node_labels"][pool].items()}
    assert labels["cloud.google.com/gke-nodepool"] == POOLS[pool]
    assert selector and selector.items() <= labels.items(), f"{pool}: {selector} vs GKE labels {labels}"


@pytest.mark.parametrize("profile", PROFILES)
def test_gpu_accelerator_type(profile):
    accelerator = block(block(node_pool("gpu-pool"), "node_config"), "guest_accelerator")
    wanted = kubeflow(profile).pools.gpu.node_selector["cloud.google.com/gke-accelerator"]
    assert tf_resolve(accelerator["type"]) == wanted
    assert block(accelerator, "gpu_driver_installation_config")["gpu_driver_version"] == "LATEST"
    assert kubeflow(profile).pools.gpu.accelerator_resource == "nvidia.com/gpu"
    machine = _machine_type("gpu")
    assert tf_resolve(accelerator["count"]) == MACHINES[machine][2], f"{machine} has {MACHINES[machine][2]} GPUs"


@pytest.mark.parametrize("profile", PROFILES)
def test_tpu_machine_type_matches_selector(profile):
    machine = _machine_type("tpu")
    family, chips = re.fullmatch(r"(ct\w+?)-hightpu-(\d+)t", machine).groups()
    tpu = kubeflow(profile).pools.tpu
    assert tpu.node_selector["cloud.google.com/gke-tpu-accelerator"] == TPU_FAMILIES[family]
    topology = tpu.node_selector["cloud.google.com/gke-tpu-topology"]
    assert topology == tf_resolve("${local.tpu.topology}")
    product = 1
    for dim in topology.split("x"):
        product *= int(dim)
    assert product == int(chips) == tf_resolve("${local.tpu.chips}") == MACHINES[machine][2]
    assert tpu.accelerator_resource == "google.com/tpu"
    # single-host slice: no multi-host placement policy
    assert "placement_policy" not in node_pool("tpu-pool")


@pytest.mark.parametrize("profile,pool", _pool_params())
def test_taints_match_tolerations(profile, pool):
    taints = {(t["key"], tf_resolve(t["value"]), EFFECTS[t["effect"]])
              for t in blocks(block(node_pool(POOLS[pool]), "node_config"), "taint")}
    tolerations = getattr(kubeflow(profile).pools, pool).tolerations
    for key, value, effect in taints:  # else the pool's pods could never schedule there
        assert any(t.key == key and t.effect == effect and (t.operator == "Exists" or t.value == value)
                   for t in tolerations), f"{POOLS[pool]} taint {key}={value}:{effect} is not tolerated"
    for t in tolerations:  # a toleration with no taint means params and Terraform drifted apart
        assert (t.key, t.effect) in {(k, e) for k, _, e in taints}, f"{pool}: no taint for toleration {t.key}"


# ----------------------------------------------------------------------------- capacity


@pytest.mark.parametrize("profile,stage,place", _stage_params(("gpu", "tpu")))
def test_stage_accelerators_fit_one_node(profile, stage, place):
    assert place.accelerators <= _accelerators_per_node(place.pool), (
        f"{profile}: kubeflow.stages.{stage} asks {place.accelerators} accelerators per node; "
        f"{POOLS[place.pool]} nodes have {_accelerators_per_node(place.pool)}")


@pytest.mark.parametrize("profile,stage,place", _stage_params())
def test_stage_fits_pool(profile, stage, place):
    scaling = block(node_pool(POOLS[place.pool]), "autoscaling")
    assert place.nodes <= tf_resolve(scaling["max_node_count"]), f"{stage}: {place.nodes} nodes > pool maximum"
    vcpus, mem, _ = MACHINES[_machine_type(place.pool)]
    cpu_ok, mem_ok = _allocatable(vcpus, mem)
    assert _cpu(place.cpu) <= cpu_ok, f"{profile}: {stage} asks {place.cpu} CPUs; a {place.pool} node has ~{cpu_ok:.1f}"
    assert _gib(place.memory) <= mem_ok, f"{profile}: {stage} asks {place.memory}; a {place.pool} node has ~{mem_ok:.0f}Gi"


def test_pool_sizes():
    variables = tf_variables()
    assert (variables["cpu_min_nodes"], variables["cpu_max_nodes"]) == (1, 4)
    assert (variables["gpu_min_nodes"], variables["gpu_max_nodes"]) == (0, 4)
    assert (variables["tpu_min_nodes"], variables["tpu_max_nodes"]) == (0, 2)
    assert variables["gpu_machine_type"] == "a3-highgpu-8g" and variables["tpu_machine_type"] == "ct5lp-hightpu-8t"


# ----------------------------------------------------------------------------- identities


@pytest.mark.parametrize("gsa,namespace_var,ksa_var", [("mlflow", "mlflow_namespace", "mlflow_service_account"),
                                                        ("pipeline", "pipeline_namespace", "pipeline_service_account")])
def test_workload_identity(gsa, namespace_var, ksa_var):
    variables = tf_variables()
    namespace, ksa = variables[namespace_var], variables[ksa_var]
    if gsa == "pipeline":
        kf = kubeflow("tiny")
        assert (namespace, ksa) == (kf.namespace, kf.service_account)
    account_id = tf_resolve(tf_resources("google_service_account")[gsa]["account_id"])
    annotation = k8s_get("ServiceAccount", ksa, namespace)["metadata"]["annotations"]["iam.gke.io/gcp-service-account"]
    assert annotation.split("@")[0] == account_id
    bindings = [b for b in tf_resources("google_service_account_iam_member").values()
                if b["service_account_id"] == f"${{google_service_account.{gsa}.name}}"]
    assert len(bindings) == 1 and bindings[0]["role"] == "roles/iam.workloadIdentityUser"
    assert bindings[0]["member"] == f"serviceAccount:${{local.workload_pool}}[${{var.{namespace_var}}}/${{var.{ksa_var}}}]"
    bucket_roles = [b["role"] for b in tf_resources("google_storage_bucket_iam_member").values()
                    if b["member"] == f"serviceAccount:${{google_service_account.{gsa}.email}}"]
    assert bucket_roles == ["roles/storage.objectAdmin"]
