"""Stage `tokens`: encode every accepted image with both tokenizers, once, for generator training.

out_dir/
    keys.parquet                 key, split, row: the accepted manifest's order (the same order as the
                                 features stage's items.parquet, checked when it is given)
    base/codes.safetensors       "codes": uint16 [N, g, g] token ids (vqgan) or float16 [N, C, g, g] latents (kl)
    base/tokens.json             kind, grid, codebook size, and the content address
    superres/...                 the same for the super-resolution tokenizer

Content-addressed: each tokenizer's codes are keyed by sha256(tokenizer digest + manifest digest).
When out_dir already holds codes with that address (a re-run, or DVC/KFP restoring them), the
encoding is skipped; any other content is re-encoded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from components.config import CascadeConfig, TokensConfig
from components.errors import BadInputError
from components.images import ShardImageDataset
from components.io import frame_digest, write_json, write_manifest
from components.stage import TrackedInput, tracked
from components.tokenizer import WHICH, read_accepted, tokenizers_for

CODES_FILE = "codes.safetensors"
META_FILE = "tokens.json"
KEYS_FILE = "keys.parquet"


def content_address(tokenizer_digest: str, manifest_digest: str) -> str:
    return hashlib.sha256(f"{tokenizer_digest}:{manifest_digest}".encode()).hexdigest()


def _load_tokenizer(directory: Path):
    from models.tokenizer import load_tokenizer, tokenizer_digest

    try:
        return load_tokenizer(directory), tokenizer_digest(directory)
    except ValueError as err:
        raise BadInputError(str(err)) from None


@torch.inference_mode()
def encode_all(model, dataset: ShardImageDataset, batch_size: int, progress: Callable[[int], None] | None) -> np.ndarray:
    codes, done = [], 0
    for batch in torch.utils.data.DataLoader(dataset, batch_size=batch_size):
        encoded = model.encode(batch)  # vqgan: [B, g, g] long; kl: [B, C, g, g] float
        codes.append(encoded.to(torch.int32).numpy().astype(np.uint16) if model.is_vq
                     else encoded.to(torch.float16).numpy())
        done += len(batch)
        if progress:
            progress(done)
    return np.concatenate(codes)


@dataclass(frozen=True)
class TokensResult:
    n_items: int
    encoded: tuple[str, ...]  # tokenizers whose codes were (re)computed
    reused: tuple[str, ...]  # tokenizers whose codes were already there under the same address
    seconds: float

    @property
    def metrics(self) -> dict[str, float]:
        return {"n_items": self.n_items, "n_encoded_tokenizers": len(self.encoded),
                "n_reused_tokenizers": len(self.reused),
                "images_per_second": self.n_items * len(self.encoded) / max(self.seconds, 1e-9)}


def run(cfg: TokensConfig, data_dir: Path, validate_dir: Path, tokenizer_dir: Path, out_dir: Path,
        features_dir: Path | None = None, progress: Callable[[int], None] | None = None,
        which_ones: tuple[str, ...] = WHICH) -> TokensResult:
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    accepted = read_accepted(validate_dir)
    if features_dir is not None:
        _check_aligned(accepted, Path(features_dir))
    manifest_digest = frame_digest(accepted[["key", "sha256"]])
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = pd.DataFrame({"key": accepted["key"], "split": accepted["split"], "row": np.arange(len(accepted))})
    write_manifest(keys, out_dir / KEYS_FILE)

    start = time.perf_counter()
    encoded, reused = [], []
    for stale in set(WHICH) - set(which_ones):  # another family's codes must not be read as current
        if (out_dir / stale).exists():
            shutil.rmtree(out_dir / stale)
    for which in which_ones:
        model, digest = _load_tokenizer(Path(tokenizer_dir) / which)
        address = content_address(digest, manifest_digest)
        target = out_dir / which
        if _address_of(target) == address and (target / CODES_FILE).is_file():
            reused.append(which)
            continue
        codes = encode_all(model, ShardImageDataset(data_dir, accepted, model.spec.resolution), cfg.batch_size, progress)
        target.mkdir(parents=True, exist_ok=True)
        save_file({"codes": codes}, str(target / CODES_FILE))
        write_json(target / META_FILE, {
            "address": address, "tokenizer_digest": digest, "manifest_digest": manifest_digest,
            "kind": model.spec.kind, "grid": model.spec.grid, "codebook_size": model.codebook_size,
            "n_items": len(accepted), "dtype": str(codes.dtype), "shape": list(codes.shape),
        })
        encoded.append(which)
    return TokensResult(len(accepted), tuple(encoded), tuple(reused), time.perf_counter() - start)


def _address_of(target: Path) -> str | None:
    try:
        return json.loads((target / META_FILE).read_text())["address"]
    except (OSError, ValueError, KeyError):
        return None


def _check_aligned(accepted: pd.DataFrame, features_dir: Path) -> None:
    items = features_dir / "items.parquet"
    if not items.is_file():
        raise BadInputError(f"{items}: missing; run the features stage first")
    feature_keys = pd.read_parquet(items, columns=["key"])["key"].tolist()
    if feature_keys != accepted["key"].tolist():
        raise BadInputError(f"{items}: text features were computed for a different accepted set "
                            f"({len(feature_keys)} keys vs {len(accepted)}); re-run the features stage")


class TokenStore:
    """Read precomputed codes by key: what generator training uses instead of the tokenizers."""

    def __init__(self, out_dir: Path):
        from safetensors.numpy import load_file

        self.out_dir = Path(out_dir)
        keys = pd.read_parquet(self.out_dir / KEYS_FILE)
        self._row = dict(zip(keys["key"], keys["row"]))
        self.keys = keys
        present = [w for w in WHICH if (self.out_dir / w / META_FILE).is_file()]  # diffusion: base only
        self.meta = {w: json.loads((self.out_dir / w / META_FILE).read_text()) for w in present}
        self._codes = {w: load_file(str(self.out_dir / w / CODES_FILE))["codes"] for w in present}

    def address(self, which: str) -> str:
        """The content address of one tokenizer's codes (tokenizer digest + manifest digest)."""
        return self.meta[which]["address"]

    def lookup(self, which: str, keys: list[str]) -> torch.Tensor:
        """[B, g, g] long token ids (vqgan) or [B, C, g, g] float32 latents (kl)."""
        rows = [self._row[k] for k in keys]
        codes = self._codes[which][rows]
        return torch.from_numpy(codes.astype(np.int64) if codes.dtype == np.uint16 else codes.astype(np.float32))


def execute(cfg: CascadeConfig, data_dir: Path, validate_dir: Path, tokenizer_dir: Path, out_dir: Path,
            metrics_file: Path, features_dir: Path | None = None, parent_run_id: str | None = None,
            progress: Callable[[int], None] | None = None) -> TokensResult:
    return tracked(
        "tokens", cfg,
        lambda: run(cfg.tokens, data_dir, validate_dir, tokenizer_dir, out_dir, features_dir, progress,
                    tokenizers_for(cfg)),
        metrics_file,
        inputs=lambda: [TrackedInput(Path(validate_dir) / "accepted.parquet", "accepted", "tokens")],
        parent_run_id=parent_run_id,
    )
