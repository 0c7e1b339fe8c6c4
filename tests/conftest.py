"""Shared fixtures. Tests run from the repo root on CPU; nothing touches the network."""

import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from components.config import load_config

REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Stage subprocesses (dvc, kfp.local, torchrun) inherit this: with two xdist workers on 2 cores, two
# OpenMP threads per process would oversubscribe the cores (see one_torch_thread).
os.environ.setdefault("OMP_NUM_THREADS", "1")


def slow_tests_first(items: list) -> list:
    """`slow` tests first, each followed by a fast one.

    `make test` runs two xdist workers that are handed two tests each to start with, then one at a
    time (--maxschedchunk 1). Interleaved this way, no worker starts with two slow tests, and the
    end-to-end runs start early on separate workers instead of queueing behind each other at the end.
    """
    slow = [item for item in items if item.get_closest_marker("slow")]
    fast = [item for item in items if not item.get_closest_marker("slow")]
    ordered = []
    for item in slow:
        ordered.append(item)
        if fast:
            ordered.append(fast.pop(0))
    return ordered + fast


def pytest_collection_modifyitems(config, items):
    """Order the slow tests first (`slow_tests_first`); `gpu` tests run only where CUDA is present
    (a lent GPU machine); CI has none and skips them."""
    import torch

    items[:] = slow_tests_first(items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none present)")
    for item in items:
        if item.get_closest_marker("gpu"):  # the marker, not the keyword: a parameter id "gpu" is no GPU test
            item.add_marker(skip)


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tests use tiny models, which gain nothing from intra-op threads; on a busy 2-core machine
    OpenMP barriers make each op wait for a descheduled thread (seconds per forward)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sigkill_after_checkpoint(script: Path, checkpoint: Path, timeout: float = 120) -> int:
    """Run python `script`, SIGKILL it once `checkpoint` exists (and a moment more); its return code."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    while not checkpoint.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    time.sleep(0.5)  # let it get past the first checkpoint
    os.kill(proc.pid, signal.SIGKILL)
    return proc.wait()


def free_port() -> int:
    """A free local port below the kernel's ephemeral range.

    bind(0) hands out an ephemeral port, which a rank still retrying its connection can be given as
    its own source port: it then connects to itself (TCP self-connect) before the server listens,
    fails, and leaves the other rank waiting in the process group."""
    import random
    import socket

    range_file = Path("/proc/sys/net/ipv4/ip_local_port_range")
    ephemeral_low = int(range_file.read_text().split()[0]) if range_file.exists() else 32768
    low, high = min(20000, ephemeral_low // 2), ephemeral_low
    for port in random.sample(range(low, high), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in [{low}, {high})")


def communicate_all(procs: list, timeout: float) -> list[str]:
    """The outputs of processes that must finish together (DDP ranks). If one is still running after
    `timeout` seconds (a rank died and the others wait for it), all are killed and the failure shows
    every process's output; none is left behind."""
    import subprocess
    import time

    deadline = time.time() + timeout
    try:
        outputs = [proc.communicate(timeout=max(deadline - time.time(), 0.1))[0] for proc in procs]
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        tails = [f"--- process {i} (exit {proc.wait()}):\n{(proc.communicate()[0] or '')[-3000:]}"
                 for i, proc in enumerate(procs)]
        pytest.fail(f"processes still running after {timeout:.0f} s; killed\n" + "\n".join(tails))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return outputs


@pytest.fixture
def mlflow_uri(tmp_path, monkeypatch) -> str:
    """A private MLflow store for one test, so tests never write the repo's mlflow.db."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # for stage subprocesses (dvc, kfp.local)
    monkeypatch.delenv("CASCADE_PARENT_RUN_ID", raising=False)
    # mlflow.set_experiment caches the experiment id (env and module global); a fresh store has none
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    mlflow.tracking.fluent._active_experiment_id = None
    mlflow.set_tracking_uri(uri)  # in-process: an earlier test's set_tracking_uri would win over the env
    yield uri
    mlflow.set_tracking_uri(None)


# --- a smoke-profile pipeline, run once per session -------------------------------------------

@dataclass(frozen=True)
class SmokeArtifacts:
    cfg: object
    data: Path
    validate: Path
    features: Path
    tokenizer: Path
    checkpoints: Path


@pytest.fixture(scope="session")
def smoke_artifacts(tmp_path_factory) -> SmokeArtifacts:
    from components import data, features, tokenizer, validate

    cfg = load_config(REPO / "params.yaml", "smoke")
    root = tmp_path_factory.mktemp("smoke")
    art = SmokeArtifacts(cfg, root / "data", root / "validate", root / "features", root / "tokenizer", root / "ckpt")
    data.run(cfg.data, art.data)
    validate.run(cfg.validate, art.data, art.validate)
    features.run(cfg.features, art.validate, art.features)
    tokenizer.run(cfg.tokenizer, art.data, art.validate, art.tokenizer, art.checkpoints)
    return art


@dataclass(frozen=True)
class SmokeCascade:
    art: SmokeArtifacts
    tokens: Path
    base: Path
    superres: Path
    base_metrics: dict
    superres_metrics: dict

    @property
    def cfg(self):
        return self.art.cfg

    @property
    def tokenizer(self) -> Path:
        return self.art.tokenizer


@pytest.fixture(scope="session")
def smoke_cascade(smoke_artifacts, tmp_path_factory) -> SmokeCascade:
    """smoke_artifacts carried on through tokens -> base -> superres (the whole masked cascade)."""
    from components import base, superres, tokens

    art = smoke_artifacts
    root = tmp_path_factory.mktemp("smoke_cascade")
    tokens.run(art.cfg.tokens, art.data, art.validate, art.tokenizer, root / "tokens", art.features)
    b = base.run(art.cfg.base, root / "tokens", art.features, art.tokenizer, art.validate, root / "base",
                 root / "ckpt" / "base")
    s = superres.run(art.cfg, root / "tokens", art.features, art.tokenizer, art.validate, root / "base",
                     root / "superres", root / "ckpt" / "superres")
    return SmokeCascade(art, root / "tokens", root / "base", root / "superres", b.metrics, s.metrics)


@pytest.fixture(scope="session")
def smoke_evaluator(smoke_artifacts, tmp_path_factory) -> Path:
    """The smoke profile's domain evaluator (FID features, CLIP score)."""
    from components import evaluator

    art = smoke_artifacts
    root = tmp_path_factory.mktemp("smoke_evaluator")
    evaluator.run(art.cfg, art.data, art.validate, art.features, root / "evaluator", root / "ckpt")
    return root / "evaluator"


@pytest.fixture(scope="session")
def smoke_decoder(smoke_cascade, smoke_evaluator, tmp_path_factory) -> Path:
    """The smoke cascade's finetuned super-res decoder (decoder_ft stage)."""
    from components import decoder_ft
    from components.scoring import fid_features

    art = smoke_cascade.art
    root = tmp_path_factory.mktemp("smoke_decoder")
    decoder_ft.run(art.cfg, art.data, art.validate, smoke_cascade.tokens, art.tokenizer, smoke_cascade.base,
                   smoke_cascade.superres, root / "decoder", root / "ckpt",
                   feature_module=fid_features(art.cfg.evaluate, smoke_evaluator, art.features))
    return root / "decoder"


# --- the diffusion family on the smoke profile ------------------------------------------------

DIFFUSION = {"generator.family": "diffusion", "tokenizer.kind": "kl"}


@dataclass(frozen=True)
class SmokeDiffusion:
    cfg: object
    art: SmokeArtifacts  # data, validate, features shared with the masked family
    tokenizer: Path  # the base KL-VAE only (tokenizer/base)
    tokens: Path  # its latents (tokens/base)
    base: Path  # the last PixArt phase at the root, every phase under phases/<name>
    superres: Path
    base_metrics: dict
    superres_metrics: dict


@pytest.fixture(scope="session")
def smoke_diffusion(smoke_artifacts, tmp_path_factory) -> SmokeDiffusion:
    """The diffusion family (generator.family: diffusion) trained on the smoke data: KL-VAE ->
    latents -> DiT base (all phases) -> pixel super-res."""
    from components import diffusion, tokenizer, tokens

    art = smoke_artifacts
    cfg = load_config(REPO / "params.yaml", "smoke", DIFFUSION)
    root = tmp_path_factory.mktemp("smoke_diffusion")
    tokenizer.run(cfg.tokenizer, art.data, art.validate, root / "tokenizer", root / "ckpt" / "tokenizer",
                  which_ones=("base",))
    tokens.run(cfg.tokens, art.data, art.validate, root / "tokenizer", root / "tokens", art.features,
               which_ones=("base",))
    b = diffusion.run_base(cfg, root / "tokens", art.features, root / "tokenizer", art.validate, root / "base",
                           root / "ckpt" / "base")
    s = diffusion.run_superres(cfg, art.data, art.validate, art.features, root / "tokenizer", root / "base",
                               root / "superres", root / "ckpt" / "superres")
    return SmokeDiffusion(cfg, art, root / "tokenizer", root / "tokens", root / "base", root / "superres",
                          b.metrics, s.metrics)
