"""Stage `evaluate`: the finished cascade (finetuned decoder included) scored the XGen-Image-1 way.

    for each guidance scale s (applied to the base model; super-res keeps its own default):
        generate `prompts` fixed test prompts, image i with seed + i (caption prefix optional)
        FID against the same prompts' real test images, CLIP score against their captions
        a fixed-seed sample grid of the first `grid_prompts` prompts
    -> the FID-vs-CLIP curve (curve.csv: a DVC plot; curve.png), one row per scale

plus the exact checker's per-category accuracy on held-out test prompts at the default guidance
(built-in data only: it needs the scenes; seeds i, then `checker_seed_sets - 1` further seed sets
reported as checker_<category>_mean, never gated) and, for each user prompt suite, the CLIP score per
category. FID and CLIP come from components.scoring: the domain evaluator by default, standard
InceptionV3 / a local CLIP checkpoint when params point to their weights. The real features are
computed once and reused for every scale.

Outputs: metrics.json (gate metrics `fid`, `clip_score`, `checker_single`, `checker_pair` at the
default guidance, plus per-scale and per-category figures), report.md, report.html (self-contained:
plot, tables and grids inline, for the KFP UI and MLflow), curve.csv, curve.png, grids/.
"""

from __future__ import annotations

import base64
import csv
import html
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pandas as pd
import torch

from components.config import CascadeConfig
from components.errors import BadInputError
from components.io import ACCEPTED_FILE, read_accepted, write_json
from components.stage import Progress, TrackedInput, counter, tracked

REPORT_FILES = ("report.md", "report.html", "curve.csv", "curve.png", "checker.md", "metrics.json")
# the gate metrics (components.registry) use these short names for the checker's headline figures
CHECKER_ALIASES = {"single_colour_shape": "checker_single", "pair_overall": "checker_pair"}


@dataclass(frozen=True)
class EvaluateResult:
    metrics: dict[str, float]
    out_dir: Path


@dataclass(frozen=True)
class CurvePoint:
    guidance: float
    fid: float
    clip_score: float
    generate_seconds: float
    score_seconds: float


def sweep_scales(scales: tuple[float, ...], default: float) -> list[float]:
    """The configured scales in order, the default guidance added if missing (the gates read it)."""
    out = list(dict.fromkeys(float(s) for s in scales))
    return out if default in out else out + [float(default)]


def sweep_rows(validate_dir: Path, limit: int) -> pd.DataFrame:
    """The first `limit` accepted test items: the fixed prompt set and its real images."""
    rows = read_accepted(validate_dir, ["key", "caption", "split", "shard", "image_member"])
    rows = rows[rows["split"] == "test"].head(limit).reset_index(drop=True)
    if len(rows) < 2:
        raise BadInputError(f"{Path(validate_dir) / ACCEPTED_FILE}: {len(rows)} accepted test items; FID needs at "
                            "least 2 (give the data a test split: a `split` column or data.test_fraction > 0)")
    return rows


def read_prompt_suite(path: str | Path) -> pd.DataFrame:
    """A user prompt suite -> DataFrame[prompt, category].

    .txt: one prompt per line (category "all"); .csv / .tsv: a header with a `prompt` column and an
    optional `category` column (DrawBench-style). Blank prompts are an error, not a silent skip.
    """
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: prompt suite not found (evaluate.prompt_suites)")
    if path.suffix == ".txt":
        lines = path.read_text().splitlines()
        frame = pd.DataFrame({"prompt": [line.strip() for line in lines if line.strip()]})
    elif path.suffix in (".csv", ".tsv"):
        with path.open(newline="") as f:
            frame = pd.DataFrame(list(csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")))
        if "prompt" not in frame.columns:
            raise BadInputError(f"{path}: no `prompt` column (columns: {list(frame.columns)})")
        blank = frame.index[frame["prompt"].fillna("").str.strip() == ""].tolist()
        if blank:
            raise BadInputError(f"{path}: empty prompt on data line {blank[0] + 1}")
    else:
        raise BadInputError(f"{path}: unknown prompt suite format {path.suffix!r} (use .txt, .csv or .tsv)")
    if frame.empty:
        raise BadInputError(f"{path}: no prompts")
    if "category" not in frame.columns:
        frame["category"] = "all"
    frame["category"] = frame["category"].fillna("").replace("", "uncategorised")
    return frame[["prompt", "category"]]


def _batches(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))


def _to01(images: torch.Tensor) -> torch.Tensor:
    return ((images.float().clamp(-1, 1) + 1) / 2)  # [-1,1] -> [0,1]


def _real_images(data_dir: Path, rows: pd.DataFrame, resolution: int) -> torch.Tensor:
    """rows' images from the shards as [N,3,R,R] in [0,1]."""
    from components.images import ShardImageDataset

    dataset = ShardImageDataset(data_dir, rows, resolution)
    return _to01(torch.stack([dataset[i] for i in range(len(dataset))]))  # [N,3,R,R]


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def plot_curve(points: list[CurvePoint], default: float, path: Path) -> Path:
    """FID (y, lower is better) against CLIP score (x, higher is better), one labelled dot per scale."""
    import matplotlib

    matplotlib.use("Agg")  # no display on pipeline workers
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4), dpi=100)
    ax.plot([p.clip_score for p in points], [p.fid for p in points], "o-", color="tab:blue")
    for p in points:
        ax.annotate(f"{p.guidance:g}" + (" (default)" if p.guidance == default else ""), (p.clip_score, p.fid),
                    textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel("CLIP score")
    ax.set_ylabel("FID")
    ax.set_title("FID vs CLIP over guidance scales")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


class _Generator:
    """Batched text -> images [B,3,R,R] in [0,1] with per-image seeds, timing itself."""

    def __init__(self, cascade, batch_size: int):
        self.cascade, self.batch_size, self.seconds, self.images = cascade, batch_size, 0.0, 0

    def __call__(self, text: torch.Tensor, mask: torch.Tensor, seeds: list[int], guidance: float) -> torch.Tensor:
        start = time.perf_counter()
        chunks = [_to01(self.cascade.generate_from_text(text[s], mask[s], seeds=seeds[s], guidance=guidance))
                  for s in _batches(len(seeds), self.batch_size)]
        self.seconds += time.perf_counter() - start
        self.images += len(seeds)
        return torch.cat(chunks)


def run(cfg: CascadeConfig, data_dir: Path, validate_dir: Path, features_dir: Path, tokenizer_dir: Path,
        base_dir: Path, superres_dir: Path, decoder_dir: Path | None, evaluator_dir: Path, out_dir: Path,
        progress: Progress = None) -> EvaluateResult:
    from components.compositional import further_seed_sets, sample_and_check, save_sample_grid, table, test_prompts
    from components.evaluator import load_for_scoring
    from components.features import FeatureStore
    from components.images import to_uint8
    from components.scoring import Scorer
    from components.cascades import default_guidance, load_from_dirs

    ev, out_dir = cfg.evaluate, Path(out_dir)
    (out_dir / "grids").mkdir(parents=True, exist_ok=True)
    cascade = load_from_dirs(cfg, base_dir, superres_dir, tokenizer_dir, decoder_dir)
    try:
        scorer = Scorer.from_config(ev, load_for_scoring(evaluator_dir, features_dir))
    except ValueError as err:  # a bad weights path: already one line naming the params key
        raise BadInputError(str(err)) from None
    generate = _Generator(cascade, ev.batch_size)
    default = default_guidance(cfg)
    tick = counter(progress)

    # --- the guidance sweep: FID and CLIP on a fixed prompt set --------------------------------
    # Streamed in batches of evaluate.batch_size: real images, generated images and text features of a
    # 30k-prompt sweep never sit in memory at once; only the grid's first images are kept.
    rows = sweep_rows(validate_dir, ev.prompts)
    captions = rows["caption"].tolist()
    prefix = (ev.caption_prefix.strip() + " ") if ev.caption_prefix.strip() else ""
    start = time.perf_counter()
    fid = scorer.fid_metric(_real_images(data_dir, rows.iloc[s], cascade.resolution)
                            for s in _batches(len(rows), ev.batch_size))
    real_seconds = time.perf_counter() - start
    points, grids = [], {}
    for guidance in sweep_scales(ev.guidance_scales, default):
        before, clip, kept = generate.seconds, [], []

        def batches() -> Iterator[torch.Tensor]:
            for s in _batches(len(rows), ev.batch_size):
                text, mask = cascade.encode_text([prefix + c for c in captions[s]])  # [B,L,D], [B,L]
                images = generate(text, mask, [ev.seed + i for i in range(s.start, s.stop)], guidance)
                if prefix:  # scored against the plain caption
                    text, mask = cascade.encode_text(captions[s])
                clip.append(scorer.clip_scores(images, captions[s], text, mask))
                kept.append(images[: max(0, ev.grid_prompts - s.start)])
                yield images  # [B,3,R,R] in [0,1], into the FID's fake statistics
                tick(len(images))

        start = time.perf_counter()
        fid_value = scorer.fid_against(fid, batches())
        total = time.perf_counter() - start
        generated = generate.seconds - before
        points.append(CurvePoint(guidance, fid_value, float(torch.cat(clip).mean()), generated, total - generated))
        grids[guidance] = save_sample_grid(to_uint8(torch.cat(kept) * 2 - 1), captions,
                                           out_dir / "grids" / f"guidance_{guidance:g}.png")
    at_default = next(p for p in points if p.guidance == default)
    metrics: dict[str, float] = {"fid": at_default.fid, "clip_score": at_default.clip_score,
                                 "default_guidance": default, "n_prompts": float(len(rows))}
    for p in points:
        metrics[f"fid_g{p.guidance:g}"] = p.fid
        metrics[f"clip_score_g{p.guidance:g}"] = p.clip_score
    _write_curve(points, out_dir)
    plot_curve(points, default, out_dir / "curve.png")

    # --- compositional accuracy: the exact checker on held-out prompts ------------------------
    checker_table = None
    prompts = test_prompts(validate_dir, ev.checker_prompts) if ev.checker_prompts > 0 else None
    if prompts is not None and len(prompts):
        def generate_pm1(text, mask, seeds, guidance):  # sample_and_check wants [-1,1]
            return generate(text, mask, [ev.seed + s for s in seeds], guidance) * 2 - 1

        store = FeatureStore.open(features_dir)
        by_guidance, _ = sample_and_check(generate_pm1, prompts, store, [default], ev.batch_size)
        checker = by_guidance[default]
        metrics.update({f"checker_{k}": v for k, v in checker.items() if not k.startswith("n_")})
        metrics.update({alias: checker[k] for k, alias in CHECKER_ALIASES.items() if k in checker})
        metrics["checker_prompts"] = checker["n_prompts"]
        checker_table = table(by_guidance)
        tick(len(prompts))
        # further seed sets are reported, never gated: checker_single stays set 0 (seeds i), the protocol
        # every registered version was measured with
        more, more_table = further_seed_sets(generate_pm1, prompts, store, default, checker, ev.checker_seed_sets,
                                             ev.batch_size, after_each=lambda: tick(len(prompts)))
        metrics.update(more)
        checker_table += more_table
        (out_dir / "checker.md").write_text(checker_table)

    # --- user prompt suites: CLIP score per category -------------------------------------------
    suites = {}
    for path in ev.prompt_suites:
        suite = read_prompt_suite(path)
        name = Path(path).stem
        prompts_text = [prefix + p for p in suite["prompt"]]
        s_text, s_mask = cascade.encode_text(prompts_text)
        images = generate(s_text, s_mask, [ev.seed + i for i in range(len(suite))], default)
        plain = cascade.encode_text(suite["prompt"].tolist()) if prefix else (s_text, s_mask)
        suite["clip_score"] = scorer.clip_scores(images, suite["prompt"].tolist(), *plain).numpy()
        per_category = suite.groupby("category", sort=True)["clip_score"].agg(["mean", "count"])
        for category, row in per_category.iterrows():
            metrics[f"suite_{name}_{category}_clip_score"] = float(row["mean"])
        metrics[f"suite_{name}_clip_score"] = float(suite["clip_score"].mean())
        suites[name] = (per_category, save_sample_grid(to_uint8(images[: ev.grid_prompts] * 2 - 1),
                                                      suite["prompt"].tolist(), out_dir / "grids" / f"suite_{name}.png"))
        tick(len(suite))

    metrics["images_generated"] = float(generate.images)
    metrics["generate_images_per_second"] = generate.images / max(generate.seconds, 1e-9)
    score_seconds = real_seconds + sum(p.score_seconds for p in points)
    metrics["score_images_per_second"] = (len(rows) * (len(points) + 1)) / max(score_seconds, 1e-9)
    metrics["sweep_seconds"] = sum(p.generate_seconds + p.score_seconds for p in points) + real_seconds
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:  # the stage fails (tracked() refuses them too) so the registry never sees them
        write_json(out_dir / "failed.json", {"reason": f"non-finite metrics {bad}"})
    write_json(out_dir / "metrics.json", metrics)
    report = Report(cfg, metrics, points, default, scorer, checker_table, suites, grids)
    (out_dir / "report.md").write_text(report.markdown())
    (out_dir / "report.html").write_text(report.html(out_dir))
    return EvaluateResult(metrics, out_dir)


def _write_curve(points: list[CurvePoint], out_dir: Path) -> Path:
    path = out_dir / "curve.csv"
    pd.DataFrame([{"guidance": p.guidance, "fid": p.fid, "clip_score": p.clip_score} for p in points]).to_csv(
        path, index=False)
    return path


@dataclass(frozen=True)
class Report:
    cfg: CascadeConfig
    metrics: dict[str, float]
    points: list[CurvePoint]
    default: float
    scorer: object
    checker_table: str | None
    suites: dict[str, tuple[pd.DataFrame, Path]]
    grids: dict[float, Path]

    def _summary(self) -> list[tuple[str, str]]:
        m, ev = self.metrics, self.cfg.evaluate
        rows = [("profile", self.cfg.profile), ("generator family", self.cfg.generator.family),
                ("default guidance", f"{self.default:g}"),
                ("FID", f"{m['fid']:.3f} ({self.scorer.fid_backend} features)"),
                ("CLIP score", f"{m['clip_score']:.2f} ({self.scorer.clip_backend})"),
                ("prompts per scale", f"{int(m['n_prompts'])}" + (f", prefix {ev.caption_prefix!r}" if ev.caption_prefix else ""))]
        if "checker_single" in m:
            rows.append(("exact checker: single objects right in colour and shape", f"{100 * m['checker_single']:.1f}%"))
        if "checker_pair" in m:
            rows.append(("exact checker: two objects and relation fully right", f"{100 * m['checker_pair']:.1f}%"))
        rows.append(("throughput", f"{m['generate_images_per_second']:.1f} images/s generated, "
                                   f"{m['score_images_per_second']:.1f} images/s scored"))
        return rows

    def _curve_table(self) -> str:
        lines = ["| guidance | FID | CLIP score | generate s | score s |", "| --- | --- | --- | --- | --- |"]
        for p in self.points:
            mark = " (default)" if p.guidance == self.default else ""
            lines.append(f"| {p.guidance:g}{mark} | {p.fid:.3f} | {p.clip_score:.2f} | "
                         f"{p.generate_seconds:.1f} | {p.score_seconds:.1f} |")
        return "\n".join(lines) + "\n"

    def _suite_table(self, frame: pd.DataFrame) -> str:
        lines = ["| category | prompts | CLIP score |", "| --- | --- | --- |"]
        lines += [f"| {c} | {int(r['count'])} | {r['mean']:.2f} |" for c, r in frame.iterrows()]
        return "\n".join(lines) + "\n"

    def markdown(self) -> str:
        parts = ["# Cascade evaluation\n", "| | |\n| --- | --- |\n" +
                 "".join(f"| {k} | {v} |\n" for k, v in self._summary()),
                 "\n## FID vs CLIP over guidance scales\n\n(plot: curve.png; data: curve.csv)\n\n", self._curve_table()]
        if self.checker_table:
            parts += ["\n## Exact checker on held-out test prompts (default guidance)\n\n", self.checker_table]
        for name, (frame, _) in self.suites.items():
            parts += [f"\n## Prompt suite `{name}` (CLIP score per category; FID needs reference images)\n\n",
                      self._suite_table(frame)]
        parts.append("\nSample grids (fixed seeds): " + ", ".join(f"grids/{p.name}" for p in self.grids.values()) + "\n")
        return "".join(parts)

    def html(self, out_dir: Path) -> str:
        """Self-contained (images inline) so the KFP UI and MLflow show it without the files."""
        summary = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in self._summary())
        body = [f"<h1>Cascade evaluation</h1><table>{summary}</table>",
                "<h2>FID vs CLIP over guidance scales</h2>",
                f"<img alt='FID vs CLIP' src='{_data_uri(out_dir / 'curve.png')}'>",
                self._html_table(self._curve_table())]
        if self.checker_table:
            body += ["<h2>Exact checker on held-out test prompts (default guidance)</h2>",
                     self._html_table(self.checker_table)]
        for name, (frame, grid) in self.suites.items():
            body += [f"<h2>Prompt suite {html.escape(name)}</h2>", self._html_table(self._suite_table(frame)),
                     f"<img alt='{html.escape(name)} samples' src='{_data_uri(grid)}'>"]
        body.append("<h2>Fixed-seed samples per guidance scale</h2>")
        for guidance, grid in self.grids.items():
            body.append(f"<h3>guidance {guidance:g}</h3><img alt='guidance {guidance:g}' src='{_data_uri(grid)}'>")
        style = "body{font-family:sans-serif;max-width:60em}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}"
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>Cascade evaluation</title>"
                f"<style>{style}</style></head><body>{''.join(body)}</body></html>")

    def _html_table(self, md: str) -> str:
        """Markdown tables (each headed by its first row) and the text lines between them, as HTML."""
        parts, rows = [], []

        def close_table() -> None:
            if rows:
                head, body = rows[0], rows[1:]
                parts.append("<table><tr>" + "".join(f"<th>{html.escape(c.strip())}</th>" for c in head) + "</tr>" +
                             "".join("<tr>" + "".join(f"<td>{html.escape(c.strip())}</td>" for c in r) + "</tr>"
                                     for r in body) + "</table>")
                rows.clear()

        for line in md.strip().splitlines():
            if line.startswith("|"):
                if not line.startswith("| ---"):
                    rows.append(line.strip().strip("|").split("|"))
            else:
                close_table()
                if line.strip():
                    parts.append(f"<p>{html.escape(line.strip())}</p>")
        close_table()
        return "".join(parts)


def execute(cfg: CascadeConfig, data_dir: Path, validate_dir: Path, features_dir: Path, tokenizer_dir: Path,
            base_dir: Path, superres_dir: Path, decoder_dir: Path | None, evaluator_dir: Path, out_dir: Path,
            metrics_file: Path, parent_run_id: str | None = None, progress: Progress = None) -> EvaluateResult:
    return tracked(
        "evaluate", cfg,
        lambda: run(cfg, data_dir, validate_dir, features_dir, tokenizer_dir, base_dir, superres_dir, decoder_dir,
                    evaluator_dir, out_dir, progress),
        metrics_file,
        inputs=lambda: [TrackedInput(Path(validate_dir) / ACCEPTED_FILE, "accepted", "evaluate")],
        artifacts=lambda r: [Path(out_dir) / name for name in REPORT_FILES] + [Path(out_dir) / "grids"],
        parent_run_id=parent_run_id,
    )
