"""Readers for infra/: kustomize trees, Terraform (python-hcl2) and the Dockerfile. Static only:
no network, no docker, no kubectl, no terraform binary."""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

import hcl2
import yaml

from components.config import KubeflowConfig, load_config

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
TF_DIR = INFRA / "terraform" / "gke"
DOCKERFILE = INFRA / "Dockerfile"
PROFILES = ("tiny", "smoke", "base256")
# Kinds without a namespace (what kustomize's namespace transformer leaves alone).
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume", "StorageClass",
                  "CustomResourceDefinition"}


@lru_cache(maxsize=None)
def kubeflow(profile: str) -> KubeflowConfig:
    return load_config(REPO / "params.yaml", profile).kubeflow


# ----------------------------------------------------------------------------------- kustomize


def kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


def _kustomize(directory: Path, namespace: str | None = None) -> list[dict]:
    """The objects a kustomization builds: listed files and sub-bases, plus generated
    Secrets/ConfigMaps; each tagged with `_file` and `_namespace` (the effective namespace)."""
    kust = yaml.safe_load((directory / "kustomization.yaml").read_text())
    namespace = kust.get("namespace", namespace)
    objects: list[dict] = []
    for entry in kust.get("resources", []):
        path = directory / entry
        if path.is_dir():
            objects += _kustomize(path, namespace)
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is None:
                continue
            doc["_file"] = str(path.relative_to(REPO))
            doc["_namespace"] = None if doc.get("kind") in CLUSTER_SCOPED else (
                namespace or doc.get("metadata", {}).get("namespace"))
            objects.append(doc)
    for kind, key in (("Secret", "secretGenerator"), ("ConfigMap", "configMapGenerator")):
        for gen in kust.get(key, []):
            data = dict(literal.split("=", 1) for literal in gen.get("literals", []))
            objects.append({"apiVersion": "v1", "kind": kind, "metadata": {"name": gen["name"]}, "data": data,
                            "_file": str((directory / "kustomization.yaml").relative_to(REPO)),
                            "_namespace": gen.get("namespace", namespace), "_generated": True})
    return objects


@lru_cache(maxsize=None)
def _objects() -> tuple:
    return tuple(_kustomize(K8S))


def k8s_objects(kind: str | None = None) -> list[dict]:
    return [o for o in _objects() if kind is None or o["kind"] == kind]


def k8s_get(kind: str, name: str, namespace: str | None = None) -> dict:
    found = [o for o in k8s_objects(kind) if o["metadata"]["name"] == name
             and (namespace is None or o["_namespace"] == namespace)]
    assert len(found) == 1, f"expected one {kind} {namespace}/{name} in infra/k8s, found {len(found)}"
    return found[0]


def pod_spec(workload: dict) -> dict:
    return workload["spec"]["template"]["spec"]


def containers(workload: dict, init: bool = True) -> list[dict]:
    spec = pod_spec(workload)
    return spec.get("containers", []) + (spec.get("initContainers", []) if init else [])


# ----------------------------------------------------------------------------------- terraform

_HCL = hcl2.SerializationOptions(strip_string_quotes=True, explicit_blocks=False, with_comments=False)


@lru_cache(maxsize=None)
def terraform() -> dict:
    """All *.tf files of infra/terraform/gke merged: {block type: [blocks...]}."""
    merged: dict[str, list] = {}
    for path in sorted(TF_DIR.glob("*.tf")):
        with path.open() as fh:
            for key, blocks in hcl2.load(fh, serialization_options=_HCL).items():
                merged.setdefault(key, []).extend(blocks)
    return merged


def tf_variables() -> dict:
    return {name: body.get("default") for block in terraform()["variable"] for name, body in block.items()}


def tf_locals() -> dict:
    return {k: v for block in terraform().get("locals", []) for k, v in block.items()}


def tf_resources(rtype: str) -> dict[str, dict]:
    return {name: body for block in terraform()["resource"] for t, named in block.items() if t == rtype
            for name, body in named.items()}


def tf_resolve(value):
    """Substitute ${var.NAME} (variable defaults) and ${local.NAME[var.X].field}-free ${local.NAME};
    a whole-string reference keeps its type (e.g. a number)."""
    if not isinstance(value, str):
        return value
    variables, locals_ = tf_variables(), tf_locals()

    def lookup(ref: str):
        scope, _, name = ref.partition(".")
        if scope == "var" and name in variables:
            return variables[name]
        if scope == "local" and "." not in name and name in locals_:
            return locals_[name]
        if scope == "local" and name.startswith("tpu."):  # local.tpu = tpu_machine_types[var.tpu_machine_type]
            return locals_["tpu_machine_types"][variables["tpu_machine_type"]][name.split(".", 1)[1]]
        raise KeyError(f"cannot resolve ${{{ref}}} statically")

    whole = re.fullmatch(r"\$\{([\w.]+)\}", value)
    if whole:
        return tf_resolve(lookup(whole.group(1)))
    return re.sub(r"\$\{([\w.]+)\}", lambda m: str(tf_resolve(lookup(m.group(1)))), value)


def node_pool(name: str) -> dict:
    pools = [body for body in tf_resources("google_container_node_pool").values() if body["name"] == name]
    assert len(pools) == 1, f"expected one google_container_node_pool named {name!r}, found {len(pools)}"
    return pools[0]


def block(body: dict, name: str) -> dict:
    """The single nested block `name` of a Terraform body (python-hcl2 gives blocks as lists)."""
    value = body[name]
    blocks = value if isinstance(value, list) else [value]
    assert len(blocks) == 1, f"expected one {name} block, found {len(blocks)}"
    return blocks[0]


def blocks(body: dict, name: str) -> list[dict]:
    value = body.get(name, [])
    return value if isinstance(value, list) else [value]


# ----------------------------------------------------------------------------------- Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            instr, _, args = line.partition(" ")
            out.append((instr.upper(), args.strip()))
    return out


def docker_global_args() -> dict[str, str]:
    args: dict[str, str] = {}
    for instr, rest in dockerfile_instructions():
        if instr == "FROM":
            break
        if instr == "ARG" and "=" in rest:
            name, value = rest.split("=", 1)
            args[name] = value
    return args


def docker_expand(text: str) -> str:
    args = docker_global_args()
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args.get(m.group(1) or m.group(2), m.group(0)), text)


def docker_stages() -> dict[str, dict]:
    """{stage name: {"base": image or parent stage, "lines": [(INSTRUCTION, args), ...]}}."""
    stages: dict[str, dict] = {}
    current = None
    for instr, rest in dockerfile_instructions():
        if instr == "FROM":
            m = re.fullmatch(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", rest, re.IGNORECASE)
            assert m and m.group(2), f"every FROM must name its stage: FROM {rest}"
            current = m.group(2)
            stages[current] = {"base": docker_expand(m.group(1)), "lines": []}
        elif current is not None:
            stages[current]["lines"].append((instr, rest))
    return stages


def docker_stage_chain(name: str) -> list[str]:
    """The stage and the stages it is built FROM, nearest first."""
    stages, chain = docker_stages(), [name]
    while stages[chain[-1]]["base"] in stages:
        chain.append(stages[chain[-1]]["base"])
    return chain


def docker_header_tags() -> dict[str, str]:
    """{target: tag} from the header's `docker build --target X -t TAG -f infra/Dockerfile .` lines."""
    pattern = r"^#\s+docker build --target (\S+)\s+-t (\S+)\s+-f infra/Dockerfile \.\s*$"
    return {m.group(1): m.group(2) for m in re.finditer(pattern, DOCKERFILE.read_text(), re.MULTILINE)}
