"""Image tokenizers: a VQGAN (Muse's discrete tokens) or a KL-VAE (continuous latents).

Both are diffusers autoencoders (`VQModel`, `AutoencoderKL`) wrapped behind one interface:

    images [B,3,R,R] in [-1,1] --encode--> codes --decode--> images [B,3,R,R]
    vqgan codes: indices [B,g,g] long in [0, codebook_size)   (g = R // downsample)
    kl codes:    posterior-mean latents [B,C,g,g]

The VQGAN quantizer is diffusers' VectorQuantizer, rebuilt with legacy=False so that
`commitment_beta` weighs the commitment term (diffusers' default puts beta on the codebook term).
What keeps codebook usage high on short CPU runs is `restart_dead_codes` (taming-style re-seeding
of unused codes from encoder outputs, every ~50 steps), not the lookup itself. An optional
ViT-VQGAN (Yu et al. 2022) variant, `quantizer="l2"`, does a cosine lookup (l2-normalised latents
and codes) over the same codebook parameter; it is ours because diffusers has no such quantizer.
`codebook_dim` (VQModel's `vq_embed_dim`) sets a lower-dimensional lookup space for either.

The decoder may be wider and deeper than the encoder (`decoder_channels`, `decoder_layers_per_block`;
empty / 0 = the encoder's): Muse finetunes such a decoder on the frozen codes (`with_larger_decoder`,
the `decoder_ft` stage). diffusers' VQModel / AutoencoderKL take one set of widths for both halves,
so the larger decoder is a diffusers `Decoder` put in place of theirs; the state_dict keys stay the same.

Weights are saved as safetensors next to a small JSON file holding the typed spec, so a loader can
check the architecture before touching the tensors; nothing here loads a pickle.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.weights import directory_digest, load_saved, save_module, spec_from_dict

KINDS = ("vqgan", "kl")
QUANTIZERS = ("l2", "euclidean")
MAX_CODEBOOK = 65536  # tokens are stored as uint16
FORMAT = "cascade-tokenizer"
FORMAT_VERSION = 1
WEIGHTS_FILE = "tokenizer.safetensors"
SPEC_FILE = "tokenizer.json"


# -----------------------------------------------------------------------------
# spec


@dataclass(frozen=True)
class TokenizerSpec:
    """Typed architecture of one tokenizer; saved next to its weights."""

    kind: str  # "vqgan" | "kl"
    resolution: int  # input image side (square RGB)
    downsample: int  # power of two >= 1; token grid side = resolution // downsample
    channels: tuple[int, ...]  # block_out_channels; len == log2(downsample) + 1
    layers_per_block: int
    latent_channels: int  # encoder output channels (VQ: before the quant_conv to codebook_dim)
    codebook_size: int  # vqgan: number of codes (<= 65536); kl: 0
    norm_groups: int = 32
    commitment_beta: float = 0.25
    codebook_dim: int = 0  # vqgan lookup-space dim (ViT-VQGAN factorised codes); 0 = latent_channels
    quantizer: str = "euclidean"  # vqgan: "euclidean" (diffusers VectorQuantizer) | "l2" (cosine lookup)
    mid_attention: bool = True  # self-attention in the encoder/decoder mid blocks (diffusers default)
    decoder_channels: tuple[int, ...] = ()  # decoder block widths; () = channels (the encoder's)
    decoder_layers_per_block: int = 0  # decoder depth; 0 = layers_per_block (the encoder's)

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "decoder_channels", tuple(int(c) for c in self.decoder_channels))
        self._validate()

    def _validate(self) -> None:
        def bad(msg: str) -> ValueError:
            return ValueError(f"tokenizer spec: {msg}")

        if self.kind not in KINDS:
            raise bad(f"kind must be one of {KINDS}, got {self.kind!r}")
        for name in ("resolution", "downsample", "layers_per_block", "latent_channels", "norm_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(f"{name} must be a positive integer, got {value!r}")
        if self.downsample & (self.downsample - 1):
            raise bad(f"downsample must be a power of two, got {self.downsample}")
        if self.resolution % self.downsample:
            raise bad(f"resolution {self.resolution} is not divisible by downsample {self.downsample}")
        n_blocks = int(math.log2(self.downsample)) + 1
        if len(self.channels) != n_blocks:
            raise bad(
                f"downsample {self.downsample} needs len(channels) == log2(downsample) + 1 == {n_blocks}, "
                f"got {len(self.channels)} ({list(self.channels)})"
            )
        for c in self.channels:
            if c < 1 or c % self.norm_groups:
                raise bad(f"every channel count must be a positive multiple of norm_groups {self.norm_groups}, got {c}")
        if self.decoder_channels:
            if len(self.decoder_channels) != n_blocks:
                raise bad(f"decoder_channels needs {n_blocks} entries like channels, got {list(self.decoder_channels)}")
            for c in self.decoder_channels:
                if c < 1 or c % self.norm_groups:
                    raise bad(f"every decoder_channels entry must be a positive multiple of norm_groups "
                              f"{self.norm_groups}, got {c}")
        d = self.decoder_layers_per_block
        if not isinstance(d, int) or isinstance(d, bool) or d < 0:
            raise bad(f"decoder_layers_per_block must be >= 0 (0 = layers_per_block), got {d!r}")
        if self.kind == "vqgan":
            if not isinstance(self.codebook_size, int) or not 2 <= self.codebook_size <= MAX_CODEBOOK:
                raise bad(
                    f"vqgan codebook_size must be in 2..{MAX_CODEBOOK} (tokens are uint16), got {self.codebook_size!r}"
                )
            if self.quantizer not in QUANTIZERS:
                raise bad(f"quantizer must be one of {QUANTIZERS}, got {self.quantizer!r}")
            if not isinstance(self.codebook_dim, int) or self.codebook_dim < 0:
                raise bad(f"codebook_dim must be >= 0 (0 = latent_channels), got {self.codebook_dim!r}")
        elif self.codebook_size != 0:
            raise bad(f"kl tokenizers have no codebook: codebook_size must be 0, got {self.codebook_size}")
        if not self.commitment_beta >= 0:
            raise bad(f"commitment_beta must be >= 0, got {self.commitment_beta}")

    @property
    def grid(self) -> int:
        return self.resolution // self.downsample

    @property
    def decoder_widths(self) -> tuple[int, ...]:
        return self.decoder_channels or self.channels

    @property
    def decoder_depth(self) -> int:
        return self.decoder_layers_per_block or self.layers_per_block

    @property
    def code_dim(self) -> int:
        """Dimension of the vectors the codebook holds (vqgan) / of the latents (kl)."""
        if self.kind == "vqgan" and self.codebook_dim:
            return self.codebook_dim
        return self.latent_channels

    def to_dict(self) -> dict:
        d = asdict(self)
        d["channels"] = list(self.channels)
        d["decoder_channels"] = list(self.decoder_channels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TokenizerSpec:
        return spec_from_dict(cls, d, "tokenizer")


# -----------------------------------------------------------------------------
# model


@dataclass
class TokenizerOutput:
    recon: Tensor  # [B,3,R,R]
    reg_loss: Tensor  # scalar: vqgan codebook + commitment loss; kl: KL divergence (mean per element)
    indices: Tensor | None  # [B,g,g] long (vqgan) else None
    latents: Tensor  # encoder output before quantisation/sampling [B,C,g,g] (vqgan: C = code_dim)


class ImageTokenizer(nn.Module):
    """A diffusers VQModel (kind vqgan) or AutoencoderKL (kind kl) behind the codes interface."""

    def __init__(self, spec: TokenizerSpec):
        super().__init__()
        from diffusers import AutoencoderKL, VQModel
        from diffusers.models.autoencoders.vae import Decoder, VectorQuantizer

        self.spec = spec
        n = len(spec.channels)
        common = dict(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=spec.channels,
            layers_per_block=spec.layers_per_block,
            latent_channels=spec.latent_channels,
            norm_num_groups=spec.norm_groups,
            sample_size=spec.resolution,
            mid_block_add_attention=spec.mid_attention,
        )
        if spec.kind == "vqgan":
            self.vq = VQModel(num_vq_embeddings=spec.codebook_size, vq_embed_dim=spec.code_dim, **common)
            # diffusers builds its quantizer with legacy=True (beta on the codebook term, see its NOTE);
            # same parameter names, so checkpoints are interchangeable
            self.vq.quantize = VectorQuantizer(spec.codebook_size, spec.code_dim, beta=spec.commitment_beta, legacy=False)
            if spec.quantizer == "l2":
                nn.init.normal_(self.codebook)  # unit-scale rows: cosine lookup ignores the norm anyway
        else:
            self.vae = AutoencoderKL(**common)
        if (spec.decoder_widths, spec.decoder_depth) != (spec.channels, spec.layers_per_block):
            self.net.decoder = Decoder(
                in_channels=spec.latent_channels, out_channels=3, up_block_types=("UpDecoderBlock2D",) * n,
                block_out_channels=spec.decoder_widths, layers_per_block=spec.decoder_depth,
                norm_num_groups=spec.norm_groups, act_fn="silu", mid_block_add_attention=spec.mid_attention,
            )
        self._check_contracts()

    def _check_contracts(self) -> None:
        """Structural checks that the built network matches the spec (no forward pass needed)."""
        s = self.spec
        net = self.net
        n_down = sum(1 for b in net.encoder.down_blocks if b.downsamplers is not None)
        n_up = sum(1 for b in net.decoder.up_blocks if b.upsamplers is not None)
        assert 2**n_down == s.downsample == 2**n_up, (n_down, n_up, s.downsample)
        assert net.decoder.conv_out.out_channels == 3
        assert net.decoder.conv_in.out_channels == s.decoder_widths[-1]
        if self.is_vq:
            assert tuple(self.codebook.shape) == (s.codebook_size, s.code_dim)
            assert self.vq.quant_conv.out_channels == s.code_dim

    # -- properties ------------------------------------------------------------

    @property
    def net(self) -> nn.Module:
        """The diffusers autoencoder (VQModel or AutoencoderKL)."""
        return self.vq if self.is_vq else self.vae

    @property
    def is_vq(self) -> bool:
        return self.spec.kind == "vqgan"

    @property
    def codebook_size(self) -> int:
        return self.spec.codebook_size if self.is_vq else 0

    @property
    def codebook(self) -> nn.Parameter:
        """[K, D] code vectors (vqgan only)."""
        return self.vq.quantize.embedding.weight

    def last_decoder_weight(self) -> nn.Parameter:
        """Weight of the decoder's final conv, for the adaptive GAN weight (taming)."""
        return self.net.decoder.conv_out.weight

    # -- core ------------------------------------------------------------------

    def _check_images(self, images: Tensor) -> None:
        r = self.spec.resolution
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, r, r):
            raise ValueError(f"tokenizer expects images of shape [B,3,{r},{r}], got {list(images.shape)}")

    def _quantize(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """z [B,D,g,g] -> (z_q [B,D,g,g] straight-through, codebook+commitment loss, indices [B,g,g])."""
        B, D, g, _ = z.shape
        if self.spec.quantizer == "euclidean":
            z_q, loss, (_, _, idx) = self.vq.quantize(z)
            return z_q, loss, idx.view(B, g, g)
        flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, D), dim=1)  # [N,D], N = B*g*g
        codes = F.normalize(self.codebook, dim=1)  # [K,D]
        idx = (flat @ codes.t()).argmax(dim=1)  # [N]: max cosine == min l2 between unit vectors
        q = codes[idx]  # [N,D]
        beta = self.spec.commitment_beta
        # codebook term pulls codes to the encoder, commitment term (beta) the encoder to its code
        loss = F.mse_loss(q, flat.detach()) + beta * F.mse_loss(flat, q.detach())
        q = flat + (q - flat).detach()  # straight-through estimator
        z_q = q.view(B, g, g, D).permute(0, 3, 1, 2).contiguous()
        return z_q, loss, idx.view(B, g, g)

    def _lookup(self, indices: Tensor) -> Tensor:
        """indices [B,g,g] -> code vectors [B,D,g,g] as the decoder sees them."""
        codes = self.codebook
        if self.spec.quantizer == "l2":
            codes = F.normalize(codes, dim=1)
        return codes[indices].permute(0, 3, 1, 2).contiguous()

    def forward(self, images: Tensor) -> TokenizerOutput:
        self._check_images(images)
        if self.is_vq:
            z = self.vq.encode(images).latents  # [B,D,g,g]
            z_q, reg, idx = self._quantize(z)
            recon = self.vq.decode(z_q, force_not_quantize=True).sample  # [B,3,R,R]
            return TokenizerOutput(recon=recon, reg_loss=reg, indices=idx, latents=z)
        post = self.vae.encode(images).latent_dist
        z = post.sample() if self.training else post.mode()  # [B,C,g,g]
        recon = self.vae.decode(z).sample
        kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()  # per element
        return TokenizerOutput(recon=recon, reg_loss=kl, indices=None, latents=post.mean)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """vqgan: indices [B,g,g] long; kl: posterior-mean latents [B,C,g,g]."""
        self._check_images(images)
        if self.is_vq:
            return self._quantize(self.vq.encode(images).latents)[2]
        return self.vae.encode(images).latent_dist.mode()

    def decode(self, codes: Tensor) -> Tensor:
        """indices [B,g,g] (vqgan) or latents [B,C,g,g] (kl) -> images [B,3,R,R] in ~[-1,1]."""
        g = self.spec.grid
        if self.is_vq:
            if codes.ndim != 3 or tuple(codes.shape[1:]) != (g, g) or codes.dtype.is_floating_point:
                raise ValueError(f"vqgan decode expects integer indices [B,{g},{g}], got {codes.dtype} {list(codes.shape)}")
            if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
                lo, hi = int(codes.min()), int(codes.max())
                raise ValueError(f"token indices must lie in [0, {self.codebook_size}), got {lo}..{hi}")
            return self.vq.decode(self._lookup(codes.long()), force_not_quantize=True).sample
        c = self.spec.latent_channels
        if codes.ndim != 4 or tuple(codes.shape[1:]) != (c, g, g):
            raise ValueError(f"kl decode expects latents [B,{c},{g},{g}], got {list(codes.shape)}")
        return self.vae.decode(codes).sample

    @torch.no_grad()
    def restart_dead_codes(self, latents: Tensor, usage: Tensor, min_usage: float = 1.0) -> int:
        """Re-seed codes used fewer than `min_usage` times with encoder outputs (taming-style restarts,
        k-means++-weighted towards the latents the live codes fit worst).

        latents [N,D] are flattened encoder outputs in the lookup space (e.g. TokenizerOutput.latents
        of the last batch, permuted to [B,g,g,D] and flattened); usage [K] counts per code.
        Returns how many codes were restarted; live codes are untouched.
        """
        if not self.is_vq:
            raise ValueError("restart_dead_codes applies to vqgan tokenizers only")
        K, D = self.codebook.shape
        if usage.shape != (K,):
            raise ValueError(f"usage must have shape [{K}], got {list(usage.shape)}")
        if latents.ndim != 2 or latents.shape[1] != D or latents.shape[0] == 0:
            raise ValueError(f"latents must have shape [N,{D}] with N > 0, got {list(latents.shape)}")
        dead = (usage.to(self.codebook.device) < min_usage).nonzero().flatten()  # [n_dead]
        if dead.numel() == 0:
            return 0
        src = latents.detach().to(self.codebook)
        if self.spec.quantizer == "l2":
            src = F.normalize(src, dim=1)
        # k-means++ seeding: draw latents with probability ~ squared distance to the nearest live
        # code, so new codes go where the codebook represents the data worst (object edges), not
        # onto the background that already dominates (uniform draws pile codes onto it).
        live = self.codebook.detach()[usage.to(self.codebook.device) >= min_usage]  # [n_live,D]
        if live.numel():
            if self.spec.quantizer == "l2":
                live = F.normalize(live, dim=1)
            weights = torch.cdist(src, live).min(dim=1).values.pow(2) + 1e-12  # [N]
            pick = torch.multinomial(weights, dead.numel(), replacement=True)
        else:
            pick = torch.randint(0, src.shape[0], (dead.numel(),), device=src.device)
        new = src[pick]  # [n_dead,D]
        # a little noise so codes seeded from the same latent do not stay identical
        new = new + 0.01 * new.norm(dim=1, keepdim=True).clamp_min(1e-6) * torch.randn_like(new) / math.sqrt(D)
        self.codebook.data[dead] = new
        return int(dead.numel())


def frozen_parameter_names(tokenizer: ImageTokenizer) -> list[str]:
    """Parameters that fix the codes: encoder, quant_conv and the codebook. Decoder finetuning must
    leave them untouched (the generators were trained on these codes); the rest is the decoder side."""
    prefix = "vq." if tokenizer.is_vq else "vae."
    frozen = tuple(prefix + part for part in ("encoder.", "quant_conv.", "quantize."))
    return [name for name, _ in tokenizer.named_parameters() if name.startswith(frozen)]


def with_larger_decoder(tokenizer: ImageTokenizer, channels: tuple[int, ...], layers_per_block: int) -> ImageTokenizer:
    """A copy of `tokenizer` with a freshly initialised decoder of the given widths and depth (Muse
    decoder finetuning); encoder, quant_conv, codebook and post_quant_conv are copied exactly.

    The decoder must be at least as wide and as deep as the source's (ValueError otherwise); the
    new decoder draws its initialisation from the global torch RNG.
    """
    from dataclasses import replace

    src = tokenizer.spec
    channels = tuple(int(c) for c in channels)
    if len(channels) != len(src.decoder_widths):
        raise ValueError(f"decoder channels {list(channels)} need {len(src.decoder_widths)} entries, "
                         f"one per block of the tokenizer's {list(src.decoder_widths)}")
    if any(c < s for c, s in zip(channels, src.decoder_widths)) or layers_per_block < src.decoder_depth:
        raise ValueError(f"the new decoder ({list(channels)}, {layers_per_block} layers per block) must not be "
                         f"smaller than the tokenizer's ({list(src.decoder_widths)}, {src.decoder_depth})")
    model = ImageTokenizer(replace(src, decoder_channels=channels, decoder_layers_per_block=layers_per_block))
    decoder = ("vq.decoder.", "vae.decoder.")
    kept = {k: v for k, v in tokenizer.state_dict().items() if not k.startswith(decoder)}
    missing, unexpected = model.load_state_dict(kept, strict=False)
    assert not unexpected and all(k.startswith(decoder) for k in missing), (missing, unexpected)
    return model.to(next(tokenizer.parameters()).device)


def codebook_stats(indices: Tensor, codebook_size: int) -> tuple[float, float]:
    """(fraction of codes used at least once, perplexity = exp(entropy) of the code histogram)."""
    counts = torch.bincount(indices.flatten().long().cpu(), minlength=codebook_size).double()  # [K]
    total = counts.sum()
    if total == 0:
        return 0.0, 0.0
    p = counts / total
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return float((counts > 0).sum() / codebook_size), float(entropy.exp())


# -----------------------------------------------------------------------------
# save / load


def save_tokenizer(model: ImageTokenizer, directory: Path) -> Path:
    """directory/tokenizer.safetensors (state_dict) + directory/tokenizer.json (spec); returns the former."""
    return save_module(model, directory, fmt=FORMAT, version=FORMAT_VERSION, spec=model.spec.to_dict(),
                       weights_file=WEIGHTS_FILE, spec_file=SPEC_FILE)


def load_tokenizer(directory: Path, expect: TokenizerSpec | None = None, device="cpu") -> ImageTokenizer:
    """Load a tokenizer saved by save_tokenizer (safetensors only); eval mode.

    With `expect`, the saved spec must equal it field by field. Every failure is a one-line
    ValueError naming the file.
    """
    return load_saved(directory, what="tokenizer", fmt=FORMAT, version=FORMAT_VERSION, spec_cls=TokenizerSpec,
                      build=ImageTokenizer, weights_file=WEIGHTS_FILE, spec_file=SPEC_FILE, expect=expect,
                      device=device)


def tokenizer_digest(directory: Path) -> str:
    """sha256 over tokenizer.json + tokenizer.safetensors bytes: the `tokens` stage's content address."""
    return directory_digest(directory, (SPEC_FILE, WEIGHTS_FILE))
