"""Compositional accuracy of generated images on held-out prompts, judged by the exact checker.

The prompts are the built-in dataset's test split: every one uses a (colour, shape) pair that
never appears in training. Each prompt i is generated with seed i, so numbers are comparable
across runs and checkpoints. Further seed sets (seed j * SEED_SET_STRIDE + i for set j) measure how
much of a figure is the draw of seeds rather than the model. Categories (models.checker): colour,
shape, count, position (over prompts with a relation) and overall; plus the two headline figures:

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
HEADLINES = ("single_colour_shape", "pair_overall")
SEED_SET_STRIDE = 100_000  # set j draws prompt i with seed j * stride + i: disjoint from set 0 for < 100k prompts


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
    return _table("guidance", {f"{g:g}": m for g, m in by_guidance.items()})


def seed_set_table(by_set: dict[int, dict[str, float]], guidance: float) -> str:
    """A Markdown table at one guidance scale: one row per seed set, then their mean."""
    rows = {f"{j} (seeds {seed_set_label(j)})": m for j, m in by_set.items()}
    rows[f"mean of {len(by_set)}"] = mean_over_sets(by_set)
    return f"Seed sets at guidance {guidance:g}:\n\n" + _table("seed set", rows)


def _table(first: str, rows: dict[str, dict[str, float]]) -> str:
    lines = [f"| {first} | " + " | ".join(CATEGORIES) + " |", "|" + " --- |" * (len(CATEGORIES) + 1)]
    for label, m in rows.items():
        cells = [f"{100 * m[c]:.1f}%" if c in m and not math.isnan(m[c]) else "-" for c in CATEGORIES]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def seed_set_label(j: int) -> str:
    return "i" if j == 0 else f"{j * SEED_SET_STRIDE} + i"


def mean_over_sets(by_set: dict[int, dict[str, float]]) -> dict[str, float]:
    """Per-category mean over seed sets. Every set checks the same prompts, so this is also the
    accuracy pooled over all their images."""
    return {c: float(np.mean([m[c] for m in by_set.values()])) for c in CATEGORIES
            if all(c in m for m in by_set.values())}


def seed_set_metrics(by_set: dict[int, dict[str, float]]) -> dict[str, float]:
    """checker_<category>_mean over the sets and checker_<headline>_set<j> per set; nothing for one set
    (checker_<category> itself is set 0)."""
    if len(by_set) < 2:
        return {}
    out = {f"checker_{c}_mean": v for c, v in mean_over_sets(by_set).items()}
    for j, m in by_set.items():
        out.update({f"checker_{c}_set{j}": m[c] for c in HEADLINES if c in m})
    return out


def sample_and_check(generate, prompts: PromptSet, features, guidance_scales: list[float], batch_size: int = 64,
                     seed_set: int = 0) -> tuple[dict[float, dict[str, float]], dict[float, np.ndarray]]:
    """Generate every prompt at each guidance scale and check the images; prompt i gets seed
    seed_set * SEED_SET_STRIDE + i (seed i in set 0).

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
            seeds = [seed_set * SEED_SET_STRIDE + i for i in range(start, start + len(keys))]
            chunks.append(to_uint8(generate(text, mask, seeds, guidance)))
        images[guidance] = np.concatenate(chunks)
        metrics[guidance] = checker_metrics(images[guidance], prompts.scenes)
    return metrics, images


def check_held_out(generate, cfg, features_dir: Path, validate_dir: Path, out_dir: Path) -> dict:
    """The generator stages' held-out check: cfg.eval_prompts held-out test prompts sampled with seed
    set 0 at the default guidance and at 0, then cfg.eval_seed_sets - 1 further seed sets at the
    default guidance. Writes samples.png/.txt and checker.md (one table per guidance, then the per-set
    table) into out_dir. Empty for data without scenes. It lives here rather than in
    components.generator because that module's source keys the training checkpoints: a change to
    evaluation must not retrain.

    cfg: a generator stage's config (eval_prompts, eval_seed_sets, sample.guidance)."""
    from components.features import FeatureStore

    if cfg.eval_prompts <= 0:
        return {}
    prompts = test_prompts(validate_dir, cfg.eval_prompts)
    if len(prompts) == 0:
        return {}  # user data: no structured scenes to check against
    features = FeatureStore.open(features_dir)
    default = cfg.sample.guidance
    scales = [default] + ([0.0] if default != 0 else [])
    by_guidance, images = sample_and_check(generate, prompts, features, scales)
    save_sample_grid(images[default], prompts.captions, Path(out_dir) / "samples.png")
    checker_md = table(by_guidance)
    metrics = flat_metrics(by_guidance, default)
    if cfg.eval_seed_sets >= 2:
        set0 = {c: metrics[f"checker_{c}"] for c in CATEGORIES if f"checker_{c}" in metrics}
        more, more_table = further_seed_sets(generate, prompts, features, default, set0, cfg.eval_seed_sets)
        metrics, checker_md = {**metrics, **more}, checker_md + more_table
    (Path(out_dir) / "checker.md").write_text(checker_md)
    return metrics


def further_seed_sets(generate, prompts: PromptSet, features, guidance: float, set0: dict[str, float],
                      n_sets: int, batch_size: int = 64, after_each=lambda: None) -> tuple[dict[str, float], str]:
    """Sample seed sets 1 .. n_sets - 1 at `guidance` beside set 0's checker figures `set0`.
    Returns (seed_set_metrics, the per-set table preceded by a blank line); ({}, "") for one set.
    after_each() runs after each further set (progress)."""
    by_set = {0: set0}
    for j in range(1, n_sets):
        by_set[j] = sample_and_check(generate, prompts, features, [guidance], batch_size, seed_set=j)[0][guidance]
        after_each()
    if len(by_set) < 2:
        return {}, ""
    return seed_set_metrics(by_set), "\n" + seed_set_table(by_set, guidance)


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
