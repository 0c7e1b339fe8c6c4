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
    for which in ("base", "superres"):  # tiny: both set their own budget and inherit the augmentation
        own = tiny.train_for(which)
        assert own.steps == getattr(tiny, which).train_steps != tiny.train.steps
        assert getattr(tiny, which).augment is None and own.augment == tiny.train.augment == ("channel_permute",)
        assert replace(own, steps=tiny.train.steps) == tiny.train  # nothing else differs
    no_augment = replace(tiny, superres=replace(tiny.superres, augment=()))
    assert no_augment.train_for("superres").augment == ()  # an empty list overrides; only null inherits


@pytest.mark.parametrize("profile", ["smoke", "base256"])
def test_profiles_reset_tinys_tokenizer_step_budgets_to_their_own(profile):
    # an overlay that forgot `train_steps: null` would train tiny's 7200 steps (smoke: a test ran minutes)
    tok = load_config(PARAMS, profile).tokenizer
    assert tok.train_for("base").steps == tok.train_for("superres").steps == tok.train.steps


def test_default_profile_comes_from_params_yaml():
    assert load_config(PARAMS).profile == "tiny"


@pytest.mark.parametrize("edit, message", [
    # anchored on the section header, not a tuned value such as n_train, so retuning params keeps it valid
    (("\n  builtin:\n", "\n  builtin:\n    n_trian: 5\n"), r"data\.builtin\.n_trian: unknown key"),
    (("    max_length: 32\n", ""), r"features\.encoder\.max_length: missing key"),
    (("  tiny: {}", "  tiny:\n    data:\n      shard_sise: 3"), r"profiles\.tiny\.data\.shard_sise: unknown key"),
    (("shard_size: 1000", "shard_size: lots"), r"data\.shard_size: .*'lots'"),
    (("    train_steps: 7200      # the base tokenizer's recipe", "    train_steps: 0      #"),
     r"tokenizer\.superres\.train_steps: must be >= 1"),
    (("    augment: [channel_permute]", "    augment: [rotate]"), r"tokenizer\.train\.augment\.0: .*'rotate'"),
    (("  eval_seed_sets: 3        # single objects", "  eval_seed_sets: 0        #"),
     r"superres\.eval_seed_sets: must be >= 1"),
    (("  checker_seed_sets: 3 ", "  checker_seed_sets: 0 "), r"evaluate\.checker_seed_sets: must be >= 1"),
], ids=["unknown-key", "missing-key", "unknown-key-in-overlay", "wrong-type", "zero-tokenizer-steps",
        "unknown-augmentation", "zero-seed-sets", "zero-evaluate-seed-sets"])
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
