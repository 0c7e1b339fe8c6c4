"""models.inception: pytorch-fid's parameter layout, strict loading of .pth / .safetensors, torchmetrics FID."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from models.inception import FIDInceptionV3, load_fid_inception


def random_inception(seed: int = 0) -> FIDInceptionV3:
    """FIDInceptionV3 with random weights that keep activations O(1) (PyTorch's default init shrinks
    them to ~1e-8 over the 48 conv layers, which would make every FID ~0)."""
    g = torch.Generator().manual_seed(seed)
    model = FIDInceptionV3()
    with torch.no_grad():
        for name, t in model.state_dict().items():  # these tensors share storage with the model
            if name.endswith("conv.weight"):
                t.copy_(torch.randn(t.shape, generator=g) * (2 / t[0].numel()) ** 0.5)  # He init
            elif name.endswith(("bn.weight", "bn.running_var")):
                t.copy_(torch.rand(t.shape, generator=g) * 0.5 + 0.75)
            elif name.endswith(("bn.bias", "bn.running_mean")):
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
            elif name.startswith("fc."):
                t.copy_(torch.randn(t.shape, generator=g) * 0.01)
    return model


def save_state(model: torch.nn.Module, path, drop: tuple[str, ...] = (), rename: dict | None = None,
               reshape: dict | None = None):
    """Write model's state dict to `path` (.pth via torch.save, else safetensors), edited as asked."""
    state = {k: v.clone().contiguous() for k, v in model.state_dict().items() if k not in drop}
    for old, new in (rename or {}).items():
        state[new] = state.pop(old)
    for k, shape in (reshape or {}).items():
        state[k] = torch.zeros(shape)
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def model() -> FIDInceptionV3:
    return random_inception()


@pytest.fixture(scope="module")
def images() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 24, 32, generator=g)  # [B,3,H,W] in [0,1]; resized to 299x299 inside
    y = (torch.rand(3, 3, 24, 32, generator=g) * 0.5).clamp(0, 1)  # darker: another distribution
    return x, y


@pytest.fixture(scope="module")
def features(model, images) -> torch.Tensor:
    return model(images[0])


def test_layout_is_pytorch_fid_pt_inception(model):
    """Names and shapes of pytorch-fid's pt_inception-2015-12-05-6726825d.pth (torchvision Inception3,
    1008 classes, no aux head): 94 conv+BN units and fc, 472 tensors, 23,885,392 parameters."""
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(state) == 94 * 5 + 2
    assert sum(v.numel() for v in state.values()) == 23_885_392
    expected = {
        "Conv2d_1a_3x3.conv.weight": [32, 3, 3, 3],
        "Conv2d_1a_3x3.bn.running_var": [32],
        "Conv2d_4a_3x3.conv.weight": [192, 80, 3, 3],
        "Mixed_5b.branch_pool.conv.weight": [32, 192, 1, 1],
        "Mixed_5d.branch5x5_2.conv.weight": [64, 48, 5, 5],
        "Mixed_6a.branch3x3.conv.weight": [384, 288, 3, 3],
        "Mixed_6e.branch7x7dbl_5.conv.weight": [192, 192, 1, 7],
        "Mixed_7a.branch7x7x3_4.conv.weight": [192, 192, 3, 3],
        "Mixed_7c.branch3x3dbl_3b.conv.weight": [384, 384, 3, 1],
        "Mixed_7c.branch_pool.conv.weight": [192, 2048, 1, 1],
        "fc.weight": [1008, 2048],
        "fc.bias": [1008],
    }
    assert {k: list(state[k].shape) for k in expected} == expected
    assert not any(k.startswith("AuxLogits") for k in state)
    assert model.num_features == 2048


def captured_input(module: torch.nn.Module, run) -> torch.Tensor:
    """The tensor `module` receives while run() executes."""
    seen = []
    handle = module.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
    try:
        run()
    finally:
        handle.remove()
    return seen[0]


def test_preprocessing_is_pytorch_fids(model):
    """[0,1] images -> bilinear 299x299 (no antialias) -> [-1,1], as pytorch-fid feeds its first conv."""
    x = torch.rand(1, 3, 20, 30, generator=torch.Generator().manual_seed(2))
    seen = captured_input(model.Conv2d_1a_3x3, lambda: model(x))
    expected = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
    torch.testing.assert_close(seen, expected)


@pytest.mark.parametrize("block, spike_neighbour", [("Mixed_5b", 2.0), ("Mixed_6b", 2.0), ("Mixed_7b", 2.0),
                                                    ("Mixed_7c", 10.0)])
def test_fid_pooling_patches(model, block, spike_neighbour):
    """The FID variant's pool branches: 3x3 averages that ignore the zero padding (a corner of an all-ones
    map stays 1, not 4/9), and a 3x3 max pool in Mixed_7c (a spike of 10 spreads unaveraged)."""
    module = getattr(model, block)
    x = torch.ones(1, module.branch_pool.conv.in_channels, 8, 8)
    x[..., 4, 4] = 10.0
    pooled = captured_input(module.branch_pool, lambda: module(x))
    assert torch.allclose(pooled[..., 0, 0], torch.ones(()))
    assert torch.allclose(pooled[..., 3, 3], torch.tensor(spike_neighbour))


def test_loads_pth_and_safetensors(tmp_path, model, images, features):
    x, _ = images
    assert features.shape == (3, 2048) and torch.isfinite(features).all() and features.std() > 1e-3
    paths = [save_state(model, tmp_path / "pt_inception.pth"), save_state(model, tmp_path / "inception.safetensors"),
             # older files carry no num_batches_tracked (unused in eval): they load too
             save_state(model, tmp_path / "old.pt", drop=tuple(k for k in model.state_dict()
                                                                if k.endswith("num_batches_tracked")))]
    for path in paths:
        loaded = load_fid_inception(path)
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
        assert not loaded.train().training  # never leaves eval mode (BN keeps its running statistics)
        torch.testing.assert_close(loaded(x), features, rtol=0, atol=0)


def test_other_weights_are_not_loaded(model, features, images):
    """A fresh (differently initialised) model gives other features: the loading test above can fail."""
    assert not torch.allclose(random_inception(seed=5)(images[0]), features)


@pytest.mark.parametrize("edit, needle", [
    (dict(drop=("Mixed_6b.branch7x7_2.conv.weight",)), "missing key 'Mixed_6b.branch7x7_2.conv.weight'"),
    (dict(rename={"fc.weight": "classifier.weight"}), "missing key 'fc.weight'"),
    (dict(reshape={"AuxLogits.fc.weight": [1008, 768]}), "unexpected key 'AuxLogits.fc.weight'"),
    (dict(reshape={"Mixed_7c.branch_pool.conv.weight": [192, 1280, 1, 1]}),
     "Mixed_7c.branch_pool.conv.weight has shape [192, 1280, 1, 1], FID InceptionV3 needs [192, 2048, 1, 1]"),
])
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_mismatched_weights_are_one_line_errors(tmp_path, model, edit, needle, suffix):
    path = save_state(model, tmp_path / f"bad{suffix}", **edit)
    with pytest.raises(ValueError) as err:
        load_fid_inception(path)
    assert str(path) in str(err.value) and needle in str(err.value) and "\n" not in str(err.value)


class NotATensor:
    pass


def test_unreadable_files_are_one_line_errors(tmp_path):
    pickled = tmp_path / "pickle.pth"
    torch.save({"x": NotATensor()}, pickled)  # weights_only=True refuses arbitrary objects
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(b"\x10\x00\x00")
    cases = {pickled: "not a loadable weights file", truncated: "corrupt or truncated",
             tmp_path / "absent.pth": "not found", tmp_path / "absent.safetensors": "not found",
             tmp_path / "weights.npz": "must be .pth, .pt or .safetensors"}
    for path, needle in cases.items():
        with pytest.raises(ValueError) as err:
            load_fid_inception(path)
        assert str(path) in str(err.value) and needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.slow  # two 2048x2048 eigendecompositions inside torchmetrics: ~5-10 s on one CPU thread
def test_torchmetrics_fid(model, images):
    from torchmetrics.image.fid import FrechetInceptionDistance

    x, y = images
    fid = FrechetInceptionDistance(feature=model, normalize=True, reset_real_features=False)
    fid.update(x, real=True)
    fid.update(x, real=False)
    same = float(fid.compute())
    fid.reset()  # keeps the real statistics
    fid.update(y, real=False)
    different = float(fid.compute())
    assert different > 1.0 and abs(same) < 1e-3 * different
