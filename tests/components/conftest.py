"""A smoke-profile dataset run once per session through data -> validate -> features -> tokenizer."""

from dataclasses import dataclass
from pathlib import Path

import pytest

from components.config import load_config
from tests.conftest import REPO


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
