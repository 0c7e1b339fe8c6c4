"""infra/k8s: the kustomize tree is complete and well formed, and the objects agree with
params.yaml `kubeflow:` (namespace, service account, MLflow URI, checkpoint PVC) and with
infra/Dockerfile (the MLflow image)."""

from __future__ import annotations

import fnmatch
import re
from urllib.parse import urlparse

import pytest
import yaml

from tests.infra.helpers import (
    K8S, PROFILES, REPO, containers, docker_header_tags, k8s_get, k8s_objects, kubeflow, kustomizations,
    pod_spec,
)

WORKLOAD_KINDS = ("Deployment", "StatefulSet")
# Which namespace each sub-base must land in.
EXPECTED_NAMESPACE = {"mlflow": lambda: "mlflow", "pipeline": lambda: kubeflow("tiny").namespace}


def _workload_containers():
    return [pytest.param(w, c, init, id=f"{w['kind']}/{w['metadata']['name']}/{c['name']}")
            for w in k8s_objects() if w["kind"] in WORKLOAD_KINDS
            for init in (False, True) for c in pod_spec(w).get("initContainers" if init else "containers", [])]


# ----------------------------------------------------------------------------- structure


@pytest.mark.parametrize("kustomization", kustomizations(), ids=lambda p: str(p.relative_to(K8S)))
def test_kustomization_resources_exist_and_none_forgotten(kustomization):
    kust = yaml.safe_load(kustomization.read_text())
    assert kust["apiVersion"] == "kustomize.config.k8s.io/v1beta1" and kust["kind"] == "Kustomization"
    listed = kust.get("resources", [])
    assert listed, f"{kustomization}: no resources"
    for entry in listed:
        path = kustomization.parent / entry
        assert path.is_file() or (path / "kustomization.yaml").is_file(), f"{kustomization}: {entry} does not exist"
        if path.is_file():
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
            assert docs, f"{path}: empty"
    manifests = {p.name for p in kustomization.parent.glob("*.yaml")} - {"kustomization.yaml"}
    assert manifests <= set(listed), f"{kustomization}: not listed in resources: {sorted(manifests - set(listed))}"
    subdirs = {p.name for p in kustomization.parent.iterdir() if (p / "kustomization.yaml").is_file()}
    assert subdirs <= set(listed), f"{kustomization}: sub-bases not listed: {sorted(subdirs - set(listed))}"


def test_top_kustomization_includes_both_sub_bases():
    top = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert set(top["resources"]) == set(EXPECTED_NAMESPACE)


@pytest.mark.parametrize("obj", k8s_objects(), ids=lambda o: f"{o['kind']}/{o['metadata'].get('name')}")
def test_object_well_formed_and_in_its_namespace(obj):
    assert obj.get("apiVersion") and obj.get("kind") and obj.get("metadata", {}).get("name"), obj["_file"]
    sub_base = obj["_file"].split("/")[2]  # infra/k8s/<sub-base>/...
    explicit = obj["metadata"].get("namespace")
    if obj["_namespace"] is None:  # cluster-scoped
        assert explicit is None, f"{obj['_file']}: cluster-scoped {obj['kind']} has a namespace"
        return
    assert obj["_namespace"] == EXPECTED_NAMESPACE[sub_base](), f"{obj['_file']}: {obj['kind']} in {obj['_namespace']}"
    assert explicit in (None, obj["_namespace"]), f"{obj['_file']}: metadata.namespace {explicit} != kustomization's"


def test_namespace_object_only_for_mlflow():
    # kubeflow belongs to the Kubeflow Pipelines install; creating it here would fight over it.
    assert [o["metadata"]["name"] for o in k8s_objects("Namespace")] == ["mlflow"]


# ----------------------------------------------------------------------------- workloads


@pytest.mark.parametrize("workload,container,init", _workload_containers())
def test_container_image_pinned_with_resources_and_probes(workload, container, init):
    image = container["image"]
    name, _, tag = image.rpartition(":")
    assert name and "/" not in tag and tag and tag != "latest" and "@" not in name, f"{image}: pin a tag"
    for section in ("requests", "limits"):
        got = container.get("resources", {}).get(section, {})
        assert {"cpu", "memory"} <= set(got), f"{container['name']}: resources.{section} needs cpu and memory"
    if not init:
        assert "readinessProbe" in container and "livenessProbe" in container, f"{container['name']}: probes"


def test_env_references_resolve():
    """Every secret/configmap/service account a workload names exists in its namespace, with the key."""
    for w in k8s_objects():
        if w["kind"] not in WORKLOAD_KINDS:
            continue
        ns = w["_namespace"]
        if "serviceAccountName" in pod_spec(w):
            k8s_get("ServiceAccount", pod_spec(w)["serviceAccountName"], ns)
        for c in containers(w):
            for src in c.get("envFrom", []):
                for kind, key in (("Secret", "secretRef"), ("ConfigMap", "configMapRef")):
                    if key in src:
                        k8s_get(kind, src[key]["name"], ns)
            for env in c.get("env", []):
                for kind, key in (("Secret", "secretKeyRef"), ("ConfigMap", "configMapKeyRef")):
                    ref = env.get("valueFrom", {}).get(key)
                    if ref:
                        assert ref["key"] in k8s_get(kind, ref["name"], ns)["data"], f"{kind} {ref['name']}: no {ref['key']}"


@pytest.mark.parametrize("service", k8s_objects("Service"), ids=lambda s: s["metadata"]["name"])
def test_service_selects_a_workload_port(service):
    selector = service["spec"]["selector"]
    matches = [w for w in k8s_objects() if w["kind"] in WORKLOAD_KINDS and w["_namespace"] == service["_namespace"]
               and selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()]
    assert len(matches) == 1, f"Service {service['metadata']['name']} selects {len(matches)} workloads"
    ports = {p.get("name"): p["containerPort"] for c in containers(matches[0], init=False) for p in c.get("ports", [])}
    for port in service["spec"]["ports"]:
        target = port.get("targetPort", port["port"])
        assert target in ports or target in ports.values(), f"targetPort {target} not a container port"


def test_secrets_are_placeholders():
    # Real credentials never live in the repository: literal secrets must be CHANGE-ME placeholders.
    assert not [o for o in k8s_objects("Secret") if not o.get("_generated")], "write Secrets via secretGenerator"
    secret = k8s_get("Secret", "mlflow-postgres", "mlflow")
    assert set(secret["data"]) == {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"}
    assert secret["data"]["POSTGRES_PASSWORD"].startswith("CHANGE-ME")


# ----------------------------------------------------------------------------- MLflow


def _mlflow_args() -> dict[str, str]:
    container = next(c for c in containers(k8s_get("Deployment", "mlflow", "mlflow"), init=False) if c["name"] == "mlflow")
    words = container.get("command", []) + container.get("args", [])
    assert words[:2] == ["mlflow", "server"], words
    return dict((w.split("=", 1) + [""])[:2] for w in words[2:])


@pytest.mark.parametrize("profile", PROFILES)
def test_mlflow_service_is_the_tracking_uri(profile):
    uri = urlparse(kubeflow(profile).mlflow_tracking_uri)
    assert uri.scheme == "http" and uri.path in ("", "/")
    m = re.fullmatch(r"([a-z0-9-]+)\.([a-z0-9-]+)\.svc\.cluster\.local", uri.hostname or "")
    assert m, f"{uri.hostname}: not an in-cluster Service DNS name"
    service = k8s_get("Service", m.group(1), m.group(2))
    port = next(p for p in service["spec"]["ports"] if p["port"] == uri.port)
    deployment = k8s_get("Deployment", "mlflow", m.group(2))
    container_ports = {p["name"]: p["containerPort"] for c in containers(deployment, False) for p in c.get("ports", [])}
    assert container_ports[port["targetPort"]] == int(_mlflow_args()["--port"])
    # MLflow >= 3.5 answers 403 to Host headers it does not allow: the URI's host:port must be allowed.
    allowed = k8s_get("ConfigMap", "mlflow-config", m.group(2))["data"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert any(fnmatch.fnmatch(uri.netloc, a) if "*" in a else uri.netloc == a for a in allowed), uri.netloc


def test_mlflow_image_is_the_dockerfile_target():
    deployment = k8s_get("Deployment", "mlflow", "mlflow")
    image = next(c["image"] for c in containers(deployment, False) if c["name"] == "mlflow")
    assert image == docker_header_tags()["mlflow"]
    pinned = re.search(r'"mlflow==([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert image.endswith(f":{pinned}"), "server and clients must run the same MLflow version"


def test_mlflow_server_uses_postgres_and_proxied_artifacts():
    args = _mlflow_args()
    assert args["--host"] == "0.0.0.0"
    store = re.fullmatch(r"postgresql://\$\(POSTGRES_USER\):\$\(POSTGRES_PASSWORD\)@([\w-]+):(\d+)/\$\(POSTGRES_DB\)",
                         args["--backend-store-uri"])
    assert store, args["--backend-store-uri"]
    pg = k8s_get("Service", store.group(1), "mlflow")
    assert int(store.group(2)) in [p["port"] for p in pg["spec"]["ports"]]
    assert k8s_get("StatefulSet", store.group(1), "mlflow")["spec"]["volumeClaimTemplates"]
    assert "--serve-artifacts" in args and args["--artifacts-destination"] == "$(ARTIFACTS_DESTINATION)"
    destination = k8s_get("ConfigMap", "mlflow-config", "mlflow")["data"]["ARTIFACTS_DESTINATION"]
    assert re.fullmatch(r"(gs|s3)://[\w.-]+/mlflow", destination), destination


def test_mlflow_workload_identity_annotation():
    sa = k8s_get("ServiceAccount", "mlflow", "mlflow")
    assert re.fullmatch(r"mlflow@[\w-]+\.iam\.gserviceaccount\.com", sa["metadata"]["annotations"]["iam.gke.io/gcp-service-account"])


# ----------------------------------------------------------------------------- pipeline namespace


@pytest.mark.parametrize("profile", PROFILES)
def test_pipeline_service_account(profile):
    kf = kubeflow(profile)
    k8s_get("ServiceAccount", kf.service_account, kf.namespace)


def _rules_bound_to(sa: str, namespace: str, cluster: bool) -> list[dict]:
    binding_kind, role_kind = ("ClusterRoleBinding", "ClusterRole") if cluster else ("RoleBinding", "Role")
    rules = []
    for binding in k8s_objects(binding_kind):
        if not cluster and binding["_namespace"] != namespace:
            continue
        if any(s["kind"] == "ServiceAccount" and s["name"] == sa and s.get("namespace", binding["_namespace"]) == namespace
               for s in binding["subjects"]):
            ref = binding["roleRef"]
            assert ref["kind"] == role_kind
            roles = [r for r in k8s_objects(role_kind) if r["metadata"]["name"] == ref["name"]]
            rules += [rule for role in roles for rule in role["rules"]]  # roles from other installs: none here
    return rules


def _allowed(rules: list[dict], group: str, resource: str) -> set[str]:
    return {verb for r in rules if group in r["apiGroups"] and resource in r["resources"] for verb in r["verbs"]}


@pytest.mark.parametrize("profile", PROFILES)
def test_service_account_may_run_trainjobs(profile):
    kf = kubeflow(profile)
    rules = _rules_bound_to(kf.service_account, kf.namespace, cluster=False)
    assert {"create", "get", "list", "watch", "delete"} <= _allowed(rules, "trainer.kubeflow.org", "trainjobs")
    assert "get" in _allowed(rules, "trainer.kubeflow.org", "trainingruntimes")
    for resource in ("pods", "pods/log"):
        assert {"get", "list", "watch"} <= _allowed(rules, "", resource), resource
    cluster_rules = _rules_bound_to(kf.service_account, kf.namespace, cluster=True)
    assert {"get", "list"} <= _allowed(cluster_rules, "trainer.kubeflow.org", "clustertrainingruntimes")


@pytest.mark.parametrize("profile", PROFILES)
def test_checkpoint_pvc(profile):
    kf = kubeflow(profile)
    pvc = k8s_get("PersistentVolumeClaim", kf.checkpoints.pvc, kf.namespace)
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"], "retried tasks and TrainJob nodes share the claim"
    assert pvc["spec"]["storageClassName"] == "standard-rwx"
    assert pvc["spec"]["resources"]["requests"]["storage"].endswith(("Gi", "Ti"))
