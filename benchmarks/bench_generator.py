"""Base-generator training step from precomputed data vs online encoding; full-cascade sampling throughput.

Training step (same model, batch, optimizer, keys; one process, interleaved repeats):
  precomputed  tokens from the `tokens` stage + text features from the `features` stage (what the
               `base` stage trains on), then forward/backward/AdamW step
  online       the same batch read from the image shards, tokenized by the base tokenizer and its
               captions encoded by the frozen text encoder, then the same step
Sampling: the full cascade (text encoder -> base -> super-res -> decoder) at the profile's default
steps and guidance, batches of --batch prompts, images/s.

Reads the trained pipeline's outputs (run `make demo` first):

    .venv/bin/python benchmarks/bench_generator.py --steps 30
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import OnlineInputs, machine, replace_section  # noqa: E402
from components.config import load_config  # noqa: E402
from components.generator import TokenTextDataset, draw_masks, open_stores, spec_for  # noqa: E402


def make_step(cfg, spec):
    """One training step on a batch dict; the same code for both data paths."""
    from models.masked_transformer import MaskedTransformer, masked_token_loss

    torch.manual_seed(0)
    model = MaskedTransformer(spec).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, betas=tuple(cfg.train.betas))
    g = torch.Generator().manual_seed(0)

    def step(batch: dict) -> None:
        tokens = batch["tokens"]
        masked, dropped = draw_masks(g, *tokens.shape, cfg.train.text_dropout)
        logits = model(tokens.masked_fill(masked, spec.mask_id), batch["text"], batch["text_mask"] & ~dropped[:, None])
        loss = masked_token_loss(logits, tokens, masked)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def online_batch(keys: list[str], online: OnlineInputs) -> dict:
    """What training would do without the tokens and features stages."""
    with torch.no_grad():
        tokens = online.tokenizer.encode(online.pixels(keys)).flatten(1)
    text, mask = online.text(keys)
    return {"tokens": tokens, "text": text, "text_mask": mask}


def timed_steps(step, batches) -> float:
    start = time.perf_counter()
    for make in batches:
        step(make())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default=None, help="params.yaml profile (default: params.yaml's)")
    parser.add_argument("--artifacts", type=Path, default=REPO / "artifacts")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32, help="prompts per sampling batch")
    parser.add_argument("--sample-batches", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "RESULTS.md")
    args = parser.parse_args()

    from components.superres import load_for_inference

    cfg = load_config(REPO / "params.yaml", args.profile)
    art = args.artifacts
    tokens, features = open_stores(art / "tokens", art / "features")
    spec = spec_for(cfg.base, tokens, features, "base")
    keys = tokens.keys[tokens.keys["split"] == "train"]["key"].tolist()
    dataset = TokenTextDataset(tokens, features, keys, "base")
    inputs = OnlineInputs(cfg, art)

    rng = np.random.default_rng(0)
    batch_keys = [[keys[i] for i in rng.integers(0, len(keys), cfg.base.train.batch_size)] for _ in range(args.steps)]
    pre_idx = [[dataset.keys.index(k) for k in b] for b in batch_keys]
    step = make_step(cfg.base, spec)
    step(dataset.__getitems__(pre_idx[0]))  # warm-up
    pre, online = [], []
    for _ in range(args.repeats):
        pre.append(timed_steps(step, [lambda i=i: dataset.__getitems__(i) for i in pre_idx]))
        online.append(timed_steps(step, [lambda b=b: online_batch(b, inputs)
                                         for b in batch_keys]))
    pre_s, online_s = min(pre) / args.steps, min(online) / args.steps

    cascade = load_for_inference(cfg, art / "base", art / "superres", art / "tokenizer")
    test = inputs.accepted[inputs.accepted["split"] == "test"]["caption"].tolist()
    prompts = (test * (1 + args.batch * args.sample_batches // max(len(test), 1)))[:args.batch * args.sample_batches]
    cascade.generate(prompts[:2], seed=0)  # warm-up
    start = time.perf_counter()
    for i in range(args.sample_batches):
        cascade.generate(prompts[i * args.batch:(i + 1) * args.batch], seed=i * args.batch)
    sample_s = time.perf_counter() - start
    n_images = args.batch * args.sample_batches
    s = cascade.settings
    tokens_per_step = cfg.base.train.batch_size * spec.n_tokens

    lines = [
        "## Generators: training step from precomputed data vs online encoding; cascade sampling",
        "",
        f"Regenerated by `benchmarks/bench_generator.py --steps {args.steps}` (profile {cfg.profile}); "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
        f"Machine: {machine()}.",
        f"Base model: {cfg.base.model.depth} layers x {cfg.base.model.width}, {spec.n_tokens} tokens "
        f"({spec.grid}x{spec.grid}), codebook {spec.codebook_size}, batch {cfg.base.train.batch_size}; "
        f"best of {args.repeats} interleaved runs of {args.steps} steps.",
        "",
        "| what | seconds/step | tokens/s | vs precomputed |",
        "| --- | ---: | ---: | --- |",
        f"| base step, precomputed tokens + text features (the `base` stage's path) | {pre_s:.3f} | "
        f"{tokens_per_step / pre_s:,.0f} | - |",
        f"| base step, online: decode shards + tokenize + encode captions | {online_s:.3f} | "
        f"{tokens_per_step / online_s:,.0f} | {online_s / pre_s:.2f}x slower (precompute speedup {online_s / pre_s:.2f}x) |",
        "",
        f"Full-cascade sampling: {n_images} images in {sample_s:.1f} s = **{n_images / sample_s:.2f} images/s** "
        f"(batches of {args.batch}; base {s.base.steps} steps at guidance {s.base.guidance:g}, super-res "
        f"{s.superres.steps} steps at guidance {s.superres.guidance:g}, {cascade.resolution}px output; guided "
        "steps run the conditional and unconditional passes as one batch).",
        "",
    ]
    print(replace_section(args.out, "bench_generator", lines))


if __name__ == "__main__":
    main()
