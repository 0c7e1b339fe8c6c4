from dataclasses import replace

import pytest

from components.config import PROFILES, ConfigError, load_config
from tests.conftest import REPO

PARAMS = REPO / "params.yaml"


@pytest.mark.parametrize("profile", PROFILES)
def test_every_profile_loads_into_frozen_sections(profile):
    cfg = load_config(PARAMS, profile)
    assert cfg.profile == profile
    with pytest.raises(Exception):
        cfg.data.shard_size = 1  # frozen


def test_profiles_overlay_the_base_values():
    smoke, tiny, big = (load_config(PARAMS, p) for p in ("smoke", "tiny", "base256"))
    assert smoke.data.builtin.n_train < tiny.data.builtin.n_train < big.data.builtin.n_train
    assert big.data.builtin.image_size == 256
    # keys an overlay does not name keep the base value
    assert smoke.validate == tiny.validate


def test_a_tokenizer_without_its_own_step_budget_or_augmentation_uses_the_shared_one():
    tiny = load_config(PARAMS, "tiny").tokenizer
    base, superres = tiny.train_for("base"), tiny.train_for("superres")
    assert base.steps == tiny.base.train_steps != tiny.train.steps
    assert tiny.base.augment is None and base.augment == tiny.train.augment == ("channel_permute",)
    assert tiny.superres.train_steps is None and superres.steps == tiny.train.steps
    assert superres.augment == tiny.superres.augment == ()  # an empty list overrides; only null inherits
    assert replace(base, steps=tiny.train.steps) == tiny.train  # nothing else differs


def test_default_profile_comes_from_params_yaml():
    assert load_config(PARAMS).profile == "tiny"


@pytest.mark.parametrize("edit, message", [
    # anchored on the section header, not a tuned value such as n_train, so retuning params keeps it valid
    (("\n  builtin:\n", "\n  builtin:\n    n_trian: 5\n"), r"data\.builtin\.n_trian: unknown key"),
    (("    max_length: 32\n", ""), r"features\.encoder\.max_length: missing key"),
    (("  tiny: {}", "  tiny:\n    data:\n      shard_sise: 3"), r"profiles\.tiny\.data\.shard_sise: unknown key"),
    (("shard_size: 1000", "shard_size: lots"), r"data\.shard_size: .*'lots'"),
    (("    train_steps: null      # null", "    train_steps: 0      # null"), r"tokenizer\.superres\.train_steps: must be >= 1"),
    (("    augment: [channel_permute]", "    augment: [rotate]"), r"tokenizer\.train\.augment\.0: .*'rotate'"),
], ids=["unknown-key", "missing-key", "unknown-key-in-overlay", "wrong-type", "zero-tokenizer-steps",
        "unknown-augmentation"])
def test_bad_params_fail_at_load_with_the_full_key_path(edit, message):
    text = PARAMS.read_text()
    assert edit[0] in text  # the edit must really change params.yaml
    with pytest.raises(ConfigError, match=message):
        load_config(text=text.replace(*edit))


def test_unknown_profile_and_override_errors():
    with pytest.raises(ConfigError, match="unknown profile 'huge'"):
        load_config(PARAMS, "huge")
    with pytest.raises(ConfigError, match=r"data\.nope: unknown key"):
        load_config(PARAMS, overrides={"data.nope": 1})
    cfg = load_config(PARAMS, overrides={"data.source": "/some/where"})
    assert cfg.data.source == "/some/where"


def test_missing_params_file_is_one_clear_line(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_config(tmp_path / "nope.yaml")
