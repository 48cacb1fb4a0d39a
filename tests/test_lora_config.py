"""The ``lora:`` config section: defaults off, names or a regex select projections, errors name the key."""

import pytest

from jrft.config import LORA_MODULES, ConfigError, load_config


def test_defaults_off():
    c = load_config(None).lora
    assert c.rank == 0 and c.modules == LORA_MODULES


def test_names_regex_and_scale():
    c = load_config(None, ["lora.rank=4", "lora.alpha=8", "lora.target_modules=[v_proj, q_proj]"]).lora
    assert c.modules == ("q_proj", "v_proj") and c.scale == 2.0
    c = load_config(None, ["lora.rank=4", "lora.target_modules=mlp\\..*", "lora.use_rslora=true"]).lora
    assert c.modules == ("gate_proj", "up_proj", "down_proj") and c.scale == 16.0 / 2.0


@pytest.mark.parametrize(
    "override, key",
    [
        ("lora.rank=-1", "lora.rank"),
        ("lora.alpha=0", "lora.alpha"),
        ("lora.dropout=1.0", "lora.dropout"),
        ("lora.target_modules=[q_proj, qq_proj]", "lora.target_modules"),
        ("lora.target_modules=(", "lora.target_modules"),
        ("lora.init=ones", "lora.init"),
    ],
)
def test_errors_name_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert e.value.key == key


def test_regex_selecting_nothing_is_an_error_when_on():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["lora.rank=2", "lora.target_modules=lm_head"])
    assert e.value.key == "lora.target_modules"
