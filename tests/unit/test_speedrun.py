"""The pieces of the speedrun recipe (issue 17): budget learning-rate schedules, the training
clock that drives them (train/pacing.py), the recipe's model knobs and configs, and the reading
of time-to-accuracy curves. The runs themselves: tests/integration/test_speedrun.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

from capsdist.config import ConfigError, config_to_yaml, load_config
from capsdist.distributed.engine import ReferenceDecay, build_lr_factor, build_optimizer
from capsdist.distributed.schedules import BudgetSchedule, progress_at
from capsdist.errors import UserError
from capsdist.models import build_model, num_parameters
from capsdist.models.layers import squash
from capsdist.models.plain import PlainCapsNet
from capsdist.run_dir import model_differences, run_differences
from capsdist.train.pacing import Pacer
from capsdist.viz.curves import read_curve

# ---- schedules ------------------------------------------------------------------------------


def schedule(shape: str, total: float = 1000.0) -> BudgetSchedule:
    return BudgetSchedule(shape, 0.1, 0.04, 0.01, total)


@pytest.mark.parametrize("shape", ["onecycle", "cosine"])
def test_budget_schedule_warms_up_peaks_and_ends_at_its_final_factor(shape):
    f = schedule(shape)
    assert f(0) == pytest.approx(0.04)  # the warm-up's start
    assert f(50) == pytest.approx(0.04 + 0.96 * 0.5)  # linear warm-up, halfway
    assert f(100) == pytest.approx(1.0)  # the peak, at warmup_frac of the steps
    assert f(550) == pytest.approx((1 + 0.01) / 2)  # halfway down (both shapes)
    assert f(1000) == pytest.approx(0.01) and f(5000) == pytest.approx(0.01)  # and there it stays
    values = [f(step) for step in range(0, 1001, 10)]
    peak = values.index(max(values))
    assert peak == 10
    assert all(a < b for a, b in zip(values[:peak], values[1 : peak + 1], strict=True))
    assert all(a > b for a, b in zip(values[peak:-1], values[peak + 1 :], strict=True))


def test_onecycle_falls_linearly_and_cosine_along_a_half_cosine():
    quarter = 100 + 900 * 0.25  # a quarter of the way down
    assert schedule("onecycle")(quarter) == pytest.approx(1 - 0.99 * 0.25)
    assert schedule("cosine")(quarter) == pytest.approx(
        1 - 0.99 * 0.5 * (1 - math.cos(math.pi / 4))
    )


def test_reference_decay_stays_the_default_schedule():
    cfg = load_config(["configs/mnist.yaml"])
    factor = build_lr_factor(cfg.train)
    assert factor == ReferenceDecay(0.96, 2000, 1e-6 / 1e-3)
    assert factor(4000) == pytest.approx(0.96**2)
    onecycle = build_lr_factor(load_config([], ["train.lr_schedule=onecycle"]).train)
    assert isinstance(onecycle, BudgetSchedule) and onecycle.total_steps == 1000


def test_progress_of_a_resumed_job_starts_where_its_checkpoint_was():
    assert progress_at(250, 0, 0.0, 1000) == 0.25
    assert progress_at(400, 400, 0.3, 1000) == pytest.approx(0.3)  # continuous at the resume
    assert progress_at(700, 400, 0.3, 1000) == pytest.approx(0.3 + 0.7 * 0.5)
    assert progress_at(1000, 400, 0.3, 1000) == 1.0 and progress_at(1200, 400, 0.3, 1000) == 1.0
    assert progress_at(500, 500, 1.0, 500) == 1.0  # a finished schedule stays finished


# ---- the pacer: training clock, horizon, evaluations, shift -----------------------------------


class FakeClock:
    """Seconds that move only when the test says (the pacer's clock is injectable)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def engine_like_scheduler(cfg):
    """A real LambdaLR over a real Adam, as build_engine makes (without DeepSpeed)."""
    weight = torch.nn.Parameter(torch.zeros(3))
    optimizer = build_optimizer([weight], cfg.train)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=build_lr_factor(cfg.train))


def run_steps(pacer, scheduler, clock, steps, seconds_per_step, log_every=10, first=0):
    """Steps as the loop does them: scheduler.step() after each, pacer.synced at log steps with
    the main rank's clock; returns {step: lr} at the log steps."""
    lrs = {}
    for step in range(first + 1, first + steps + 1):
        clock.now += seconds_per_step
        scheduler.optimizer.step()  # no gradient: a no-op, but in the order torch expects
        scheduler.step()
        if step % log_every == 0:
            lrs[step] = scheduler.get_last_lr()[0]
            pacer.synced(step, pacer.job_seconds())
    return lrs


def test_time_budget_sets_the_horizon_and_the_schedule_ends_with_the_budget():
    overrides = ["train.lr_schedule=cosine", "train.time_limit_s=10", "train.max_steps=100000"]
    cfg = load_config(["configs/debug_cpu.yaml"], overrides)
    clock, scheduler = FakeClock(), engine_like_scheduler(cfg)
    pacer = Pacer(cfg, 0, {}, scheduler, clock=clock)
    pacer.start()
    assert pacer.total_steps == 100000  # nothing measured yet
    lrs = run_steps(pacer, scheduler, clock, 100, 0.1)  # 10 steps/s for the 10-s budget
    assert pacer.total_steps == pytest.approx(100)
    assert pacer.train_time_s == pytest.approx(10.0)
    assert lrs[100] == pytest.approx(cfg.train.lr * 0.01)  # the end of the schedule
    assert lrs[20] == pytest.approx(cfg.train.lr * schedule("cosine", 100)(20))


def test_evaluation_time_is_not_training_time_and_evaluations_come_every_n_seconds():
    cfg = load_config(["configs/debug_cpu.yaml"], ["train.eval_every_s=2", "train.time_limit_s=60"])
    clock = FakeClock()
    pacer = Pacer(cfg, 0, {}, clock=clock)
    pacer.start()
    evaluated_at = []
    for step in range(10, 101, 10):
        clock.now += 0.7  # 10 steps
        pacer.synced(step, pacer.job_seconds())
        if pacer.eval_due():
            with pacer.evaluation():
                clock.now += 5.0  # a slow evaluation
            pacer.evaluated()
            evaluated_at.append(step)
    assert evaluated_at == [30, 60, 90]  # the first log step after 2, 4, 6 training seconds
    assert pacer.train_time_s == pytest.approx(7.0) and pacer.eval_time_s == pytest.approx(15.0)
    assert pacer.job_seconds() == pytest.approx(7.0)  # what train.time_limit_s is checked on


def test_resumed_pacer_continues_the_learning_rate_the_clock_and_the_horizon():
    overrides = ["train.lr_schedule=onecycle", "train.time_limit_s=20", "train.max_steps=100000"]
    cfg = load_config(["configs/debug_cpu.yaml"], overrides)
    clock, scheduler = FakeClock(), engine_like_scheduler(cfg)
    first = Pacer(cfg, 0, {}, scheduler, clock=clock)
    first.start()
    lrs = run_steps(first, scheduler, clock, 60, 0.1)  # stopped (a signal) at step 60 of ~200
    saved = json.loads(json.dumps(first.state(60)))  # as the checkpoint marker holds it
    assert saved["progress"] == pytest.approx(60 / 200) and saved["total_steps"] == pytest.approx(
        200
    )

    resumed = engine_like_scheduler(cfg)  # a new job: fresh engine, at step 60
    resumed.last_epoch = 60
    second = Pacer(cfg, 60, saved, resumed, clock=clock)
    assert resumed.get_last_lr()[0] == pytest.approx(lrs[60])  # no jump at the resume
    assert second.train_time_s == pytest.approx(6.0)
    second.start()
    after = run_steps(second, resumed, clock, 40, 0.1, first=60)  # a new 20-s budget
    assert second.total_steps == pytest.approx(60 + 200)  # its own budget from step 60
    assert second.progress(260) == pytest.approx(1.0)
    assert after[70] == pytest.approx(cfg.train.lr * schedule("onecycle", 200)(70))
    assert second.train_time_s == pytest.approx(10.0)


def test_without_a_time_limit_progress_is_step_over_max_steps_unless_the_end_moved():
    cfg = load_config(
        ["configs/debug_cpu.yaml"], ["train.lr_schedule=cosine", "train.max_steps=80"]
    )
    same_end = {"progress": 0.5, "total_steps": 80.0, "train_time_s": 3.0}
    scheduler = engine_like_scheduler(cfg)
    pacer = Pacer(cfg, 40, same_end, scheduler)
    assert pacer.horizon == (0, 0.0, 80.0) and pacer.progress(40) == 0.5  # to the bit
    assert scheduler.get_last_lr()[0] == pytest.approx(cfg.train.lr * schedule("cosine", 80)(40))
    # The job before ran to a time budget (or another max_steps): no jump, on to the new end.
    timed = {"progress": 0.9, "total_steps": 55.0, "train_time_s": 3.0}
    pacer = Pacer(cfg, 40, timed, engine_like_scheduler(cfg))
    assert pacer.horizon == (40, 0.9, 80.0) and pacer.progress(60) == pytest.approx(0.95)


def test_shift_ends_at_data_shift_until_once_also_when_resumed_past_it():
    cfg = load_config(["configs/debug_cpu.yaml"], ["train.max_steps=100", "data.shift_until=0.3"])
    calls = []
    pacer = Pacer(cfg, 0, {}, set_shift=calls.append)
    for step in (10, 20, 30, 40):
        pacer.synced(step, float(step))
    assert calls == [0] and not pacer.shifting
    late = []
    Pacer(cfg, 50, {}, set_shift=late.append)  # a job resumed at step 50: unshifted at once
    assert late == [0]
    unshifted = load_config(["configs/debug_cpu.yaml"], ["data.shift_pixels=0"])
    none = []
    Pacer(unshifted, 50, {}, set_shift=none.append)
    # The default shifts for the whole run, also when a rerun goes past the end it had planned.
    finished = {"progress": 1.0, "total_steps": 100.0}
    always = load_config(["configs/debug_cpu.yaml"], ["train.max_steps=200"])
    Pacer(always, 100, finished, set_shift=none.append).synced(200, 10.0)
    assert none == []


# ---- the recipe's configs and model knobs ------------------------------------------------------


@pytest.mark.parametrize("preset", ["fashion_mnist_fast", "mnist_fast"])
def test_fast_configs_build_the_papers_capsnet_with_the_speed_recipe(preset):
    cfg = load_config([f"configs/{preset}.yaml"])
    assert num_parameters(build_model(cfg.model)) == 8_215_728
    assert (cfg.model.routing_iters, cfg.model.reconstruction) == (3, True)
    assert (cfg.model.train_routing_iters, cfg.model.eval_routing_iters) == (0, 2)
    assert (cfg.train.batch_size, cfg.loss.margin_reduction, cfg.ds.precision) == (
        32,
        "paper",
        "fp32",
    )
    assert cfg.model.channels_last
    assert cfg.train.lr_schedule in ("onecycle", "cosine") and cfg.train.warmup_frac > 0
    assert cfg.train.time_limit_s == 600 and cfg.train.eval_every_s > 0
    assert cfg.train.lr == 4e-3 and cfg.data.shift_until == 0 and not cfg.data.flip
    assert (cfg.train.adam_beta1, cfg.train.adam_beta2) == (0.9, 0.99)


def test_adam_keeps_the_references_betas_unless_the_recipe_sets_them():
    weights = [torch.nn.Parameter(torch.zeros(3))]
    reference = build_optimizer(weights, load_config(["configs/debug_cpu.yaml"]).train)
    assert reference.param_groups[0]["betas"] == (0.9, 0.999)  # TensorFlow's AdamOptimizer
    overrides = ["train.adam_beta1=0.8", "train.adam_beta2=0.99"]
    recipe = build_optimizer(weights, load_config(["configs/debug_cpu.yaml"], overrides).train)
    assert recipe.param_groups[0]["betas"] == (0.8, 0.99)


def test_fashion_mnist_reference_config_keeps_the_reference_recipe():
    cfg = load_config(["configs/fashion_mnist.yaml"])
    t = cfg.train
    assert (t.lr_schedule, t.eval_every_s, cfg.data.shift_until) == ("reference", 0.0, 1.0)
    assert (cfg.model.train_routing_iters, cfg.model.primary_scaling) == (0, "reference")


def tiny(overrides=()):
    return load_config(["configs/debug_cpu.yaml"], ["model.routing_iters=3", *overrides])


@pytest.mark.parametrize("fast", [True, False], ids=["capsnet", "plain_reference"])
def test_train_and_eval_routing_iters_apply_in_their_mode_only(fast):
    build = build_model if fast else PlainCapsNet
    cfg = tiny(["model.train_routing_iters=1", "model.eval_routing_iters=2"])
    torch.manual_seed(0)
    model = build(cfg.model)
    one, two, three = (build(tiny([f"model.routing_iters={n}"]).model) for n in (1, 2, 3))
    for other in (one, two, three):
        other.load_state_dict(model.state_dict())
    images = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model.train()(images).lengths, one.train()(images).lengths)
        torch.testing.assert_close(model.eval()(images).lengths, two.eval()(images).lengths)
        assert not torch.allclose(two.eval()(images).lengths, three.eval()(images).lengths)
        assert not torch.allclose(one.eval()(images).lengths, two.eval()(images).lengths)


def test_paper_primary_scaling_squashes_the_unscaled_convolution():
    torch.manual_seed(0)
    model = build_model(tiny(["model.primary_scaling=paper"]).model)
    primary = model.primary
    x = torch.rand(2, 16, 20, 20)
    with torch.no_grad():
        conv = primary.conv(x).reshape(2, primary.types, primary.dim, *primary.out_hw)
        want = squash(conv.permute(0, 1, 3, 4, 2) + primary.bias[:, None, None, :])
        torch.testing.assert_close(primary(x), want.reshape(2, -1, primary.dim))
    assert build_model(tiny().model).primary.vote_scale == 1 / 4  # reference: 1 / types


def test_training_only_model_keys_are_the_same_model_but_another_run():
    saved = load_config(["configs/debug_cpu.yaml"])
    other = load_config(["configs/debug_cpu.yaml"], ["model.train_routing_iters=1"])
    assert model_differences(vars(saved.model), other.model) == []  # eval, warm start, ensembles
    assert run_differences(config_to_yaml(saved), other) == [
        "model.train_routing_iters: 0 there, 1 here"
    ]
    # Evaluation's routing count is how the model runs: same model and same run.
    evaluated = load_config(["configs/debug_cpu.yaml"], ["model.eval_routing_iters=2"])
    assert model_differences(vars(saved.model), evaluated.model) == []
    assert run_differences(config_to_yaml(saved), evaluated) == []
    scaled = load_config(["configs/debug_cpu.yaml"], ["model.primary_scaling=paper"])
    assert model_differences(vars(saved.model), scaled.model)  # another function: another model


@pytest.mark.parametrize(
    "override",
    [
        "train.lr_schedule=linear",
        "train.warmup_frac=1",
        "data.shift_until=1.5",
        "model.primary_scaling=tf",
        "train.lr_final_factor=2",
        "train.adam_beta2=1",
    ],
)
def test_recipe_keys_refuse_meaningless_values_naming_the_key(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(["configs/debug_cpu.yaml"], [override])


# ---- curves --------------------------------------------------------------------------------------


def test_curve_reads_eval_lines_with_training_seconds_and_names_what_is_missing(tmp_path):
    lines = [
        {"step": 10, "loss": 1.0, "train_time_s": 3.0},
        {"step": 20, "loss": 0.9, "train_time_s": 6.0, "eval_accuracy": 0.5},
        {"step": 20, "eval_accuracy": 0.51},  # `capsdist validate`'s line: no training clock
        {"step": 30, "loss": 0.8, "train_time_s": 9.5, "eval_accuracy": 0.7},
    ]
    text = "".join(json.dumps(m) + "\n" for m in lines) + '{"step": 40, "lo'  # cut short
    (tmp_path / "metrics.jsonl").write_text(text)
    curve = read_curve(tmp_path, label="mine")
    assert (curve.label, curve.seconds, curve.values) == ("mine", [6.0, 9.5], [0.5, 0.7])
    with pytest.raises(UserError, match="has no 'eval_loss'.*train.eval_every_s"):
        read_curve(tmp_path, "eval_loss")
    with pytest.raises(UserError, match="does not exist"):
        read_curve(tmp_path / "nowhere")
