"""The base generator alone on the held-out test prompts vs training images, batch and seed.

Answers "what does `tiny` need to reach the issue's targets": each arm trains the base model with
the `base` stage's own Lightning module and loop (components.generator._lightning_module +
fit_generator: AdamW warm-up + cosine, grad clip, text dropout, precision auto = bf16-mixed on a
GPU) on the first --n train scenes, and `evaluate` scores it exactly as the stage does
(components.compositional.check_held_out: the stage's held-out test prompts, default sampler, guidance
default and 0, the exact checker on base-tokenizer decodes).

    # 1. here, after `make demo` (CPU, about 1 min per 16k scenes): base tokens of the first N train
    #    scenes with the demo's base tokenizer (checked against the tokens stage on the shared keys)
    .venv/bin/python benchmarks/bench_base_data.py prepare --n 48000 --out /tmp/base_data
    # 2. anywhere with the repo (a GPU machine: about 7 min per arm on an H100 with three arms sharing
    #    it; --threads 2 each, or six arms on 16 cores ran 4x slower). Options: --lr, --ema-decay,
    #    --width, --depth, --seed, --budget (seconds; a stopped arm records the step it reached),
    #    --precision (bf16-mixed also pays on a CPU with AMX), --checkpoint-every (a killed arm resumes)
    python benchmarks/bench_base_data.py train --data /tmp/base_data --n 48000 --batch 256 --threads 2 --out /tmp/arms/C
    #    (benchmarks/bench_base_data_arms.sh trains a file of arms at once this way)
    # 3. here: score the arms (and the demo's own model for reference), record the table; --cascade
    #    scores the full cascade (the demo's super-res model) with each base model instead
    .venv/bin/python benchmarks/bench_base_data.py evaluate artifacts/base /tmp/arms/* --record
    #    (each model is sampled with the stage's eval_seed_sets seed sets; --seed-sets N overrides it)

Text features are computed in `train` with the configured encoder (features.encoder; --params may
point its path at a local copy) and stored as the features stage stores them (float16). The base
tokenizer is the demo's, trained on the demo's images, not retrained on the larger set.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.common import machine, replace_section  # noqa: E402
from components.compositional import SEED_SET_STRIDE  # noqa: E402
from components.config import load_config  # noqa: E402

CATEGORIES = ("single_colour_shape", "pair_overall", "overall", "colour", "shape", "count", "position")


def prepare(args, cfg) -> None:
    from components.generator import open_stores
    from components.images import square_resize, to_tensor
    from models import shapes
    from models.tokenizer import load_tokenizer

    b, art = cfg.data.builtin, args.artifacts
    tokenizer = load_tokenizer(art / "tokenizer" / "base").eval()
    resolution = cfg.tokenizer.base.resolution
    # the data stage's train scenes: each depends only on (seed, split, index), not on n_train
    train = [scene for _, _, scene in shapes.generate(b.seed, args.n, 0, 0, b.image_size, b.max_objects,
                                                      b.heldout_fraction)]
    captions, tokens = [], []
    with torch.inference_mode():
        for start in range(0, args.n, 256):
            scenes = train[start:start + 256]
            captions += [shapes.caption(s) for s in scenes]
            pixels = torch.stack([to_tensor(square_resize(shapes.render(s, b.image_size).convert("RGB"),
                                                          resolution, f"train-{start}")) for s in scenes])
            tokens.append(tokenizer.encode(pixels).flatten(1).to(torch.int16))  # [b, g*g]
    tokens = torch.cat(tokens)
    store, _ = open_stores(art / "tokens", art / "features")
    shared = [k for k in store.keys[store.keys["split"] == "train"]["key"] if int(k.split("-")[1]) < args.n][::97]
    if shared:
        agree = (store.lookup("base", shared).flatten(1) == tokens[[int(k.split("-")[1]) for k in shared]].long())
        if agree.float().mean() < 0.999:
            raise SystemExit(f"prepare: tokens disagree with the tokens stage on {1 - agree.float().mean():.1%} "
                             "of shared positions: is the artifacts folder from this params.yaml?")
    args.out.mkdir(parents=True, exist_ok=True)
    np.save(args.out / "tokens.npy", tokens.numpy())
    (args.out / "captions.json").write_text(json.dumps(captions))
    print(f"prepare: {len(captions)} scenes, {len(set(captions))} distinct captions -> {args.out}")


def text_features(cfg, data: Path, device: str) -> dict:
    """Per-token features of every caption (deduplicated), float16 as the features stage stores them."""
    from components.features import _encode_pack
    from models.text_encoder import FrozenTextEncoder

    cached = data / "features.pt"
    if cached.exists():
        return torch.load(cached)
    captions = json.loads((data / "captions.json").read_text())
    distinct = sorted(set(captions))
    row = {c: i for i, c in enumerate(distinct)}
    enc = cfg.features.encoder
    encoder = FrozenTextEncoder.from_spec(enc.kind, enc.path, enc.max_length, device=device)
    with torch.inference_mode():  # the features stage's own batch loop: [U, L, D] in enc.dtype, [U, L]
        text, mask = _encode_pack(encoder, distinct, 1024, getattr(torch, enc.dtype), lambda _: None)
    features = {"row": torch.tensor([row[c] for c in captions]), "text": text, "mask": mask}
    torch.save(features, cached)
    return features


def train(args, cfg) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from benchmarks.bench_scaling import stubs
    from components.errors import StageError
    from components.generator import BatchDataset, _lightning_module, fit_generator, spec_for
    from components.training import fingerprint
    from models.masked_transformer import save_generator

    if args.threads:  # arms sharing one machine: torch's default (all cores each) oversubscribes it
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = replace(cfg.base.train, steps=args.steps, batch_size=args.batch,
                checkpoint_every=args.checkpoint_every or cfg.base.train.checkpoint_every,
                precision=args.precision or cfg.base.train.precision,
                seed=cfg.base.train.seed if args.seed is None else args.seed,
                lr=args.lr or cfg.base.train.lr,
                ema_decay=cfg.base.train.ema_decay if args.ema_decay is None else args.ema_decay)
    model_cfg = replace(cfg.base.model, width=args.width or cfg.base.model.width,
                        depth=args.depth or cfg.base.model.depth)
    tokens = torch.from_numpy(np.load(args.data / "tokens.npy")[:args.n].astype(np.int64))  # [n, g*g]
    if len(tokens) < args.n:
        raise SystemExit(f"train: --n {args.n} but {args.data} holds {len(tokens)} scenes; run prepare with a larger --n")
    features = text_features(cfg, args.data, device)
    row, text, mask = features["row"][:args.n], features["text"], features["mask"]
    spec = spec_for(replace(cfg.base, model=model_cfg), *stubs(cfg, text.shape[-1]), "base")

    class FirstN(BatchDataset):
        keys = list(range(args.n))

        def __getitems__(self, indices: list[int]) -> dict:
            r = row[indices]
            return {"tokens": tokens[indices], "text": text[r].float(), "text_mask": mask[r]}

    class Budget(Callback):  # a wall-clock cap (a leased machine's call limit); the step reached is recorded
        def __init__(self) -> None:
            self.start = time.time()

        def on_train_batch_end(self, trainer, *_) -> None:
            if args.budget and time.time() - self.start > args.budget:
                trainer.should_stop = True

    L.seed_everything(t.seed, workers=True, verbose=False)
    module = _lightning_module()(spec.to_dict(), asdict(t), "base")
    start = time.time()
    try:
        # a re-run of the same arm resumes its checkpoint; any other arm starts afresh
        run = fingerprint(spec=spec.to_dict(), train=asdict(t), data=str(args.data.resolve()), n=args.n)
        steps_done = fit_generator("base", module, FirstN(), t, Path("/tmp/bench_base_data_ckpt") / run[:16], run,
                                   callbacks=[Budget()]).trainer.global_step
    except StageError as err:  # stopped by the budget: fit says at which step
        steps_done = int(str(err).split("at step ")[1].split()[0])
    seconds = time.time() - start
    arm = {"n": args.n, "batch": args.batch, "steps": args.steps, "seed": t.seed, "budget": args.budget,
           "precision": t.precision, "lr": t.lr, "ema_decay": t.ema_decay, "width": model_cfg.width,
           "depth": model_cfg.depth}
    save_generator(module.model.eval().float().cpu(), args.out,
                   extra={"sample": asdict(cfg.base.sample), "arm": arm, "steps_done": steps_done,
                          "seconds": seconds, "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu"})
    print(json.dumps({"out": str(args.out), **arm, "steps_done": steps_done, "seconds": round(seconds, 1)}))


def evaluate(args, cfg) -> None:
    from components.base import base_generate
    from components.compositional import check_held_out
    from models.masked_transformer import load_generator
    from models.sampling import SamplerSettings
    from models.tokenizer import load_tokenizer

    art = args.artifacts
    if args.seed_sets is not None:  # the stage check's own setting unless overridden
        cfg = replace(cfg, base=replace(cfg.base, eval_seed_sets=args.seed_sets),
                      superres=replace(cfg.superres, eval_seed_sets=args.seed_sets))
    decoder = load_tokenizer(art / "tokenizer" / "base")
    superres = load_generator(art / "superres") if args.cascade else None
    rows = []
    for d in args.models:
        meta = json.loads((d / "generator.json").read_text())
        if args.cascade:  # the superres stage's own check, with this base model in the cascade
            from components.cascades import checked_generate
            from components.superres import load_cascade

            generate = checked_generate(load_cascade(cfg, d, art / "tokenizer", superres_model=superres,
                                                     text_dim=superres.spec.text_dim))
            checked = cfg.superres
        else:
            generate = base_generate(load_generator(d).eval(), decoder, SamplerSettings(**asdict(cfg.base.sample)))
            checked = cfg.base
        with torch.inference_mode():
            m = check_held_out(generate, checked, art / "features", art / "validate", args.scratch / d.name)
        rows.append((d, meta, m))
        print(json.dumps({"model": str(d), **{k: round(v, 4) for k, v in m.items() if k.startswith("checker_")}}))
    arm_cols = ("n", "batch", "steps", "seed", "lr", "ema_decay", "width")
    title = f" (`--section {args.section}`)" if args.section else ""
    sets = (cfg.superres if args.cascade else cfg.base).eval_seed_sets
    when = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())
    if args.cascade:
        head = ["## The cascade with these base models (`bench_base_data.py evaluate --cascade`)" + title, "",
                f"Scored on {when} by the superres stage's own check ({cfg.superres.eval_prompts} held-out test prompts, "
                f"the demo's super-res model `{art / 'superres'}` and tokenizers, default sampling); scoring machine: "
                f"{machine()}."]
    else:
        head = ["## Base generator alone vs training images and batch (`bench_base_data.py`)" + title, "",
                f"Scored by `benchmarks/bench_base_data.py evaluate` on {when}: the base stage's own check "
                f"(components.compositional.check_held_out: {cfg.base.eval_prompts} held-out test prompts, sampler "
                f"{cfg.base.sample.steps} steps, temperature {cfg.base.sample.temperature:g}, exact checker on "
                f"base-tokenizer decodes); scoring machine: {machine()}."]
    set_cols = []
    if sets > 1:
        head += ["", f"Seed sets: the categories are seed set 0 (seed i for prompt i, the stage's fixed-seed figure); "
                     f"`single/pair by set` lists sets 0..{sets - 1} (seeds j * {SEED_SET_STRIDE} + i) at the default "
                     f"guidance, and `mean` is their mean."]
        set_cols = ["single by set", "single mean", "pair by set", "pair mean"]
    lines = [
        *head,
        "",
        "| model | images | batch | steps | seed | lr | EMA | width | trained on | train min | single | pair | overall | colour | "
        "shape | count | position | single g0 | pair g0 |" + "".join(f" {c} |" for c in set_cols),
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |" + " ---: |" * (9 + len(set_cols)),
    ]
    for d, meta, m in rows:
        arm = meta.get("arm", {})
        # arms trained before lr / EMA / width were arm options used params' values and say so in their spec
        known = {"lr": cfg.base.train.lr, "ema_decay": cfg.base.train.ema_decay, "width": meta["spec"]["width"]}
        cells = [str(arm.get(c, known.get(c, "-"))) for c in arm_cols]
        if meta.get("steps_done", arm.get("steps")) != arm.get("steps", "-"):  # stopped by its time budget
            cells[arm_cols.index("steps")] = f"{meta['steps_done']} of {arm['steps']}"
        minutes = f"{meta['seconds'] / 60:.1f}" if "seconds" in meta else "-"
        scores = [f"{100 * m[f'checker_{c}']:.1f}%" for c in CATEGORIES]
        scores += [f"{100 * m[f'checker_{c}_g0']:.1f}%" for c in CATEGORIES[:2]]
        for c in (CATEGORIES[:2] if set_cols else ()):
            scores += [" / ".join(f"{100 * m[f'checker_{c}_set{j}']:.1f}" for j in range(sets)),
                       f"**{100 * m[f'checker_{c}_mean']:.1f}%**"]
        lines.append(f"| `{d.name}` | " + " | ".join(cells) + f" | {meta.get('device', '-')} | {minutes} | "
                     + " | ".join(scores) + " |")
    lines.append("")
    if args.record:
        section = "bench_base_data" + ("_cascade" if args.cascade else "") + (f"_{args.section}" if args.section else "")
        print(replace_section(args.record, section, lines))
    else:
        print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--profile", default=None)
    parser.add_argument("--artifacts", type=Path, default=REPO / "artifacts")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="base tokens + captions of the first --n train scenes")
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("train", help="one arm: the base stage's module and loop on the first --n scenes")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--batch", type=int, default=None, help="default: base.train.batch_size")
    p.add_argument("--steps", type=int, default=None, help="default: base.train.steps")
    p.add_argument("--seed", type=int, default=None, help="default: base.train.seed")
    p.add_argument("--lr", type=float, default=None, help="default: base.train.lr")
    p.add_argument("--ema-decay", type=float, default=None, help="default: base.train.ema_decay (0 = off)")
    p.add_argument("--width", type=int, default=None, help="default: base.model.width")
    p.add_argument("--depth", type=int, default=None, help="default: base.model.depth")
    p.add_argument("--budget", type=float, default=None, help="stop after this many seconds (recorded)")
    p.add_argument("--precision", default=None,
                   help="default: base.train.precision (auto: bf16-mixed on a GPU, fp32 on a CPU; bf16-mixed pays on "
                        "a CPU with AMX, README: bf16 on a CPU)")
    p.add_argument("--checkpoint-every", type=int, default=None,
                   help="default: base.train.checkpoint_every; a killed arm re-run with the same options resumes")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's, all cores); 2 per arm when arms share a machine")
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("evaluate", help="held-out test checker of trained arms")
    p.add_argument("models", type=Path, nargs="+")
    p.add_argument("--cascade", action="store_true",
                   help="score the full cascade (the demo's super-res model) with each base model instead of it alone")
    p.add_argument("--seed-sets", type=int, default=None,
                   help="seed sets per prompt at the default guidance (default: the checked stage's eval_seed_sets)")
    p.add_argument("--scratch", type=Path, default=Path("/tmp/bench_base_data"), help="sample grids go here")
    p.add_argument("--record", type=Path, nargs="?", const=REPO / "benchmarks" / "RESULTS.md", default=None)
    p.add_argument("--section", default=None,
                   help="record into a RESULTS.md section of this name (heading suffix) instead of the default one")
    args = parser.parse_args()
    cfg = load_config(args.params, args.profile)
    if args.command == "train":
        args.batch = args.batch or cfg.base.train.batch_size
        args.steps = args.steps or cfg.base.train.steps
    {"prepare": prepare, "train": train, "evaluate": evaluate}[args.command](args, cfg)


if __name__ == "__main__":
    main()
