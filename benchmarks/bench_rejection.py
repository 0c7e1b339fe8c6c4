"""Rejection sampling (XGen-Image-1) on the trained cascade: does keeping the evaluator's favourite of N
candidates make images more correct, as the exact checker judges them?

On the first --prompts held-out test prompts (artifacts/validate; every one uses a (colour, shape)
pair never seen in training), with the prompts' stored text features (artifacts/features), the
params' default guidance and steps, and base seed 0 for both runs:

    N = 1   plain generation, image i from seed i (what the evaluate stage and `cascade generate` do)
    N = 4   candidate j of prompt i from seed 4i + j, the domain evaluator's best kept
            (models.rejection + components.preference, what `cascade generate --candidates 4` does)

Besides the kept images, the N = 4 run's candidate 0 (a second plain sample, other seeds) and the
checker's own pick among the 4 (an oracle: the ceiling any scorer could reach on `overall` with 4
candidates) are checked too. Seconds are generation + scoring (not checking) on this machine.

    .venv/bin/python benchmarks/bench_rejection.py [--prompts 128] [--candidates 4] [--out FILE]
        [--params FILE --artifacts DIR]      # e.g. the diffusion family's run

Prints a Markdown table; with --out, rewrites its own section of FILE (benchmarks/RESULTS.md style).
Nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import machine, replace_section  # noqa: E402
from components.cascades import load_for_inference  # noqa: E402
from components.compositional import checker_metrics, test_prompts  # noqa: E402
from components.config import load_config  # noqa: E402
from components.features import FeatureStore  # noqa: E402
from components.images import to_uint8  # noqa: E402
from components.preference import for_prompts, load_evaluator_preference  # noqa: E402
from models.rejection import rejection_sample  # noqa: E402

COLUMNS = ("single_colour_shape", "pair_overall", "colour", "shape", "count", "position", "overall")


def run(cascade, scorer, prompts, text: torch.Tensor, mask: torch.Tensor, n: int, batch: int):
    """(rejection result, every candidate as uint8 [P, N, H, W, 3], seconds of generation + scoring)."""
    candidates: list[np.ndarray] = []

    def generate(t, m, seeds):
        images = cascade.generate_from_text(t, m, seeds=seeds)
        candidates.append(to_uint8(images))  # prompt-major, as rejection_sample asks for them
        return images

    start = time.perf_counter()
    result = rejection_sample(generate, text, mask, n, for_prompts(scorer, prompts.captions, text, mask), seed=0,
                              batch_size=batch)
    seconds = time.perf_counter() - start
    every = np.concatenate(candidates).reshape(len(prompts), n, *candidates[0].shape[1:])
    return result, every, seconds


def row(label: str, n: int, metrics: dict, mean_score: float | None, seconds: float | None) -> str:
    cells = [f"{100 * metrics[c]:.1f}%" if c in metrics else "-" for c in COLUMNS]
    score = "-" if mean_score is None else f"{mean_score:.2f}"
    secs = "-" if seconds is None else f"{seconds:.1f}"
    return f"| {n} | {label} | " + " | ".join(cells) + f" | {score} | {secs} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", type=Path, default=REPO / "artifacts")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml",
                        help="the run's params (its generator.family picks the cascade)")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--batch", type=int, default=32, help="candidates per generate call")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 on a shared machine, where OpenMP barriers wait for descheduled threads")
    parser.add_argument("--out", type=Path, default=None, help="rewrite the bench_rejection section of this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cfg = load_config(args.params)
    cascade = load_for_inference(cfg, args.artifacts)
    scorer = load_evaluator_preference(args.artifacts / "evaluator", args.artifacts / "features")
    prompts = test_prompts(args.artifacts / "validate", args.prompts)
    if len(prompts) == 0:
        raise SystemExit("no held-out prompts with scenes in artifacts/validate (the built-in dataset is needed)")
    text, mask = FeatureStore.open(args.artifacts / "features").lookup(prompts.keys)  # [P,L,D], [P,L]

    single, _, single_seconds = run(cascade, scorer, prompts, text, mask, 1, args.batch)
    best, every, best_seconds = run(cascade, scorer, prompts, text, mask, args.candidates, args.batch)
    n, P = args.candidates, len(prompts)
    kept = every[np.arange(P), best.chosen.numpy()]
    assert np.array_equal(kept, to_uint8(best.images)), "the kept images are not the chosen candidates"

    # the checker's own pick: the first candidate it finds fully correct (else candidate 0); a ceiling
    from models.checker import check

    correct = np.array([[check(every[i, j], prompts.scenes[i]).correct for j in range(n)] for i in range(P)])
    oracle = every[np.arange(P), np.where(correct.any(1), correct.argmax(1), 0)]

    lines = [
        f"Rejection sampling on the trained `{cfg.profile}` cascade ({cfg.generator.family} family), "
        f"{P} held-out test prompts ({int(checker_metrics(to_uint8(single.images), prompts.scenes)['n_single'])} "
        f"single-group), default guidance/steps, base seed 0; scorer: the domain evaluator "
        f"(100 x cosine). checker_single = single_colour_shape, checker_pair = pair_overall. "
        f"{dt.date.today().isoformat()}; {machine()}.",
        "",
        "| N | images | checker_single | checker_pair | colour | shape | count | position | overall | "
        "mean evaluator score | seconds |",
        "|" + " --- |" * 11,
        row("plain (seed i)", 1, checker_metrics(to_uint8(single.images), prompts.scenes),
            float(single.best_scores.mean()), single_seconds),
        row(f"candidate 0 of {n} (seed {n}i)", 1, checker_metrics(every[:, 0], prompts.scenes),
            float(best.scores[:, 0].mean()), None),
        row(f"evaluator's best of {n}", n, checker_metrics(kept, prompts.scenes), float(best.best_scores.mean()),
            best_seconds),
        row(f"checker's pick of {n} (ceiling for overall)", n, checker_metrics(oracle, prompts.scenes), None, None),
        "",
        f"Prompts with at least one fully correct candidate among {n}: {100 * correct.any(1).mean():.1f}% "
        f"(candidate 0 alone: {100 * correct[:, 0].mean():.1f}%)."
        + (f" Among those prompts the evaluator kept a correct one for "
           f"{100 * correct[np.arange(P), best.chosen.numpy()][correct.any(1)].mean():.1f}%." if correct.any() else ""),
    ]
    text_out = "\n".join(lines)
    print(text_out)
    if args.out is not None:
        family = cfg.generator.family
        section = "bench_rejection" if family == "masked" else f"bench_rejection_{family}"
        title = "## Rejection sampling (XGen-Image-1)" + ("" if family == "masked" else f", {family} family")
        replace_section(args.out, section, [title, "", *lines])
        print(f"\nwrote the {section} section of {args.out}")


if __name__ == "__main__":
    main()
