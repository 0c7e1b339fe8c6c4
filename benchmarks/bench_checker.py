"""How well the exact checker reads images at the resolutions the cascade works at, and how fast.

The checker is the yardstick of the tokenizer and generator targets, so its own ceiling matters:
on real images it should read every scene right. On the accepted images of --split (built-in data),
rows at each resolution:

    real images, native         the shards' images at their own size (the baseline)
    real images, box-filtered    downscaled as the stages feed each tokenizer (components.images)
    <which> tokenizer            reconstructions of those images by artifacts/tokenizer/<which>

Columns: accuracy per category and overall, and the checker's throughput (images/s, segmentation
and checking only). The "vs native" column is overall accuracy over the native row's.

    .venv/bin/python benchmarks/bench_checker.py [--split test] [--limit N] [--out FILE]

Prints a Markdown table; with --out, rewrites its own section of FILE (benchmarks/RESULTS.md style).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import machine, replace_section  # noqa: E402
from components.config import load_config  # noqa: E402
from components.images import ShardImageDataset, to_uint8  # noqa: E402
from components.io import read_accepted  # noqa: E402
from models.checker import score  # noqa: E402
from models.shapes import Scene  # noqa: E402
from models.tokenizer import load_tokenizer  # noqa: E402

CATEGORIES = ("colour", "shape", "count", "position", "overall")


def images_at(artifacts: Path, rows, resolution: int, tokenizer=None) -> np.ndarray:
    """uint8 [N,R,R,3]: the rows' images at `resolution`, optionally reconstructed by `tokenizer`."""
    dataset = ShardImageDataset(artifacts / "data", rows, resolution)
    out = []
    with torch.inference_mode():
        for batch in torch.utils.data.DataLoader(dataset, batch_size=64):
            out.append(to_uint8(tokenizer(batch).recon if tokenizer is not None else batch))
    return np.concatenate(out)


def timed_score(images: np.ndarray, scenes: list) -> tuple[dict, float]:
    start = time.perf_counter()
    result = score(images, scenes)
    return result, len(images) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--profile", default=None)
    parser.add_argument("--artifacts", type=Path, default=REPO / "artifacts")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--limit", type=int, default=None, help="first N items of the split (default: all)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    cfg = load_config(args.params, profile=args.profile)
    art = args.artifacts
    accepted = read_accepted(art / "validate", ["key", "shard", "image_member", "sha256", "split", "scene"])
    rows = accepted[(accepted["split"] == args.split) & accepted["scene"].notna()].iloc[: args.limit]
    if rows.empty:
        sys.exit(f"bench_checker: no {args.split} items with scenes under {art / 'validate'} (needs the built-in data)")
    scenes = [Scene.from_dict(json.loads(s)) for s in rows["scene"]]

    results = {}
    native = cfg.data.builtin.image_size
    results[f"real images, native {native} px (baseline)"] = timed_score(images_at(art, rows, native), scenes)
    for which in ("base", "superres"):
        tokenizer_dir = art / "tokenizer" / which
        resolution = getattr(cfg.tokenizer, which).resolution
        if resolution != native:
            results[f"real images, box-filtered to {resolution} px"] = timed_score(images_at(art, rows, resolution), scenes)
        if (tokenizer_dir / "tokenizer.json").is_file():
            tokenizer = load_tokenizer(tokenizer_dir).eval()
            recon = images_at(art, rows, resolution, tokenizer)
            results[f"{which} tokenizer reconstructions, {resolution} px"] = timed_score(recon, scenes)

    baseline = next(iter(results.values()))[0]["overall"]
    lines = ["## Exact checker: its reading of real and reconstructed images (`bench_checker.py`)", "",
             f"{len(rows)} accepted {args.split} images with scenes ({dt.date.today().isoformat()}; {machine()}).", "",
             "| images | " + " | ".join(CATEGORIES) + " | vs native | checker images/s |",
             "| --- |" + " ---: |" * (len(CATEGORIES) + 2)]
    for name, (result, rate) in results.items():
        cells = [f"{100 * result[c]:.1f}%" for c in CATEGORIES]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {result['overall'] / baseline:.3f}x | {rate:.0f} |")
    print("\n".join(lines))
    if args.out:
        replace_section(args.out, "bench_checker", lines)


if __name__ == "__main__":
    main()
