"""Every named config has exactly the official keys, shapes and parameter count."""

import pytest
import torch

from fluxmusic.config import CONFIGS, FluxMusicConfig, get_config
from fluxmusic.errors import FluxMusicError
from fluxmusic.model import FluxMusicTransformer

OFFICIAL = ["small", "base", "large", "giant", "giant_full", "biggiant"]
PAPER_MILLIONS = {
    "small": 142.3,
    "base": 473.9,
    "large": 840.6,
    "giant": 2109.9,
    "giant_full": 1586.2,
    "biggiant": 5289.1,
}


@pytest.mark.parametrize("name", OFFICIAL)
def test_keys_shapes_and_count_equal_official(name, official_configs):
    ref = official_configs[name]
    cfg = get_config(name)
    for field, value in ref["config"].items():
        got = getattr(cfg, field)
        assert (list(got) if isinstance(got, tuple) else got) == value, field
    with torch.device("meta"):
        model = FluxMusicTransformer(cfg)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == ref["params"]
    assert model.num_parameters() == ref["n_params"]
    # The paper truncates to 0.1M (base is 473.97M, printed 473.9M).
    assert model.num_parameters() // 100_000 / 10 == PAPER_MILLIONS[name]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_config_round_trips_through_json(name, tmp_path):
    cfg = CONFIGS[name]
    cfg.save(tmp_path / "config.json")
    assert FluxMusicConfig.load(tmp_path / "config.json") == cfg


def test_unknown_config_name_lists_allowed():
    with pytest.raises(FluxMusicError, match="unknown config 'huge'.*small"):
        get_config("huge")


def test_bad_config_values_are_refused():
    with pytest.raises(FluxMusicError, match="axes_dim"):
        FluxMusicConfig(hidden_size=64, num_heads=4, axes_dim=(4, 4, 4))
    with pytest.raises(FluxMusicError, match="unknown transformer config keys"):
        FluxMusicConfig.from_dict({"hidden": 3})
