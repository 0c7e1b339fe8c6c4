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


def test_default_profile_comes_from_params_yaml():
    assert load_config(PARAMS).profile == "tiny"


def _with(text: str) -> str:
    return PARAMS.read_text() + text


def test_unknown_key_fails_with_full_path(tmp_path):
    bad = PARAMS.read_text().replace("    n_train: 4000", "    n_train: 4000\n    n_trian: 5")
    with pytest.raises(ConfigError, match=r"data\.builtin\.n_trian: unknown key"):
        load_config(text=bad)


def test_missing_key_fails_with_full_path():
    bad = PARAMS.read_text().replace("    max_length: 32\n", "")
    with pytest.raises(ConfigError, match=r"features\.encoder\.max_length: missing key"):
        load_config(text=bad)


def test_unknown_key_in_profile_overlay_names_the_overlay_path():
    bad = PARAMS.read_text().replace("  tiny: {}", "  tiny:\n    data:\n      shard_sise: 3")
    with pytest.raises(ConfigError, match=r"profiles\.tiny\.data\.shard_sise: unknown key"):
        load_config(text=bad)


def test_wrong_type_is_reported_with_path_and_value():
    bad = PARAMS.read_text().replace("shard_size: 1000", "shard_size: lots")
    with pytest.raises(ConfigError, match=r"data\.shard_size: .*'lots'"):
        load_config(text=bad)


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
