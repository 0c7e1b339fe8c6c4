"""models.clip_local: a CLIP checkpoint the test saves itself, loaded offline and scored by torchmetrics."""

from __future__ import annotations

import json
import shutil
import string
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.clip_local import load_local_clip

PROMPTS = ["two small red circles", "a blue square above a green triangle", "one yellow star"]


def save_tiny_clip(directory: Path) -> Path:
    """A random tiny CLIPModel + CLIPProcessor (PIL image processor, character-level BPE tokenizer)
    written with save_pretrained, as a downloaded checkpoint directory would be."""
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

    directory.mkdir(parents=True, exist_ok=True)
    letters = list(string.ascii_lowercase)
    tokens = letters + [c + "</w>" for c in letters] + ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")  # no merges: words split into characters
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"))
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    special = dict(bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                   pad_token_id=vocab["<|endoftext|>"])
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, **special),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(directory)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory) -> Path:
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny-clip")


def images_u8(n: int, seed: int = 0) -> torch.Tensor:
    return (torch.rand(n, 3, 40, 48, generator=torch.Generator().manual_seed(seed)) * 255).to(torch.uint8)


def test_clip_score_through_the_callable(clip_dir):
    from torchmetrics.functional.multimodal import clip_score
    from torchmetrics.multimodal import CLIPScore

    load = load_local_clip(clip_dir)
    model, processor = load()
    assert type(processor.image_processor).__name__ == "CLIPImageProcessorPil"  # no torchvision needed
    assert not model.training and not any(p.requires_grad for p in model.parameters())

    images = images_u8(3)
    metric = CLIPScore(model_name_or_path=load)
    with torch.no_grad():
        score = float(metric(images, PROMPTS))
        per_image = [float(clip_score(images[i], PROMPTS[i], model_name_or_path=load)) for i in range(3)]
    assert 0.0 <= score <= 100.0
    assert all(0.0 <= s <= 100.0 for s in per_image)
    # real weights, not a constant: different prompts give different scores for the same image
    with torch.no_grad():
        other = float(clip_score(images[0], PROMPTS[1], model_name_or_path=load))
    assert other != pytest.approx(per_image[0])


def test_same_weights_same_scores(clip_dir):
    """Loading twice gives the saved weights both times (nothing re-initialised at random)."""
    from torchmetrics.functional.multimodal import clip_score

    images = images_u8(2, seed=3)
    with torch.no_grad():
        a = clip_score(images, PROMPTS[:2], model_name_or_path=load_local_clip(clip_dir))
        b = clip_score(images, PROMPTS[:2], model_name_or_path=load_local_clip(clip_dir))
    assert torch.isfinite(a) and float(a) == float(b)


def test_bad_directories_are_one_line_errors(tmp_path, clip_dir):
    from transformers import BertConfig

    BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(
        tmp_path / "bert")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((clip_dir / "config.json").read_text())
    (tmp_path / "empty").mkdir()
    incomplete = tmp_path / "incomplete"
    shutil.copytree(clip_dir, incomplete)
    weights = load_file(incomplete / "model.safetensors")
    del weights["visual_projection.weight"]
    save_file(weights, incomplete / "model.safetensors")
    cases = {tmp_path / "absent": "does not exist", tmp_path / "empty": "not a CLIP checkpoint",
             tmp_path / "bert": "model_type is 'bert'", no_weights: "cannot load CLIP checkpoint",
             incomplete: "incomplete CLIP checkpoint: 1 weights missing or mis-shaped (e.g. visual_projection.weight)"}
    for path, needle in cases.items():
        with pytest.raises(ValueError) as err:
            load_local_clip(path)
        assert str(path) in str(err.value) and needle in str(err.value) and "\n" not in str(err.value)
