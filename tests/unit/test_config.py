"""Loading, overrides, the reference's hparams string, and the errors users see."""

import re
from pathlib import Path

import pytest
import yaml

from capsdist.config import (
    ConfigError,
    config_to_dict,
    config_to_yaml,
    field_docs,
    load_config,
    parse_hparams_override,
)
from capsdist.run_dir import write_config
from tests.conftest import run_capsdist

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


# ---- bad values: one line naming the key (issue 12, case 7) ---------------------------------

NEGATIVE_IS_MEANINGFUL = {
    "seed",  # any integer seeds torch and the data order
    "ray.gpus_per_worker",  # -1 = auto; other negatives: tests/unit/test_ray_launch.py
}


@pytest.mark.parametrize(
    "override",
    [
        "train.lr=nan",
        "train.lr=inf",
        "data.shuffle_buffer=-1",
        "eval.batch_size=0",
        "train.checkpoint_every=-5",
        "loss.m_plus=0",
        "validate.poll_s=-inf",
        "data.contrast=[0.2,.nan]",
    ],
)
def test_meaningless_numbers_are_refused_naming_the_key(override):
    with pytest.raises(ConfigError, match=re.escape(override.split("=")[0])) as err:
        load_config(["configs/debug_cpu.yaml"], [override])
    assert "\n" not in str(err.value)


def test_every_numeric_key_refuses_negative_and_nan_values():
    """Systematic: a numeric key added without a range check fails here."""
    numeric = {
        key: default
        for key, (default, _) in field_docs().items()
        if isinstance(default, int | float) and not isinstance(default, bool)
    }
    assert len(numeric) > 30
    for key in sorted(numeric.keys() - NEGATIVE_IS_MEANINGFUL):
        bad_values = ["-1", "nan"] if isinstance(numeric[key], float) else ["-1"]
        for value in bad_values:
            with pytest.raises(ConfigError, match=re.escape(key)):
                load_config([], [f"{key}={value}"])


def test_yaml_syntax_error_is_one_line_naming_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [0.1\n")
    out = run_capsdist("train", "-c", bad, f"run.dir={tmp_path / 'run'}", timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [
        f"capsdist train: error: {bad}: not valid YAML, line 3, column 1: "
        "did not find expected ',' or ']'; fix the file"
    ]
    assert not (tmp_path / "run").exists()


def test_override_that_is_not_yaml_names_the_override():
    with pytest.raises(ConfigError, match=r"override 'wandb.tags=\[a,\$\{x\}\]'.*quote it"):
        load_config([], ["wandb.tags=[a,${x}]"])


def test_environment_values_run_resolved_but_are_logged_as_written(tmp_path, monkeypatch):
    """${oc.env:...} may hold a secret: W&B (config_to_dict), config.yaml and the weights'
    metadata (config_to_yaml) keep the interpolation, also when another key copies it."""
    monkeypatch.setenv("CAPSDIST_TEST_SECRET", "s3cret")
    preset = tmp_path / "env.yaml"
    preset.write_text("wandb:\n  project: ${oc.env:CAPSDIST_TEST_SECRET}\n")
    cfg = load_config(
        ["configs/debug_cpu.yaml", preset],
        ["wandb.group=${wandb.project}-a", "wandb.tags=[x,'${oc.env:CAPSDIST_TEST_SECRET}']"],
    )
    assert (cfg.wandb.project, cfg.wandb.group, cfg.wandb.tags) == (
        "s3cret",
        "s3cret-a",
        ["x", "s3cret"],
    )
    logged = config_to_dict(cfg)["wandb"]
    assert logged["project"] == "${oc.env:CAPSDIST_TEST_SECRET}"
    assert logged["group"] == "${wandb.project}-a"
    assert logged["tags"] == ["x", "${oc.env:CAPSDIST_TEST_SECRET}"]
    assert "s3cret" not in str(config_to_dict(cfg)) and "s3cret" not in config_to_yaml(cfg)
    write_config(tmp_path, cfg)
    assert load_config([tmp_path / "config.yaml"]) == cfg  # resolves again when loaded
