"""Evaluation throughput and the cost of the guidance sweep.

Scoring (same images, one process, interleaved repeats):
  evaluator   the domain evaluator's FID features + CLIP score (the default backend)
  inception   standard FID InceptionV3 features (299 px; randomly initialised weights of the right
              shape, since speed does not depend on the values) as the baseline
Sweep (S scales x N prompts, FID against the same N real images):
  reuse       the real set's features computed once and kept (Scorer.fid_metric / fid_against,
              what the evaluate stage does)
  naive       FID recomputed from scratch per scale (real features re-extracted every time)
plus the sweep's generation time, to show where an evaluation's time goes.

Reads the trained pipeline's outputs (run `make demo` first):

    .venv/bin/python benchmarks/bench_evaluate.py --prompts 128 --scales 3
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import machine, replace_section  # noqa: E402
from components.config import load_config  # noqa: E402
from components.evaluate import _real_images, _to01, sweep_rows  # noqa: E402
from components.evaluator import load_for_scoring  # noqa: E402
from components.scoring import Scorer  # noqa: E402
from components.stage import Layout  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Best of `repeats` wall-clock seconds (the least disturbed run on a shared machine)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--scales", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--record", action="store_true", help="write the results into benchmarks/RESULTS.md")
    args = parser.parse_args()

    from components.superres import load_for_inference
    from models.inception import FIDInceptionV3

    cfg, layout = load_config(REPO / "params.yaml"), Layout(REPO)
    evaluator = load_for_scoring(layout.out("evaluator"), layout.out("features"))
    cascade = load_for_inference(cfg, layout.out("base"), layout.out("superres"), layout.out("tokenizer"),
                                 layout.out("decoder_ft"))
    rows = sweep_rows(layout.out("validate"), args.prompts)
    n = len(rows)
    captions = rows["caption"].tolist()
    real = _real_images(layout.out("data"), rows, cascade.resolution)  # [N,3,R,R] in [0,1]
    text, mask = cascade.encode_text(captions)

    # generation of one scale (the sweep's other cost)
    start = time.perf_counter()
    fakes = [_to01(cascade.generate_from_text(text, mask, seeds=list(range(n)), guidance=g))
             for g in cfg.evaluate.guidance_scales[: args.scales]]
    generate_seconds = (time.perf_counter() - start) / len(fakes)

    ours = Scorer(evaluator, batch_size=cfg.evaluate.batch_size)
    with tempfile.TemporaryDirectory() as tmp:  # inception weights of the right shape, values irrelevant
        weights = Path(tmp) / "inception.pth"
        torch.save(FIDInceptionV3().state_dict(), weights)
        inception = Scorer(evaluator, inception_weights=str(weights), batch_size=cfg.evaluate.batch_size)

    def score(scorer: Scorer) -> None:
        scorer.fid(real, fakes[0])
        scorer.clip_scores(fakes[0], captions, text, mask)

    t_ours = timed(lambda: score(ours), args.repeats)
    t_inception = timed(lambda: score(inception), args.repeats)

    def sweep_reuse() -> None:
        metric = ours.fid_metric(real)
        for fake in fakes:
            ours.fid_against(metric, fake)

    def sweep_naive() -> None:
        for fake in fakes:
            ours.fid(real, fake)

    t_reuse = timed(sweep_reuse, args.repeats)
    t_naive = timed(sweep_naive, args.repeats)

    # "scored" = real + fake images through the FID features (+ CLIP on the fakes)
    lines = [
        "## Evaluation: scoring throughput and the cost of the guidance sweep",
        "",
        f"Machine: {machine()}. `tiny` profile, the demo's trained cascade and evaluator; {n} prompts "
        f"({cascade.resolution} px), best of {args.repeats}. Rerun: `.venv/bin/python benchmarks/bench_evaluate.py "
        f"--prompts {args.prompts} --scales {args.scales} --record`.",
        "",
        "| what | seconds | images/s | ratio |",
        "| --- | ---: | ---: | ---: |",
        f"| score one scale, domain evaluator (FID {n} real + {n} fake, CLIP {n}) | {t_ours:.2f} | "
        f"{2 * n / t_ours:.0f} | 1.00 |",
        f"| score one scale, InceptionV3 FID (baseline) + evaluator CLIP | {t_inception:.2f} | "
        f"{2 * n / t_inception:.0f} | {t_inception / t_ours:.1f}x slower |",
        f"| FID over {len(fakes)} scales, real features computed once (the stage) | {t_reuse:.2f} | "
        f"{n * (len(fakes) + 1) / t_reuse:.0f} | 1.00 |",
        f"| FID over {len(fakes)} scales, real features recomputed per scale (baseline) | {t_naive:.2f} | "
        f"{2 * n * len(fakes) / t_naive:.0f} | {t_naive / t_reuse:.2f}x slower |",
        f"| generate one scale ({n} images, full cascade at the default steps) | {generate_seconds:.2f} | "
        f"{n / generate_seconds:.1f} | {generate_seconds / (t_reuse / len(fakes)):.0f}x the FID scoring |",
        "",
    ]
    print("\n".join(lines))
    if args.record:
        replace_section(REPO / "benchmarks" / "RESULTS.md", "evaluate", lines)


if __name__ == "__main__":
    main()
