"""The `features` stage: frozen-text-encoder token embeddings + masks for every accepted caption.

Each distinct caption is encoded once, ever: results are cached by the sha256 of its UTF-8 text,
so a rerun encodes only captions it has not seen, and training never runs the text encoder.
`out_dir` is that persistent cache (DVC `persist: true`):

    encoder.json                  kind, path, max_length, dtype, dim, fingerprint of the encoder
    packs/pack-NNNNN.safetensors  embeddings [N, L, D] (features.encoder.dtype), mask [N, L] bool;
                                  written once, never rewritten; a run appends packs of new captions
    index.parquet                 caption_sha256 -> pack, row, n_tokens
    items.parquet                 key, split, caption_sha256 of every accepted item (join by key)

A cache built by another encoder (fingerprint: weights, tokenizer, kind, max_length) or stored in
another dtype is discarded and rebuilt. `FeatureStore` is the reader later stages use.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pandas as pd
import pyarrow as pa
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from components.config import CascadeConfig, FeaturesConfig, TextEncoderConfig
from components.errors import BadInputError, StageError
from components.io import ACCEPTED_FILE, sha256_bytes, write_json, write_manifest
from components.io import read_accepted as _read_accepted
from components.stage import Progress, TrackedInput, counter, tracked
from models.text_encoder import FrozenTextEncoder, encoder_fingerprint  # imports transformers only on load

log = logging.getLogger(__name__)


ENCODER_FILE = "encoder.json"
INDEX_FILE = "index.parquet"
ITEMS_FILE = "items.parquet"
PACKS_DIR = "packs"
# Upper bound on one pack's embeddings: bounds memory while encoding, and a killed run keeps the
# packs it finished (so it resumes), yet a small dataset's run still writes a single pack.
PACK_BYTES = 256 << 20

INDEX_SCHEMA = pa.schema([("caption_sha256", pa.string()), ("pack", pa.int64()), ("row", pa.int64()),
                          ("n_tokens", pa.int64())])
ITEMS_SCHEMA = pa.schema([("key", pa.string()), ("split", pa.string()), ("caption_sha256", pa.string())])
DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class FeaturesResult:
    n_items: int
    n_unique_captions: int
    n_cache_hits: int  # unique captions already in the cache
    n_encoded: int  # unique captions encoded by this run
    seconds: float
    fingerprint: str
    dim: int
    n_packs: int
    mean_tokens: float  # real tokens per unique caption, including special tokens
    full_length_fraction: float  # unique captions filling all max_length tokens: likely truncated
    rebuilt_because: str | None = None  # why an existing cache was discarded, if it was

    @property
    def metrics(self) -> dict[str, float]:
        return {
            "n_items": self.n_items,
            "n_unique_captions": self.n_unique_captions,
            "n_cache_hits": self.n_cache_hits,
            "n_encoded": self.n_encoded,
            "n_packs": self.n_packs,
            "seconds": self.seconds,
            "mean_tokens": self.mean_tokens,
            "full_length_fraction": self.full_length_fraction,
        }


def caption_sha256(caption: str) -> str:
    return sha256_bytes(caption.encode("utf-8"))


def pack_path(out_dir: Path, pack: int) -> Path:
    return Path(out_dir) / PACKS_DIR / f"pack-{pack:05d}.safetensors"


@contextmanager
def _written_atomically(path: Path) -> Iterator[Path]:
    """Yields a temporary path to write; renamed onto `path` only once the write has finished."""
    # A killed run never leaves a half-written file, nor edits a file DVC may have linked from its cache.
    tmp = path.with_name(path.name + ".tmp")
    yield tmp
    os.replace(tmp, path)


def read_accepted(validate_dir: Path) -> pd.DataFrame:
    """key, caption, split of the accepted items; BadInputError for anything validate should prevent."""
    path = Path(validate_dir) / ACCEPTED_FILE
    accepted = _read_accepted(validate_dir, ["key", "caption", "split"])
    no_caption = accepted["caption"].isna()
    if no_caption.any():
        raise BadInputError(
            f"{path}: {int(no_caption.sum())} accepted item(s) have no caption (first: key "
            f"{accepted.loc[no_caption, 'key'].iloc[0]!r}); validate should have quarantined them, rerun it"
        )
    duplicated = accepted["key"].duplicated()
    if duplicated.any():
        raise BadInputError(f"{path}: duplicate key {accepted.loc[duplicated, 'key'].iloc[0]!r}; keys must be unique")
    return accepted


def _encoder_meta(cfg: TextEncoderConfig, fingerprint: str, dim: int) -> dict:
    return {"kind": cfg.kind, "path": cfg.path, "max_length": cfg.max_length, "dtype": cfg.dtype,
            "dim": dim, "fingerprint": fingerprint}


def _stale_reason(meta: dict, cfg: TextEncoderConfig, fingerprint: str) -> str | None:
    """Why a cache described by `meta` cannot serve `cfg`, or None when it can."""
    for field, wanted in (("kind", cfg.kind), ("max_length", cfg.max_length), ("dtype", cfg.dtype),
                          ("fingerprint", fingerprint)):
        if meta.get(field) != wanted:
            what = "encoder weights or tokenizer" if field == "fingerprint" else field
            return f"{what} changed ({meta.get(field)!r} -> {wanted!r})"
    return None


def _discard(out_dir: Path) -> None:
    for name in (ENCODER_FILE, INDEX_FILE, ITEMS_FILE):
        (out_dir / name).unlink(missing_ok=True)
    packs = out_dir / PACKS_DIR
    if packs.is_dir():
        for path in packs.iterdir():
            path.unlink()
        packs.rmdir()


def _read_meta(out_dir: Path) -> tuple[dict | None, str | None]:
    """(encoder.json, None), or (None, why what is in out_dir cannot be trusted); (None, None) if empty."""
    meta_path = out_dir / ENCODER_FILE
    if not meta_path.is_file():
        leftovers = (out_dir / INDEX_FILE).exists() or (out_dir / PACKS_DIR).exists()
        return None, (f"{ENCODER_FILE} is missing" if leftovers else None)
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        meta = None
    return (meta, None) if isinstance(meta, dict) else (None, f"{ENCODER_FILE} is unreadable")


def _open_cache(out_dir: Path, cfg: TextEncoderConfig, fingerprint: str) -> tuple[dict | None, pd.DataFrame, str | None]:
    """(encoder meta or None, index of usable cached captions, why an old cache was discarded)."""
    empty = INDEX_SCHEMA.empty_table().to_pandas()
    meta, reason = _read_meta(out_dir)
    if meta is not None:
        reason = _stale_reason(meta, cfg, fingerprint)
    if reason:
        log.warning("features: discarding the cache in %s: %s; rebuilding it", out_dir, reason)
        _discard(out_dir)
        return None, empty, reason
    if meta is None:
        return None, empty, None
    index = pd.read_parquet(out_dir / INDEX_FILE) if (out_dir / INDEX_FILE).is_file() else empty
    present = index["pack"].map(lambda p: pack_path(out_dir, p).is_file())
    if not present.all():  # a deleted pack: drop its rows, they are simply encoded again
        log.warning("features: %d cached captions point at missing packs; re-encoding them", int((~present).sum()))
        index = index[present].reset_index(drop=True)
    referenced = {pack_path(out_dir, p).name for p in index["pack"].unique()}
    for path in (out_dir / PACKS_DIR).glob("pack-*"):
        if path.name not in referenced:  # from a run killed before it indexed the pack
            log.warning("features: removing unindexed %s", path)
            path.unlink()
    return meta, index, None


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _load_encoder(cfg: TextEncoderConfig) -> FrozenTextEncoder:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return FrozenTextEncoder.from_spec(cfg.kind, cfg.path, cfg.max_length, device=device)
    except ValueError as err:
        raise BadInputError(f"features.encoder: {err}") from None


def _encode_pack(encoder: FrozenTextEncoder, captions: list[str], batch_size: int, dtype: torch.dtype,
                 on_batch: Callable[[int], None]) -> tuple[torch.Tensor, torch.Tensor]:
    embeddings, masks = [], []
    for batch in _chunks(captions, batch_size):
        emb, mask = encoder.encode(batch)  # (b, L, D) float32, (b, L) bool
        embeddings.append(emb.to("cpu", dtype))
        masks.append(mask.cpu())
        on_batch(len(batch))
    emb, mask = torch.cat(embeddings), torch.cat(masks)  # (N, L, D), (N, L)
    if not torch.isfinite(emb).all():
        raise StageError(f"features: text embeddings overflow {dtype}; set features.encoder.dtype: float32")
    return emb, mask


def run(cfg: FeaturesConfig, validate_dir: Path, out_dir: Path, progress: Progress = None) -> FeaturesResult:
    """Bring the cache in `out_dir` up to date with `validate_dir/accepted.parquet`; see the module doc."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    enc = cfg.encoder
    accepted = read_accepted(validate_dir)
    shas = [caption_sha256(c) for c in accepted["caption"]]
    unique = dict(zip(shas, accepted["caption"]))  # sha -> caption, first-appearance order

    try:  # hashes the encoder's files only: deciding what is cached must not load the model
        fingerprint = encoder_fingerprint(enc.kind, enc.path, enc.max_length)
    except ValueError as err:
        raise BadInputError(f"features.encoder: {err}") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    meta, index, rebuilt_because = _open_cache(out_dir, enc, fingerprint)
    cached = set(index["caption_sha256"])
    new = [sha for sha in unique if sha not in cached]

    if new or meta is None:
        encoder = _load_encoder(enc)
        if meta is None:
            meta = _encoder_meta(enc, fingerprint, encoder.dim)
            write_json(out_dir / ENCODER_FILE, meta)
        (out_dir / PACKS_DIR).mkdir(exist_ok=True)
        dtype = DTYPES[enc.dtype]
        rows_per_pack = max(1, PACK_BYTES // (enc.max_length * encoder.dim * dtype.itemsize))
        next_pack = int(index["pack"].max()) + 1 if len(index) else 0
        on_batch = counter(progress)

        for pack, chunk in enumerate(_chunks(new, rows_per_pack), start=next_pack):
            emb, mask = _encode_pack(encoder, [unique[sha] for sha in chunk], cfg.batch_size, dtype, on_batch)
            with _written_atomically(pack_path(out_dir, pack)) as tmp:
                save_file({"embeddings": emb, "mask": mask}, str(tmp), metadata={"fingerprint": fingerprint})
            rows = pd.DataFrame({"caption_sha256": chunk, "pack": pack, "row": range(len(chunk)),
                                 "n_tokens": mask.sum(dim=1).numpy()})
            index = pd.concat([index, rows], ignore_index=True)
            # The index is updated after every pack, so a killed run resumes from the last one.
            with _written_atomically(out_dir / INDEX_FILE) as tmp:
                write_manifest(index, tmp, INDEX_SCHEMA)
    if not (out_dir / INDEX_FILE).is_file():  # nothing to encode in a fresh cache (no accepted items)
        write_manifest(index, out_dir / INDEX_FILE, INDEX_SCHEMA)

    items = pd.DataFrame({"key": accepted["key"], "split": accepted["split"], "caption_sha256": shas})
    with _written_atomically(out_dir / ITEMS_FILE) as tmp:
        write_manifest(items, tmp, ITEMS_SCHEMA)

    n_tokens = index.set_index("caption_sha256").loc[list(unique), "n_tokens"]
    return FeaturesResult(
        n_items=len(accepted),
        n_unique_captions=len(unique),
        n_cache_hits=len(unique) - len(new),
        n_encoded=len(new),
        seconds=time.perf_counter() - start,
        fingerprint=fingerprint,
        dim=int(meta["dim"]),
        n_packs=int(index["pack"].nunique()),
        mean_tokens=float(n_tokens.mean()) if len(n_tokens) else 0.0,
        full_length_fraction=float((n_tokens == enc.max_length).mean()) if len(n_tokens) else 0.0,
        rebuilt_because=rebuilt_because,
    )


def execute(cfg: CascadeConfig, validate_dir: Path, out_dir: Path, metrics_file: Path,
            parent_run_id: str | None = None, progress: Progress = None) -> FeaturesResult:
    return tracked(
        "features", cfg, lambda: run(cfg.features, validate_dir, out_dir, progress), metrics_file,
        inputs=lambda: [TrackedInput(Path(validate_dir) / ACCEPTED_FILE, "accepted", "features")],
        artifacts=lambda result: [Path(out_dir) / ENCODER_FILE],
        parent_run_id=parent_run_id,
    )


class FeatureStore:
    """Read side of the cache: embeddings + masks by item key or caption, packs read lazily.

    Only the requested rows are read (safetensors slices of memory-mapped packs), so a lookup
    touches one pack per distinct pack among its rows, not the whole cache.
    """

    def __init__(self, root: Path, encoder: dict, index: pd.DataFrame, items: pd.DataFrame):
        self.root = Path(root)
        self.encoder = encoder  # the encoder.json it was built with
        self.items = items  # key, split, caption_sha256
        self._slot = dict(zip(index["caption_sha256"], zip(index["pack"].tolist(), index["row"].tolist())))
        self._sha_of_key = dict(zip(items["key"], items["caption_sha256"]))
        self._packs: dict[int, object] = {}  # pack number -> open safetensors handle

    @classmethod
    def open(cls, out_dir: Path) -> "FeatureStore":
        out_dir = Path(out_dir)
        files = [out_dir / name for name in (ENCODER_FILE, INDEX_FILE, ITEMS_FILE)]
        if not all(f.is_file() for f in files):
            raise BadInputError(f"{out_dir}: no text features here; run the features stage first (cascade stage features)")
        encoder = json.loads(files[0].read_text())
        return cls(out_dir, encoder, pd.read_parquet(files[1]), pd.read_parquet(files[2]))

    @property
    def dim(self) -> int:
        return int(self.encoder["dim"])

    @property
    def max_length(self) -> int:
        return int(self.encoder["max_length"])

    @property
    def fingerprint(self) -> str:
        return self.encoder["fingerprint"]

    def __len__(self) -> int:
        return len(self.items)

    def keys(self, split: str | None = None) -> list[str]:
        """Item keys in manifest order, optionally of one split."""
        items = self.items if split is None else self.items[self.items["split"] == split]
        return items["key"].tolist()

    def lookup(self, keys: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """keys (B) -> embeddings [B, L, D] float32, mask [B, L] bool."""
        missing = [k for k in keys if k not in self._sha_of_key]
        if missing:
            raise KeyError(f"{len(missing)} key(s) not in the feature store {self.root} (first: {missing[0]!r}); "
                           "were they accepted when the features stage ran?")
        return self._gather([self._sha_of_key[k] for k in keys])

    def by_caption(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """captions (B) -> embeddings [B, L, D] float32, mask [B, L] bool; only captions already encoded."""
        shas = [caption_sha256(c) for c in captions]
        missing = [c for c, sha in zip(captions, shas) if sha not in self._slot]
        if missing:
            raise KeyError(f"{len(missing)} caption(s) not in the feature store {self.root} (first: {missing[0]!r})")
        return self._gather(shas)

    def _pack(self, pack: int):
        if pack not in self._packs:
            self._packs[pack] = safe_open(str(pack_path(self.root, pack)), framework="pt")
        return self._packs[pack]

    def _gather(self, shas: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        emb = torch.empty(len(shas), self.max_length, self.dim)  # (B, L, D)
        mask = torch.empty(len(shas), self.max_length, dtype=torch.bool)  # (B, L)
        by_pack: dict[int, tuple[list[int], list[int]]] = {}  # pack -> (output positions, rows)
        for position, sha in enumerate(shas):
            pack, row = self._slot[sha]
            positions, rows = by_pack.setdefault(pack, ([], []))
            positions.append(position)
            rows.append(row)
        for pack, (positions, rows) in by_pack.items():
            handle = self._pack(pack)
            emb[positions] = handle.get_slice("embeddings")[rows].float()
            mask[positions] = handle.get_slice("mask")[rows]
        return emb, mask

    def __getstate__(self) -> dict:
        # Open file handles do not pickle; DataLoader workers reopen packs on first use.
        return {**self.__dict__, "_packs": {}}
