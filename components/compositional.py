"""Compositional accuracy of generated images on held-out prompts, judged by the exact checker.

The prompts are the built-in dataset's test split: every one uses a (colour, shape) pair that
never appears in training. Each prompt i is generated with seed i, so numbers are comparable
across runs and checkpoints. Categories (models.checker): colour, shape, count, position (over
prompts with a relation) and overall; plus the two headline figures:

    single_colour_shape  one-group prompts ("two small green triangles") right in colour and shape
    pair_overall         two-group prompts with a relation fully right (colour, shape, count, position)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from components.io import read_accepted

CATEGORIES = ("colour", "shape", "count", "position", "overall", "single_colour_shape", "pair_overall")


@dataclass(frozen=True)
class PromptSet:
    keys: list[str]
    captions: list[str]
    scenes: list  # models.shapes.Scene

    def __len__(self) -> int:
        return len(self.keys)


def test_prompts(validate_dir: Path, limit: int) -> PromptSet:
    """The first `limit` accepted test items that carry a structured scene (the built-in dataset)."""
    return split_prompts(validate_dir, "test", limit)


def split_prompts(validate_dir: Path, split: str, limit: int) -> PromptSet:
    """The first `limit` accepted items of `split` that carry a structured scene."""
    from models.shapes import Scene

    rows: pd.DataFrame = read_accepted(Path(validate_dir), ["key", "caption", "split", "scene"])
    rows = rows[(rows["split"] == split) & rows["scene"].notna()].head(limit)
    return PromptSet(rows["key"].tolist(), rows["caption"].tolist(),
                     [Scene.from_dict(json.loads(s)) for s in rows["scene"]])


def checker_metrics(images: np.ndarray, scenes: list) -> dict[str, float]:
    """images [B, H, W, 3] uint8 against their scenes -> accuracy per category (NaN-free)."""
    from models.checker import check

    results = [check(image, scene) for image, scene in zip(images, scenes, strict=True)]
    single = [r for r, s in zip(results, scenes) if len(s.groups) == 1]
    pair = [r for r, s in zip(results, scenes) if len(s.groups) == 2]
    positional = [r.position for r in results if r.position is not None]
    values = {
        "colour": [r.colour for r in results],
        "shape": [r.shape for r in results],
        "count": [r.count for r in results],
        "position": positional,
        "overall": [r.correct for r in results],
        "single_colour_shape": [r.colour and r.shape for r in single],
        "pair_overall": [r.correct for r in pair],
    }
    metrics = {name: float(np.mean(v)) for name, v in values.items() if v}
    metrics.update({"n_prompts": float(len(results)), "n_single": float(len(single)), "n_pair": float(len(pair))})
    return metrics


def table(by_guidance: dict[float, dict[str, float]]) -> str:
    """A Markdown table: one row per guidance scale, one column per category."""
    header = "| guidance | " + " | ".join(CATEGORIES) + " |"
    lines = [header, "|" + " --- |" * (len(CATEGORIES) + 1)]
    for guidance, m in by_guidance.items():
        cells = [f"{100 * m[c]:.1f}%" if c in m and not math.isnan(m[c]) else "-" for c in CATEGORIES]
        lines.append(f"| {guidance:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sample_and_check(generate, prompts: PromptSet, features, guidance_scales: list[float],
                     batch_size: int = 64) -> tuple[dict[float, dict[str, float]], dict[float, np.ndarray]]:
    """Generate every prompt (seed = its index) at each guidance scale and check the images.

    generate(text [B,L,D], mask [B,L], seeds list[int], guidance float) -> images [B,3,R,R] in [-1,1].
    Returns (metrics by guidance, uint8 images by guidance).
    """
    from components.images import to_uint8

    metrics, images = {}, {}
    for guidance in guidance_scales:
        chunks = []
        for start in range(0, len(prompts), batch_size):
            keys = prompts.keys[start:start + batch_size]
            text, mask = features.lookup(keys)
            seeds = list(range(start, start + len(keys)))
            chunks.append(to_uint8(generate(text, mask, seeds, guidance)))
        images[guidance] = np.concatenate(chunks)
        metrics[guidance] = checker_metrics(images[guidance], prompts.scenes)
    return metrics, images


def flat_metrics(by_guidance: dict[float, dict[str, float]], default_guidance: float) -> dict[str, float]:
    """checker_<category> at the default guidance, checker_<category>_g<scale> at the others."""
    out = {}
    for guidance, m in by_guidance.items():
        suffix = "" if guidance == default_guidance else f"_g{guidance:g}"
        out.update({f"checker_{k}{suffix}": v for k, v in m.items() if not k.startswith("n_")})
    return out


def save_sample_grid(images: np.ndarray, captions: list[str], path: Path, columns: int = 8, limit: int = 32) -> Path:
    """The first `limit` samples tiled into one PNG, with the captions in a text file beside it."""
    from components.images import save_tiled

    path = save_tiled(images[:limit], path, columns)
    path.with_suffix(".txt").write_text("".join(f"{i}: {c}\n" for i, c in enumerate(captions[:limit])))
    return path
