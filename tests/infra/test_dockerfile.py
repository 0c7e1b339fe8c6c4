"""infra/Dockerfile: the four targets, their tags (= params.yaml kubeflow.images), pinned bases and
versions consistent with pyproject.toml, and a .dockerignore that keeps local state out."""

from __future__ import annotations

import fnmatch
import re

import pytest

from tests.infra.helpers import (
    PROFILES, REPO, docker_expand, docker_global_args, docker_header_tags, docker_stage_chain, docker_stages,
    dockerfile_instructions, kubeflow,
)

CASCADE_TARGETS = ("cpu", "gpu", "tpu")
SHARED_ENV = {"PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1",
              "TRANSFORMERS_OFFLINE": "1", "GX_ANALYTICS_ENABLED": "false"}


def _pin(package: str) -> str:
    return re.search(rf'"{package}==([^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)


def _run_lines(target: str) -> list[str]:
    """RUN commands of the target and the stages it builds on, ARGs expanded."""
    stages = docker_stages()
    return [docker_expand(args) for name in docker_stage_chain(target)
            for instr, args in stages[name]["lines"] if instr == "RUN"]


def _env(target: str) -> dict[str, str]:
    env: dict[str, str] = {}
    stages = docker_stages()
    for name in reversed(docker_stage_chain(target)):
        for instr, args in stages[name]["lines"]:
            if instr == "ENV":
                env.update(re.findall(r"(\w+)=(\S+)", args))
    return env


def test_targets():
    assert {"cpu", "gpu", "tpu", "mlflow"} <= set(docker_stages())


@pytest.mark.parametrize("profile", PROFILES)
def test_header_tags_are_params_images(profile):
    tags = docker_header_tags()
    assert set(tags) == {"cpu", "gpu", "tpu", "mlflow"}, "header: one docker build line per target"
    images = kubeflow(profile).images
    assert {t: tags[t] for t in CASCADE_TARGETS} == {"cpu": images.cpu, "gpu": images.gpu, "tpu": images.tpu}
    assert tags["mlflow"] == f"ghcr.io/cascade-t2i/mlflow:{_pin('mlflow')}"


def test_base_images_pinned():
    stages = docker_stages()
    for name, stage in stages.items():
        base = stage["base"]
        if base in stages:
            continue
        assert "$" not in base, f"{name}: unresolved {base}"
        image, _, tag = base.rpartition(":")
        assert image and "/" not in tag and tag and "latest" not in tag, f"stage {name}: FROM {base}: pin a tag"


@pytest.mark.parametrize("target", CASCADE_TARGETS)
def test_cascade_targets_install_torch_and_the_package(target):
    torch = _pin("torch")
    assert docker_global_args()["TORCH_VERSION"] == torch == "2.13.0"
    runs = _run_lines(target)
    assert any(re.search(rf"pip install torch=={re.escape(torch)}\b", r) for r in runs), f"{target}: torch=={torch}"
    assert any("pip install -c requirements.lock ." in r for r in runs), f"{target}: install the package"
    assert any("command -v torchrun" in r and "cascade --help" in r for r in runs), f"{target}: check PATH"
    assert {k: _env(target).get(k) for k in SHARED_ENV} == SHARED_ENV


def test_gpu_target_on_cuda_matching_torch_wheel():
    base = docker_stages()["gpu"]["base"]
    m = re.fullmatch(r"nvidia/cuda:(\d+)\.(\d+)\.\d+-cudnn-runtime-ubuntu(22|24)\.04", base)
    assert m, f"gpu base {base}: an nvidia/cuda cudnn-runtime Ubuntu image"
    cuda = docker_global_args()["TORCH_CUDA"]
    assert cuda == f"cu{m.group(1)}{m.group(2)}", f"torch wheel index {cuda} vs CUDA {m.group(1)}.{m.group(2)} base"
    assert any(f"--index-url https://download.pytorch.org/whl/{cuda}" in r for r in _run_lines("gpu"))
    assert any("uv venv --python 3.11" in r for r in _run_lines("gpu")), "Python 3.11 like the other targets"


def test_tpu_target_torch_xla_matches_torch_minor():
    xla = docker_global_args()["TORCH_XLA_VERSION"]
    assert xla.split(".")[:2] == _pin("torch").split(".")[:2]
    assert any('"torch_xla[tpu]==' + xla + '"' in r for r in _run_lines("tpu"))


def test_mlflow_target():
    runs = _run_lines("mlflow")
    pins = dict(re.findall(r"([\w-]+)==([\d.]+)", " ".join(runs)))
    assert pins["mlflow"] == _pin("mlflow")
    assert {"psycopg2-binary", "google-cloud-storage", "boto3"} <= set(pins), "postgres, GCS and S3 clients"
    assert docker_stages()["mlflow"]["base"].startswith("python:3.11")
    assert {k: _env("mlflow").get(k) for k in SHARED_ENV} == SHARED_ENV


def test_no_entrypoint():
    # KFP supplies each task's command; an ENTRYPOINT would be prepended to it.
    assert "ENTRYPOINT" not in {instr for instr, _ in dockerfile_instructions()}


def _dockerignore() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def _ignored(path: str) -> bool:
    ignored = False
    for pattern in _dockerignore():
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.replace("**/", "")) for p in prefixes):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_state_out_and_sources_in():
    for path in (".venv", ".git", "artifacts", "checkpoints", "mlruns", "mlflow.db", "metrics", "plots",
                 ".dvc/cache", ".dvc/tmp", "components/__pycache__", "cascade.egg-info"):
        assert _ignored(path), f".dockerignore: {path} would be sent to the build"
    sources = {src for instr, args in dockerfile_instructions() if instr == "COPY" and "--from" not in args
               for src in args.split()[:-1]}
    assert sources, "no COPY found"
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: missing"
        assert not _ignored(src), f".dockerignore excludes {src}, which the Dockerfile copies"
