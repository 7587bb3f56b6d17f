"""`make gpu-check`: one command that shows what capsdist does on a machine with one NVIDIA GPU.

    python -m capsdist.bench.gpu_check [--out DIR] [--data IDX_DIR] [--work DIR]

(launch/gpu_check.sh installs the carried wheels first, then runs this.) Four stages, each
timed and recorded even when an earlier one failed, within about 8 minutes:
  1. tests: the model and routing tests with the fast model on the GPU against the fp64 CPU
     reference (CAPSDIST_TEST_DEVICE=cuda pytest tests/unit/test_routing_reference.py
     tests/unit/test_models.py);
  2. bench: `capsdist bench model --compare-plain` for MNIST and CIFAR-10 in fp32 and bf16 (the
     DeepSpeed engine step that training runs: images/s, step / conv floor, MFU, peak memory);
  3. data: Fashion-MNIST shards from its IDX files (`capsdist data fashion-mnist`);
  4. train: Fashion-MNIST (configs/fashion_mnist.yaml, bf16) for 4 minutes, then evaluated on
     its 10,000 test images.
It writes gpu_check.json (rewritten after every stage, so a run cut short keeps what it had)
and gpu_check.md (tables) to --out: $OUT when set, else runs/gpu_check. Exit status 1 if a
stage failed. No Ray, no W&B, no network.

GPU_CHECK_DRY=1 runs the same stages on the CPU with tiny sizes (a few bench steps, a few
seconds of training) in under a minute: CI runs it (tests/integration/test_gpu_check_dry.py)
so that this script cannot rot between GPU sessions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

FASHION_IDX = (
    ".gpu_carry/fashion-mnist",  # carried to a GPU machine by `make gpu-wheels`
    "/usr/share/datasets/fashion-mnist",  # Debian's dataset-fashion-mnist
)
TIME_BUDGET_S = 480.0  # the 8 minutes; training gets what the other stages left
AFTER_TRAINING_S = 45.0  # kept for the export, the evaluation and the report


@dataclass(frozen=True)
class Plan:
    """What each stage runs: the GPU sizes, or the CPU dry run's tiny ones."""

    device: str
    test_args: tuple[str, ...]
    bench_overrides: tuple[str, ...]
    bench_steps: int
    bench_warmup: int
    train_overrides: tuple[str, ...]
    train_seconds: float


GPU_PLAN = Plan(
    device="cuda",
    test_args=(
        "tests/unit/test_routing_reference.py",
        "tests/unit/test_models.py",
        "-k",
        "not builds_here",  # the fused C++ passes are CPU code
    ),
    bench_overrides=("train.batch_size=128",),
    bench_steps=20,
    bench_warmup=5,
    train_overrides=("ds.precision=bf16", "train.checkpoint_every=0"),
    train_seconds=240.0,
)
TINY_MODEL = (
    "model.conv1_channels=8",
    "model.num_prime_capsules=2",
    "model.decoder_hidden=[16,32]",
)
DRY_PLAN = Plan(
    device="cpu",
    test_args=(
        "tests/unit/test_routing_reference.py",
        "-k",
        "equals_plain_reference_values_and_gradients and reference and torch_ops",
    ),
    bench_overrides=("train.batch_size=4", *TINY_MODEL),
    bench_steps=1,
    bench_warmup=1,
    train_overrides=(
        "ds.precision=bf16",
        "train.checkpoint_every=0",
        "train.batch_size=16",
        "train.log_every=2",
        "eval.max_examples=64",
        *TINY_MODEL,
    ),
    train_seconds=3.0,
)


class Report:
    """The JSON result, written after every stage, and the Markdown table at the end."""

    def __init__(self, out: Path, dry: bool):
        self.out = out
        self.started = time.monotonic()
        self.data: dict = {"dry_run": dry, "stages": {}, "ok": True}

    def stage(self, name: str, fn: Callable[[], dict]) -> dict | None:
        """Run one stage; its result (or its error) and its seconds go into the report."""
        print(f"\n== gpu-check: {name} ==", file=sys.stderr, flush=True)
        begin = time.monotonic()
        try:
            result, error = fn(), None
        except Exception as err:  # noqa: BLE001 - recorded, and the next stage still runs
            traceback.print_exc()
            result, error = None, f"{type(err).__name__}: {err}"
        entry = {"seconds": round(time.monotonic() - begin, 1), "ok": error is None}
        if isinstance(result, dict) and result.get("ok") is False:
            entry["ok"] = False
        if error:
            entry["error"] = error[:2000]
        self.data["stages"][name] = entry
        if result is not None:
            self.data[name] = result
        self.data["ok"] &= entry["ok"]
        self.write()
        return result

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def write(self) -> None:
        self.data["seconds"] = round(self.elapsed(), 1)
        self.out.mkdir(parents=True, exist_ok=True)
        tmp = self.out / "gpu_check.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        tmp.replace(self.out / "gpu_check.json")


def describe_device(device: str) -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": device,
        "threads": torch.get_num_threads(),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            name=props.name,
            capability=f"{props.major}.{props.minor}",
            memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            cudnn=torch.backends.cudnn.version(),
            float32_matmul_precision=torch.get_float32_matmul_precision(),
        )
    return info


def run_tests(plan: Plan, out: Path) -> dict:
    """pytest in a child process (its own CUDA context and import state); counts from JUnit."""
    junit = out / "tests.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *plan.test_args]
    env = {**os.environ, "CAPSDIST_TEST_DEVICE": plan.device, "WANDB_MODE": "disabled"}
    with open(out / "tests.log", "w") as log:
        proc = subprocess.run(
            [*command, f"--junitxml={junit}"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=600,
        )
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    junit.unlink()
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return {
        "command": f"CAPSDIST_TEST_DEVICE={plan.device} python " + shlex.join(command[1:]),
        **counts,
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        "failed_tests": failed[:50],
        "ok": proc.returncode == 0 and counts["tests"] > 0,
    }


def run_bench(plan: Plan) -> dict:
    from capsdist.bench import model
    from capsdist.config import load_config

    runs = []
    for name in ("mnist", "cifar10"):
        for precision in ("fp32", "bf16"):
            args = argparse.Namespace(
                config=[f"configs/{name}.yaml"],
                overrides=[
                    f"ds.precision={precision}",
                    *plan.bench_overrides,
                ],
                steps=plan.bench_steps,
                warmup=plan.bench_warmup,
                compare_plain=True,
            )
            result = model.run(load_config(args.config, args.overrides), args)
            runs.append({"name": f"{name} {precision}", **result})
            print(json.dumps({k: result[k] for k in SUMMARY_KEYS}), file=sys.stderr, flush=True)
    return {"runs": runs}


SUMMARY_KEYS = ("images_per_s", "step_ms", "step_over_conv_bound", "mfu", "peak_mem_mb")


def make_shards(src: Path, work: Path) -> dict:
    from data_tools import make_fashion_mnist

    shutil.rmtree(work / "fashion_mnist", ignore_errors=True)  # each check starts afresh
    return make_fashion_mnist(src, work / "fashion_mnist", progress=False)


def train_and_evaluate(plan: Plan, work: Path, seconds: float) -> dict:
    from capsdist.config import load_config
    from capsdist.eval import run_eval
    from capsdist.train import run_training

    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # a new run, not the resumption of the last check
    overrides = [
        f"data.root={work / 'fashion_mnist'}",
        f"run.dir={run_dir}",
        f"train.time_limit_s={seconds}",
        "wandb.mode=disabled",
        *plan.train_overrides,
    ]
    cfg = load_config(["configs/fashion_mnist.yaml"], overrides)
    begin = time.monotonic()
    trained = run_training(cfg)
    train_s = time.monotonic() - begin
    cfg.ckpt = str(run_dir)
    evaluated = run_eval(cfg)
    return {
        "command": "capsdist train -c configs/fashion_mnist.yaml " + " ".join(overrides),
        "train": {**trained, "seconds": round(train_s, 1)},
        "eval": {k: evaluated[k] for k in ("accuracy", "loss", "num_examples") if k in evaluated},
    }


def markdown(data: dict) -> str:
    from capsdist.bench.report import table

    device = data.get("device", {})
    lines = [
        "# gpu-check" + (" (dry run, CPU)" if data["dry_run"] else ""),
        "",
        f"{device.get('name', device.get('device'))}; torch {device.get('torch')}, "
        f"CUDA {device.get('cuda')}; {data['seconds']} s in all; "
        + ("all stages passed" if data["ok"] else "**a stage failed**"),
        "",
        "| stage | ok | seconds | note |",
        "|---|---|---|---|",
    ]
    for name, stage in data["stages"].items():
        lines.append(f"| {name} | {stage['ok']} | {stage['seconds']} | {stage.get('error', '')} |")
    if tests := data.get("tests"):
        lines += [
            "",
            f"Tests: {tests['passed']} passed, {tests['failures'] + tests['errors']} failed, "
            f"{tests['skipped']} skipped: `{tests['command']}`",
        ]
        lines += [f"- failed: `{name}`" for name in tests["failed_tests"]]
    if bench := data.get("bench"):
        lines += ["", "## bench model", "", table(bench["runs"]).rstrip("\n")]
    if trained := data.get("train"):
        t, e = trained["train"], trained["eval"]
        lines += [
            "",
            "## Fashion-MNIST training",
            "",
            "| steps | train s | images/s | train loss | train acc. | test acc. | test loss |",
            "|---|---|---|---|---|---|---|",
            f"| {t['step']} | {t['seconds']} | {round(t['images_per_s'], 1)} "
            f"| {round(t['loss'], 4)} | {round(t['train_accuracy'], 4)} "
            f"| {round(e['accuracy'], 4)} | {round(e['loss'], 4)} |",
            "",
            f"`{trained['command']}`",
        ]
    return "\n".join(lines) + "\n"


def find_idx(given: str | None) -> Path:
    for candidate in [given] if given else FASHION_IDX:
        if candidate and (Path(candidate) / "train-images-idx3-ubyte.gz").exists():
            return Path(candidate)
    raise FileNotFoundError(
        f"no Fashion-MNIST IDX files (train-images-idx3-ubyte.gz, ...) in "
        f"{given or ' or '.join(FASHION_IDX)}: run `make gpu-wheels` (it copies them into "
        ".gpu_carry/fashion-mnist) or pass --data DIR"
    )


def no_cuda() -> dict:
    raise RuntimeError(
        f"torch {torch.__version__} sees no CUDA device: run on a GPU machine with a CUDA build "
        "of PyTorch, or set GPU_CHECK_DRY=1 for the CPU dry run"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_check", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check")
    parser.add_argument("--data", default=None, help="folder of Fashion-MNIST's IDX .gz files")
    parser.add_argument("--work", default="/tmp/capsdist_gpu_check", help="shards and run.dir")
    args = parser.parse_args(argv)
    dry = os.environ.get("GPU_CHECK_DRY") == "1"
    plan = DRY_PLAN if dry else GPU_PLAN
    os.environ["WANDB_MODE"] = "disabled"  # no W&B, whatever the configs say
    out, work = Path(args.out), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    report = Report(out, dry)
    if not dry and not torch.cuda.is_available():
        report.data["device"] = describe_device("cpu")
        report.stage("cuda", no_cuda)
        (out / "gpu_check.md").write_text(markdown(report.data))
        print("gpu-check: no CUDA device (GPU_CHECK_DRY=1 runs it on the CPU)", file=sys.stderr)
        return 1
    report.data["device"] = describe_device(plan.device)
    report.write()
    report.stage("tests", lambda: run_tests(plan, out))
    report.stage("bench", lambda: run_bench(plan))
    shards = report.stage("data", lambda: make_shards(find_idx(args.data), work))
    if shards:
        left = TIME_BUDGET_S - report.elapsed() - AFTER_TRAINING_S
        seconds = plan.train_seconds if dry else max(60.0, min(plan.train_seconds, left))
        report.stage("train", lambda: train_and_evaluate(plan, work, seconds))
    engines = sorted(m for m in ("ray", "wandb") if m in sys.modules)
    report.data["imported_ray_or_wandb"] = engines
    report.data["ok"] &= not engines
    report.write()
    (out / "gpu_check.md").write_text(markdown(report.data))
    print(json.dumps({"ok": report.data["ok"], "out": str(out), "seconds": report.data["seconds"]}))
    return 0 if report.data["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
