"""Loading, overrides, the reference's hparams string, and the errors users see."""

from pathlib import Path

import pytest
import yaml

from capsdist.config import ConfigError, field_docs, load_config, parse_hparams_override
from capsdist.run_dir import write_config

CONFIGS = sorted(Path("configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_loads_and_starts_with_a_comment(path):
    load_config([path])
    assert path.read_text().startswith("#"), f"{path} should say what it trains, first"


def test_precedence_defaults_yaml_overrides():
    cfg = load_config(["configs/mnist.yaml"], ["model.routing_iters=1", "train.lr=0.01"])
    assert cfg.model.routing_iters == 1 and cfg.train.lr == 0.01
    assert cfg.model.num_prime_capsules == 32  # from YAML
    assert cfg.train.lr_decay_steps == 2000  # schema default
    assert cfg.run.dir == "runs/mnist"


def test_unknown_override_names_the_closest_key():
    with pytest.raises(
        ConfigError, match=r"'model.routing_iter'.*did you mean 'model.routing_iters'"
    ):
        load_config(["configs/mnist.yaml"], ["model.routing_iter=2"])


def test_unknown_leaf_in_wrong_section_suggests_the_real_place():
    with pytest.raises(ConfigError, match="did you mean 'train.max_steps'"):
        load_config([], ["max_steps=5"])


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  num_prime_capsule: 8\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*model.num_prime_capsules"):
        load_config([bad])


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match="train.max_steps"):
        load_config([], ["train.max_steps=many"])


def test_cross_field_rule():
    with pytest.raises(ConfigError, match="loss.name=margin"):
        load_config([], ["model.name=baseline"])
    with pytest.raises(ConfigError, match="model.padding"):
        load_config([], ["model.padding=same"])


def test_hparams_override_maps_onto_schema():
    overrides = parse_hparams_override("num_prime_capsules=64,padding=SAME,leaky=true,remake=false")
    cfg = load_config(["configs/mnist.yaml"], overrides)
    assert cfg.model.num_prime_capsules == 64 and cfg.model.padding == "SAME"
    assert cfg.model.leaky_routing is True and cfg.model.reconstruction is False
    assert load_config([], parse_hparams_override("routing=1,learning_rate=0.01")).train.lr == 0.01
    with pytest.raises(ConfigError, match="nonsense"):
        parse_hparams_override("nonsense=1")


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(["configs/mnist.yaml"], ["seed=7"])
    write_config(tmp_path, cfg)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["seed"] == 7
    assert load_config([tmp_path / "config.yaml"]) == cfg


def test_every_key_is_documented():
    undocumented = [key for key, (_, doc) in field_docs().items() if not doc]
    assert undocumented == []


def test_missing_config_file_is_named():
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(["nope.yaml"])


def test_runtime_settings_and_keys_added_later_do_not_make_a_different_model():
    from dataclasses import asdict

    from capsdist.config import ModelConfig
    from capsdist.run_dir import model_differences

    saved = asdict(ModelConfig())
    del saved["channels_last"]  # a checkpoint written before the key existed
    assert model_differences(saved, ModelConfig(compile=True)) == []
    # fused_routing too: weights trained with the fused CPU kernel load into the torch-ops path
    assert model_differences(saved, ModelConfig(fused_routing=False, channels_last=True)) == []
    assert model_differences(saved, ModelConfig(num_prime_capsules=8)) == [
        "model.num_prime_capsules: 32 there, 8 here"
    ]
