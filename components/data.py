"""Stage `data`: write a normalized dataset (tar shards + manifest) from the configured source.

`data.source: builtin` renders the compositional shapes dataset (models.shapes); anything else is
a path or fsspec URL of user data handed to components.ingest.
"""

from __future__ import annotations

import io
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from components.config import CascadeConfig, DataConfig
from components.io import MANIFEST_FILE, SHARDS_DIR, Sample, ShardWriter, frame_digest
from components.stage import TrackedInput, tracked

Progress = Callable[[int], None] | None


@dataclass(frozen=True)
class DataResult:
    kind: str  # builtin | webdataset | imagefolder | manifest
    manifest: Path
    n_items: int
    split_counts: dict[str, int]
    n_ingest_errors: int
    manifest_digest: str
    seconds: float
    extra: dict = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, float]:
        return {
            "n_items": self.n_items,
            "n_ingest_errors": self.n_ingest_errors,
            **{f"n_{split}": n for split, n in sorted(self.split_counts.items())},
        }


def _encode(image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        image.save(buf, format="PNG")
    else:
        image.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_builtin(cfg: DataConfig, out_dir: Path, progress: Progress = None) -> int:
    """Render the shapes dataset into shards; returns the number of items written."""
    from models import shapes

    b = cfg.builtin
    scenes = shapes.generate(
        seed=b.seed, n_train=b.n_train, n_val=b.n_val, n_test=b.n_test,
        image_size=b.image_size, max_objects=b.max_objects, heldout_fraction=b.heldout_fraction,
    )
    n = 0
    with ShardWriter(out_dir, cfg.shard_size) as writer:
        for split, index, scene in scenes:
            text = shapes.caption(scene)
            writer.write(Sample(
                key=f"{split}-{index:07d}",
                split=split,
                image=_encode(shapes.render(scene, b.image_size), b.image_format),
                image_ext=b.image_format,
                caption=text.encode("utf-8"),
                meta={"caption": text, "split": split},
                scene=scene.to_dict(),
                source=f"builtin:seed={b.seed}",
            ))
            n += 1
            if progress and n % 64 == 0:
                progress(n)
    return n


def _clear(out_dir: Path) -> None:
    # Only what this stage writes: a stale shard from a bigger earlier run must not linger.
    shutil.rmtree(out_dir / SHARDS_DIR, ignore_errors=True)
    (out_dir / MANIFEST_FILE).unlink(missing_ok=True)


def run(cfg: DataConfig, out_dir: Path, progress: Progress = None) -> DataResult:
    import pandas as pd

    out_dir = Path(out_dir)
    _clear(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if cfg.source == "builtin":
        kind = "builtin"
        write_builtin(cfg, out_dir, progress)
    else:
        from components.ingest import ingest

        result = ingest(cfg.source, out_dir, cfg.shard_size, cfg.val_fraction, cfg.test_fraction, progress=progress)
        kind = result.kind
    manifest = pd.read_parquet(out_dir / MANIFEST_FILE)
    return DataResult(
        kind=kind,
        manifest=out_dir / MANIFEST_FILE,
        n_items=len(manifest),
        split_counts=manifest["split"].value_counts().to_dict(),
        n_ingest_errors=int(manifest["ingest_error"].notna().sum()),
        manifest_digest=frame_digest(manifest),
        seconds=time.perf_counter() - start,
    )


def execute(cfg: CascadeConfig, out_dir: Path, metrics_file: Path, parent_run_id: str | None = None,
            progress: Progress = None) -> DataResult:
    return tracked(
        "data", cfg, lambda: run(cfg.data, out_dir, progress), metrics_file,
        inputs=lambda: [TrackedInput(Path(out_dir) / MANIFEST_FILE, "manifest", "data")],
        parent_run_id=parent_run_id,
    )

