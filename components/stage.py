"""Stage plumbing shared by every launcher (DVC, KFP, CLI): default paths and tracked execution.

A stage module has a pure `run(...)` (what tests call) and an `execute(cfg, ...)` that wraps it in
`tracked()`: a nested MLflow run with params, metrics, inputs and report artifacts, plus the DVC
metrics file. Launchers only choose paths.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol, TypeVar

from components import tracking
from components.config import CascadeConfig, flatten, to_dict
from components.errors import StageError
from components.io import write_json

STAGES = ("data", "validate", "features", "evaluator", "tokenizer", "tokens", "base", "superres", "decoder_ft",
          "evaluate", "register")


Progress = Callable[[int], None] | None  # progress(items done so far), e.g. a CLI progress bar


def counter(progress: Progress) -> Callable[[int], None]:
    """Per-batch counts -> the cumulative `progress(done)` calls a progress bar expects."""
    done = 0

    def add(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done)

    return add


CHECKPOINT_DIR_ENV = "CASCADE_CHECKPOINT_DIR"  # where training checkpoints go (a PVC on a cluster)


@dataclass(frozen=True)
class Layout:
    """Where the DVC pipeline keeps each stage's outputs, relative to the repo root."""

    root: Path = Path(".")

    def out(self, stage: str) -> Path:
        return self.root / "artifacts" / stage

    def metrics(self, stage: str) -> Path:
        return self.root / "metrics" / f"{stage}.json"

    def plots(self, stage: str) -> Path:
        """A stage's DVC plot data (outside its outs: DVC refuses overlapping outputs)."""
        return self.root / "plots" / f"{stage}.csv"

    def checkpoints(self, stage: str) -> Path:
        """Training checkpoints: outside DVC's outs (DVC clears those before a run), so a killed
        run resumes. $CASCADE_CHECKPOINT_DIR moves them (e.g. onto a PVC)."""
        root = os.environ.get(CHECKPOINT_DIR_ENV)
        return (Path(root) if root else self.root / "checkpoints") / stage


def is_rank_zero() -> bool:
    """True unless this process is a non-zero rank of a distributed launch (torchrun, a Kubeflow
    TrainJob node, or a process Lightning started for DDP): only rank 0 records results."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"]) == 0
    return int(os.environ.get("LOCAL_RANK", 0)) == 0 and int(os.environ.get("NODE_RANK", 0)) == 0


@dataclass(frozen=True)
class TrackedInput:
    """A parquet table logged with mlflow.log_input (name, context, content digest)."""

    path: Path
    name: str
    context: str
    digest: str | None = None


class StageResult(Protocol):
    @property
    def metrics(self) -> dict[str, float]: ...


R = TypeVar("R", bound=StageResult)


def tracked(
    stage: str,
    cfg: CascadeConfig,
    call: Callable[[], R],
    metrics_file: Path,
    inputs: Callable[[], list[TrackedInput]] = lambda: [],
    artifacts: Callable[[R], list[Path]] = lambda r: [],
    parent_run_id: str | None = None,
    section: str | None = None,
    run_name: str | None = None,
) -> R:
    """Run `call` inside the stage's MLflow run; write its metrics to MLflow and `metrics_file`.
    A non-zero distributed rank only runs `call`: rank 0 records the stage.

    section: the dotted params section logged (default: the stage's own, e.g. `diffusion.base`
    for the diffusion family's base); run_name: the MLflow run's name (default: the stage)."""
    import mlflow

    if not is_rank_zero():
        return call()

    section = section or stage
    node = cfg
    for part in section.split("."):
        node = getattr(node, part)
    params = {f"{section}.{k}": v for k, v in flatten(to_dict(node)).items()}
    params["profile"] = cfg.profile
    params["generator.family"] = cfg.generator.family
    with tracking.stage_run(run_name or stage, cfg.tracking.experiment, cfg.profile, params, parent_run_id):
        try:
            result = call()
        except StageError as err:
            mlflow.set_tag("cascade.failure", str(err)[:5000])
            raise
        metrics = {k: float(v) for k, v in result.metrics.items()}
        bad = [k for k, v in metrics.items() if not math.isfinite(v)]
        if bad:
            raise StageError(f"{stage}: non-finite metrics {bad}; refusing to record them as a result")
        mlflow.log_metrics(metrics)
        write_json(metrics_file, metrics)
        for table in inputs():
            tracking.log_input_table(table.path, table.name, table.context, table.digest)
        for path in artifacts(result):
            path = Path(path)
            if path.is_dir():
                mlflow.log_artifacts(str(path), artifact_path=path.name)
            elif path.is_file():
                mlflow.log_artifact(str(path))
        return result
