"""Helpers shared by the benchmark scripts: the machine description and RESULTS.md sections."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

import torch


def machine() -> str:
    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none available to this task"
    return (f"CPU {cpu}, {os.cpu_count()} cores (torch threads {torch.get_num_threads()}); GPU: {gpu}; "
            f"python {platform.python_version()}, torch {torch.__version__}")


def replace_section(path: Path, name: str, body_lines: list[str]) -> str:
    """Rewrite the `<!-- name:start/end -->` block of `path` (appended if absent); returns the block."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = "\n".join([start, *body_lines, end])
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)
    return block


class OnlineInputs:
    """What generator training would read without the tokens and features stages: base-resolution
    pixels decoded from the shards, the base tokenizer, and captions through the frozen text encoder.
    The baseline of the precompute benchmarks (bench_generator, bench_diffusion)."""

    def __init__(self, cfg, artifacts: Path):
        from components.images import ShardImageDataset
        from components.io import read_accepted
        from models.text_encoder import FrozenTextEncoder
        from models.tokenizer import load_tokenizer

        self.accepted = accepted = read_accepted(artifacts / "validate",
                                                 ["key", "shard", "image_member", "sha256", "split", "caption"])
        self.images = ShardImageDataset(artifacts / "data", accepted, cfg.tokenizer.base.resolution)
        self.index_of = {k: i for i, k in enumerate(accepted["key"])}
        self.captions = dict(zip(accepted["key"], accepted["caption"]))
        self.tokenizer = load_tokenizer(artifacts / "tokenizer" / "base")
        enc = cfg.features.encoder
        self.encoder = FrozenTextEncoder.from_spec(enc.kind, enc.path, enc.max_length)

    def pixels(self, keys: list[str]) -> torch.Tensor:
        """[B,3,R,R]: decode + resize from the shards."""
        return torch.stack([self.images[self.index_of[k]] for k in keys])

    def text(self, keys: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder.encode([self.captions[k] for k in keys])
