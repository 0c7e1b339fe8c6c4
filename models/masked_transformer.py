"""Muse's masked image-token transformer: the base generator and the super-resolution generator.

    image tokens [B, N] (ids in [0, K) or MASK = K)  --token + learned 2D position embedding-->
    blocks of (self-attention, cross-attention to the context, MLP)  --> logits [B, N, K]

    context = [NULL; projected text tokens]                          (base)
    context = [NULL; projected text tokens; low-res token features]  (super-res, Muse fig. 3:
              the low-res token map is embedded, passed through `cond_depth` self-attention
              layers and concatenated with the text embeddings as cross-attention keys)
    cond_add: the same low-res features, nearest-upsampled to the image grid, are also added to
              the image-token embeddings, so each token sees the low-res cell it refines without
              first learning to find it by attention (ours, not Muse's; see README, Generators)

Text embeddings come from the frozen encoder, are linearly projected and are never masked.
NULL is one learned context token that is always attended to: dropping the text for
classifier-free guidance masks the text positions out, and attention still has a key.

Ours rather than diffusers' UVit2DModel: that model is deprecated in diffusers 0.42, requires
pooled text plus micro-conditioning, and has no path for a low-res token map.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.weights import directory_digest, load_saved, read_meta, save_module, spec_from_dict

FORMAT = "cascade-masked-transformer"
FORMAT_VERSION = 1
WEIGHTS_FILE = "generator.safetensors"
SPEC_FILE = "generator.json"


@dataclass(frozen=True)
class MaskedTransformerSpec:
    """Typed architecture; saved next to the weights."""

    codebook_size: int  # K: the tokenizer's codebook; the vocabulary is K + 1 (MASK = K)
    grid: int  # image token grid side (tokenizer resolution // downsample)
    text_dim: int  # frozen text encoder width
    text_length: int  # text positions (the encoder's max_length)
    width: int
    depth: int
    heads: int
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    cond_codebook_size: int = 0  # super-res: the low-res tokenizer's codebook; 0 = a base model
    cond_grid: int = 0  # super-res: low-res token grid side
    cond_depth: int = 0  # super-res: self-attention layers over the low-res token map
    cond_add: bool = False  # super-res: also add the low-res features to the image tokens they cover

    def __post_init__(self):
        def bad(msg: str) -> ValueError:
            return ValueError(f"masked transformer spec: {msg}")

        for name in ("codebook_size", "grid", "text_dim", "text_length", "width", "depth", "heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(f"{name} must be a positive integer, got {value!r}")
        if self.width % self.heads:
            raise bad(f"width {self.width} is not divisible by heads {self.heads}")
        if not 0 <= self.dropout < 1:
            raise bad(f"dropout must be in [0, 1), got {self.dropout}")
        if (self.cond_codebook_size > 0) != (self.cond_grid > 0):
            raise bad("a super-res model needs both cond_codebook_size and cond_grid (a base model neither), "
                      f"got {self.cond_codebook_size} and {self.cond_grid}")
        if self.cond_depth and not self.is_superres:
            raise bad(f"cond_depth {self.cond_depth} needs a low-res token map (cond_grid > 0)")
        if self.cond_add and not self.is_superres:
            raise bad("cond_add needs a low-res token map (cond_grid > 0)")
        if self.cond_add and self.grid % self.cond_grid:
            raise bad(f"cond_add needs the token grid {self.grid} to be a multiple of the low-res grid {self.cond_grid}")

    @property
    def mask_id(self) -> int:
        return self.codebook_size

    @property
    def vocab_size(self) -> int:
        return self.codebook_size + 1

    @property
    def n_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def is_superres(self) -> bool:
        return self.cond_grid > 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MaskedTransformerSpec:
        return spec_from_dict(cls, d, "masked transformer")


def check_tokenizer_contract(spec: MaskedTransformerSpec, codebook_size: int, grid: int,
                             cond_codebook_size: int = 0, cond_grid: int = 0, what: str = "generator") -> None:
    """The cascade's contracts: vocabulary = codebook + MASK, token grids = the tokenizers' grids."""
    if spec.vocab_size != codebook_size + 1:
        raise ValueError(f"{what}: vocabulary {spec.vocab_size} != tokenizer codebook {codebook_size} + 1 (MASK)")
    if spec.grid != grid:
        raise ValueError(f"{what}: token grid {spec.grid}x{spec.grid} != the tokenizer's {grid}x{grid} "
                         "(resolution // downsample)")
    if spec.is_superres:
        if spec.cond_codebook_size != cond_codebook_size:
            raise ValueError(f"{what}: low-res vocabulary {spec.cond_codebook_size} != base tokenizer codebook "
                             f"{cond_codebook_size}")
        if spec.cond_grid != cond_grid:
            raise ValueError(f"{what}: low-res grid {spec.cond_grid}x{spec.cond_grid} != the base tokenizer's "
                             f"{cond_grid}x{cond_grid}")


def attention(q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None, dropout_p: float) -> Tensor:
    """Scaled dot-product attention. On a CPU in bf16/fp16 (autocast) it runs in fp32, outside autocast:
    the CPU kernels' bf16 backward took longer than the rest of the training step, which was then no
    faster than fp32; with it the bf16 step is 1.4-1.7x faster than fp32 (README, Generators: bf16 on
    a CPU)."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask,
                                               dropout_p=dropout_p)
        return y.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor, context: Tensor, context_mask: Tensor | None = None) -> Tensor:
        B, N, W = x.shape
        M = context.shape[1]
        q = self.q(x).view(B, N, self.heads, -1).transpose(1, 2)  # [B,h,N,d]
        k, v = self.kv(context).view(B, M, 2, self.heads, -1).permute(2, 0, 3, 1, 4)  # 2 x [B,h,M,d]
        attn_mask = None if context_mask is None else context_mask[:, None, None, :]  # [B,1,1,M] True = attend
        y = attention(q, k, v, attn_mask, self.dropout if self.training else 0.0)  # [B,h,N,d]
        return self.out(y.transpose(1, 2).reshape(B, N, W))


class Block(nn.Module):
    """Pre-norm self-attention, cross-attention to the context (optional), MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, dropout: float, cross: bool):
        super().__init__()
        self.norm_self = nn.LayerNorm(width)
        self.self_attn = Attention(width, heads, dropout)
        self.norm_cross = nn.LayerNorm(width) if cross else None
        self.cross_attn = Attention(width, heads, dropout) if cross else None
        self.norm_mlp = nn.LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, width))

    def forward(self, x: Tensor, context: Tensor | None = None, context_mask: Tensor | None = None) -> Tensor:
        h = self.norm_self(x)
        x = x + self.self_attn(h, h)
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), context, context_mask)
        return x + self.mlp(self.norm_mlp(x))


class Position2D(nn.Module):
    """Learned 2D position embedding: a row vector plus a column vector per grid cell."""

    def __init__(self, grid: int, width: int):
        super().__init__()
        self.rows = nn.Parameter(torch.randn(grid, 1, width) * 0.02)
        self.cols = nn.Parameter(torch.randn(1, grid, width) * 0.02)

    def forward(self) -> Tensor:
        return (self.rows + self.cols).flatten(0, 1)  # [grid*grid, W], row-major like the token maps


class MaskedTransformer(nn.Module):
    def __init__(self, spec: MaskedTransformerSpec):
        super().__init__()
        self.spec = s = spec
        self.token_embedding = nn.Embedding(s.vocab_size, s.width)
        self.position = Position2D(s.grid, s.width)
        self.text_proj = nn.Linear(s.text_dim, s.width)
        self.null_context = nn.Parameter(torch.randn(1, 1, s.width) * 0.02)
        if s.is_superres:
            self.cond_embedding = nn.Embedding(s.cond_codebook_size, s.width)
            self.cond_position = Position2D(s.cond_grid, s.width)
            self.cond_blocks = nn.ModuleList(Block(s.width, s.heads, s.mlp_ratio, s.dropout, cross=False)
                                             for _ in range(s.cond_depth))
        self.blocks = nn.ModuleList(Block(s.width, s.heads, s.mlp_ratio, s.dropout, cross=True) for _ in range(s.depth))
        self.norm = nn.LayerNorm(s.width)
        self.head = nn.Linear(s.width, s.codebook_size)  # MASK is never a prediction target
        self.apply(self._init)

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)

    def _check_inputs(self, tokens: Tensor, text: Tensor, text_mask: Tensor, cond_tokens: Tensor | None) -> None:
        s = self.spec
        if tokens.ndim != 2 or tokens.shape[1] != s.n_tokens:
            raise ValueError(f"tokens must be [B, {s.n_tokens}] ({s.grid}x{s.grid} grid), got {list(tokens.shape)}")
        if text.ndim != 3 or text.shape[2] != s.text_dim:
            raise ValueError(f"text must be [B, L, {s.text_dim}], got {list(text.shape)}")
        if text_mask.shape != text.shape[:2]:
            raise ValueError(f"text_mask {list(text_mask.shape)} does not match text {list(text.shape[:2])}")
        if s.is_superres and (cond_tokens is None or cond_tokens.shape[1:] != (s.cond_grid * s.cond_grid,)):
            got = None if cond_tokens is None else list(cond_tokens.shape)
            raise ValueError(f"a super-res model needs cond_tokens [B, {s.cond_grid ** 2}], got {got}")

    def low_res_features(self, cond_tokens: Tensor) -> Tensor:
        """cond_tokens [B, M] -> embedded low-res map after the cond blocks [B, M, W]."""
        c = self.cond_embedding(cond_tokens) + self.cond_position()  # [B,M,W]
        for block in self.cond_blocks:
            c = block(c)
        return c

    def upsample_to_grid(self, c: Tensor) -> Tensor:
        """[B, M, W] on the low-res grid -> [B, N, W] on the image grid (nearest: each cell covers a block)."""
        s = self.spec
        B, _, W = c.shape
        factor = s.grid // s.cond_grid
        c = c.view(B, s.cond_grid, 1, s.cond_grid, 1, W).expand(-1, -1, factor, -1, factor, -1)
        return c.reshape(B, s.n_tokens, W)  # row-major like the token maps

    def context(self, text: Tensor, text_mask: Tensor, low_res: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Cross-attention keys [B, 1+L(+M), W] and their mask [B, 1+L(+M)] (True = attend);
        low_res [B, M, W] from low_res_features (super-res)."""
        B = text.shape[0]
        parts = [self.null_context.expand(B, -1, -1), self.text_proj(text)]  # [B,1,W], [B,L,W]
        masks = [torch.ones(B, 1, dtype=torch.bool, device=text.device), text_mask.bool()]
        if low_res is not None:
            parts.append(low_res)
            masks.append(torch.ones(low_res.shape[:2], dtype=torch.bool, device=text.device))
        return torch.cat(parts, dim=1), torch.cat(masks, dim=1)

    def forward(self, tokens: Tensor, text: Tensor, text_mask: Tensor, cond_tokens: Tensor | None = None) -> Tensor:
        """tokens [B, N] long (MASK = codebook_size), text [B, L, D], text_mask [B, L] bool,
        cond_tokens [B, M] long (super-res) -> logits [B, N, K]."""
        self._check_inputs(tokens, text, text_mask, cond_tokens)
        low_res = self.low_res_features(cond_tokens) if self.spec.is_superres else None  # [B,M,W]
        context, context_mask = self.context(text, text_mask, low_res)
        x = self.token_embedding(tokens) + self.position()  # [B,N,W]
        if self.spec.cond_add:
            x = x + self.upsample_to_grid(low_res)
        for block in self.blocks:
            x = block(x, context, context_mask)
        return self.head(self.norm(x))  # [B,N,K]


# -----------------------------------------------------------------------------
# training-time masking (Muse section 2.4)


def sample_mask_rates(n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
    """r ~ p(r) = 2/pi * (1 - r^2)^(-1/2) on [0, 1] (mean 2/pi ~ 0.64): inverse CDF r = sin(pi/2 * u)."""
    u = torch.rand(n, generator=generator, device=device)
    return torch.sin(0.5 * math.pi * u)


def random_token_mask(rates: Tensor, n_tokens: int, generator: torch.Generator | None = None) -> Tensor:
    """[B] rates -> [B, N] bool, True = masked; ceil(r * N) positions per example, at least one."""
    B = rates.shape[0]
    n_masked = (rates * n_tokens).ceil().clamp(1, n_tokens).long()  # [B]
    scores = torch.rand(B, n_tokens, generator=generator, device=rates.device)  # random order per example
    ranks = scores.argsort(dim=1).argsort(dim=1)  # [B,N] rank of each position
    return ranks < n_masked[:, None]


def masked_token_loss(logits: Tensor, targets: Tensor, masked: Tensor) -> Tensor:
    """Cross-entropy over the masked positions only: logits [B,N,K], targets [B,N], masked [B,N]."""
    return F.cross_entropy(logits[masked], targets[masked])


# -----------------------------------------------------------------------------
# save / load


def save_generator(model: MaskedTransformer, directory: Path, extra: dict | None = None) -> Path:
    """directory/generator.safetensors + directory/generator.json (spec and `extra`, e.g. sampler settings)."""
    return save_module(model, directory, fmt=FORMAT, version=FORMAT_VERSION, spec=model.spec.to_dict(),
                       weights_file=WEIGHTS_FILE, spec_file=SPEC_FILE, extra=extra)


def read_generator_meta(directory: Path) -> dict:
    return read_meta(Path(directory) / SPEC_FILE, fmt=FORMAT, version=FORMAT_VERSION)


def load_generator(directory: Path, expect: MaskedTransformerSpec | None = None, device="cpu") -> MaskedTransformer:
    """Load a generator saved by save_generator (safetensors only), in eval mode; one-line errors."""
    return load_saved(directory, what="generator", fmt=FORMAT, version=FORMAT_VERSION,
                      spec_cls=MaskedTransformerSpec, build=MaskedTransformer, weights_file=WEIGHTS_FILE,
                      spec_file=SPEC_FILE, expect=expect, device=device)


def generator_digest(directory: Path) -> str:
    return directory_digest(directory, (SPEC_FILE, WEIGHTS_FILE))
