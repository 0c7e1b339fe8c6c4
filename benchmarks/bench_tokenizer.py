"""Tokenizer training throughput: the Lightning stage vs a plain PyTorch loop, plus token precompute.

Both loops train the same ImageTokenizer spec, on the same images, batch size, optimizer and loss
(L1 + L2 + codebook/commitment; the GAN is off in both), for the same number of steps, in one
process, one after the other. The stage's time is Lightning's `fit` (checkpointing included); the
plain loop is a bare `for` loop over the same DataLoader. Each loop also runs a fifth of the steps,
so that the cost of a step (the difference over the extra steps) is told apart from the fixed cost
of a run (Lightning's start-up, two checkpoint writes). The stage also runs under `precision:
bf16-mixed`, which pays on CPUs with bf16 matrix units (AMX) and is fp32 under `auto` on a CPU.
Then the `tokens` stage's encoding rate.

    .venv/bin/python benchmarks/bench_tokenizer.py --profile tiny --steps 200
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from components import data, tokenizer, tokens, validate  # noqa: E402
from components.config import load_config  # noqa: E402
from components.images import ShardImageDataset  # noqa: E402
from benchmarks.common import machine, replace_section  # noqa: E402

NOISE_NOTE = ("A step of the stage measured faster than a step of the baseline: the difference is run-to-run "
              "noise on a shared CPU, i.e. Lightning adds no measurable overhead here.")


def plain_loop(cfg, which: str, dataset, steps: int) -> float:
    """The baseline: the same model, data, optimizer and loss in a bare PyTorch loop; returns seconds."""
    from models.tokenizer import ImageTokenizer

    t = cfg.train
    torch.manual_seed(t.seed)
    model = ImageTokenizer(tokenizer.spec_for(cfg, which)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=t.lr, betas=tuple(t.betas))
    sampler = torch.utils.data.RandomSampler(dataset, replacement=True, num_samples=steps * t.batch_size)
    loader = torch.utils.data.DataLoader(dataset, batch_size=t.batch_size, sampler=sampler, drop_last=True)
    start = time.perf_counter()
    for images in loader:
        out = model(images)
        loss = (t.l1_weight * (out.recon - images).abs().mean() + t.l2_weight * (out.recon - images).pow(2).mean()
                + t.reg_weight * out.reg_loss)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start


def with_steps(cfg, steps: int, precision: str | None = None):
    """cfg trained for `steps` (two checkpoint writes whatever the length), optionally at another precision."""
    return replace(cfg, train=replace(cfg.train, steps=steps, checkpoint_every=max(1, steps // 2),
                                      precision=precision or cfg.train.precision))


def stage_loop(cfg, which: str, data_dir: Path, accepted, work: Path) -> float:
    """The stage's Lightning training; returns the seconds `fit` took."""
    metrics = tokenizer.train_one(cfg, which, data_dir, accepted, work / "out", work / f"ckpt-{time.time_ns()}")
    return metrics["train_seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="tiny")
    parser.add_argument("--which", default="base", choices=tokenizer.WHICH)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()

    cfg = load_config(REPO / "params.yaml", args.profile)
    tcfg = with_steps(replace(cfg.tokenizer, train=replace(cfg.tokenizer.train, disc_start=10**9, restart_every=0)),
                      args.steps)
    short_steps = max(1, args.steps // 5)
    # --steps is the budget of both loops, and the plain loop does not augment: drop the stage's own settings
    tcfg = replace(tcfg, train=replace(tcfg.train, augment=()),
                   **{which: replace(getattr(tcfg, which), train_steps=None, augment=None) for which in tokenizer.WHICH})
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data.run(cfg.data, work / "data")
        validate.run(cfg.validate, work / "data", work / "validate")
        accepted = tokenizer.read_accepted(work / "validate")
        dataset = ShardImageDataset(work / "data", accepted[accepted["split"] == "train"],
                                    getattr(tcfg, args.which).resolution)
        plain_loop(tcfg, args.which, dataset, 5)  # warm-up: allocator, kernels
        plain, stage, plain_short, stage_short, stage_bf16 = [], [], [], [], []
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits all alike
            plain.append(plain_loop(tcfg, args.which, dataset, args.steps))
            stage.append(stage_loop(tcfg, args.which, work / "data", accepted, work))
            plain_short.append(plain_loop(tcfg, args.which, dataset, short_steps))
            stage_short.append(stage_loop(with_steps(tcfg, short_steps), args.which, work / "data", accepted, work))
            stage_bf16.append(stage_loop(with_steps(tcfg, args.steps, "bf16-mixed"), args.which, work / "data",
                                         accepted, work))
        images = args.steps * tcfg.train.batch_size
        plain_s, stage_s, bf16_s = min(plain), min(stage), min(stage_bf16)
        # the cost of one more step: the extra time over the extra steps; the rest is the run's fixed cost
        plain_step = (plain_s - min(plain_short)) / (args.steps - short_steps)
        stage_step = (stage_s - min(stage_short)) / (args.steps - short_steps)

        short = replace(tcfg, train=replace(tcfg.train, steps=1))
        tokenizer.run(short, work / "data", work / "validate", work / "tok", work / "ckpt-enc")
        encode = tokens.run(cfg.tokens, work / "data", work / "validate", work / "tok", work / "tokens")
        rerun = tokens.run(cfg.tokens, work / "data", work / "validate", work / "tok", work / "tokens")

    overhead = stage_s / plain_s - 1
    step_overhead = stage_step / plain_step - 1
    batch = tcfg.train.batch_size
    rows = [
        ("plain PyTorch loop (baseline)", images, plain_s, images / plain_s, "-"),
        ("tokenizer stage (Lightning fit, checkpoints on)", images, stage_s, images / stage_s,
         f"{stage_s / plain_s:.3f}x time ({overhead:+.1%} overhead)"),
        ("one more step, plain loop (baseline)", batch, plain_step, batch / plain_step, "-"),
        ("one more step, tokenizer stage", batch, stage_step, batch / stage_step,
         f"{stage_step / plain_step:.3f}x time ({step_overhead:+.1%} overhead); the stage's fixed cost per run "
         f"{stage_s - args.steps * stage_step:.1f} s vs {plain_s - args.steps * plain_step:.1f} s"),
        ("tokenizer stage, `precision: bf16-mixed`", images, bf16_s, images / bf16_s,
         f"{stage_s / bf16_s:.2f}x faster than the stage in fp32 (`auto` on a CPU)"),
        ("tokens stage: encode with both tokenizers", encode.n_items * 2, encode.seconds,
         encode.n_items * 2 / encode.seconds, "-"),
        ("tokens stage re-run (content address unchanged)", encode.n_items * 2, rerun.seconds,
         encode.n_items * 2 / max(rerun.seconds, 1e-9), f"{encode.seconds / max(rerun.seconds, 1e-9):.0f}x faster"),
    ]
    spec = getattr(tcfg, args.which)
    lines = [
        "## Tokenizer: training throughput vs a plain PyTorch loop, token precompute",
        "",
        f"Regenerated by `benchmarks/bench_tokenizer.py --profile {args.profile} --which {args.which} "
        f"--steps {args.steps}`; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"Machine: {machine()}.",
        f"Model: {tcfg.kind} {args.which}, {spec.resolution}px, f{spec.downsample}, channels {list(spec.channels)}, "
        f"codebook {spec.codebook_size}; batch {tcfg.train.batch_size}; best of {args.repeats} interleaved runs "
        f"of {args.steps} and {short_steps} steps (\"one more step\": the extra time over the {args.steps - short_steps} extra "
        f"steps); each stage run includes Lightning's start-up and 2 checkpoint writes.",
        NOISE_NOTE if step_overhead < 0 else "",
        "",
        "| what | images | seconds | images/s | vs baseline |",
        "| --- | ---: | ---: | ---: | --- |",
        *[f"| {w} | {n:,} | {s:.3f} | {n / s if s else 0:,.1f} | {note} |" for w, n, s, _, note in rows],
        "",
    ]
    print(replace_section(args.out, "bench_tokenizer", lines))


if __name__ == "__main__":
    main()
