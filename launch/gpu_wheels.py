"""`make gpu-wheels`: what `make gpu-check` needs on a GPU machine that cannot reach a registry.

    .venv/bin/python launch/gpu_wheels.py [--out .gpu_carry] [--python-version 3.12]

Writes, into --out (ignored by git; carry it to the GPU machine beside the checkout):
  wheels/            wheels, for that Python on x86-64 Linux, of the packages capsdist imports
                     that a CUDA PyTorch image lacks (DeepSpeed, OmegaConf, braceexpand and what
                     they require), at the versions installed in ./.venv, so the GPU runs the
                     versions the tests here ran; never torch (the machine's CUDA build is used)
  wheels/requirements.txt   what launch/gpu_check.sh installs (pip resolves the rest)
  fashion-mnist/     Fashion-MNIST's four IDX .gz files (30 MB, from Debian's
                     dataset-fashion-mnist) for the 4-minute training

DeepSpeed is published as source only: its wheel is built here with no compiled ops
(DS_BUILD_OPS=0; it builds what it needs on first use, and capsdist's Adam needs none).
Needs pip access to a package index. Prints one JSON line: files and megabytes.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOTS = ("deepspeed", "omegaconf", "braceexpand")
"""Imported by the code gpu-check runs and missing from a CUDA PyTorch image (wandb, Ray,
webdataset and s3fs are imported only by features gpu-check does not use)."""
ON_EVERY_CUDA_TORCH_MACHINE = {"torch", "numpy", "triton", "setuptools", "pip", "wheel"}
"""Never carried: torch must stay the machine's CUDA build; the others come with it (numpy's
wheel alone would be 16 MB)."""
PLATFORMS = tuple(
    f"manylinux_2_{minor}_x86_64" for minor in (35, 34, 31, 28, 27, 24, 17, 12, 5)
) + ("manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64")
"""Wheel tags pip may take (it matches them exactly); glibc 2.35 and older run on any current
GPU image (Ubuntu 22.04 and later)."""
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_FILES = [
    f"{split}-{kind}-idx{dims}-ubyte.gz"
    for split in ("train", "t10k")
    for kind, dims in (("images", 3), ("labels", 1))
]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: tuple[str, ...]) -> dict[str, str]:
    """{distribution: version installed here} of `roots` and everything they require (extras
    aside, environment markers evaluated for this machine), minus ON_EVERY_CUDA_TORCH_MACHINE."""
    from packaging.requirements import Requirement

    found: dict[str, str] = {}
    todo = list(roots)
    while todo:
        name = _canonical(todo.pop())
        if name in found or name in ON_EVERY_CUDA_TORCH_MACHINE or name.startswith("nvidia-"):
            continue
        dist = metadata.distribution(name)
        found[name] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return found


def pip(*args: str, env: dict | None = None) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, env=env)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=".gpu_carry")
    parser.add_argument("--python-version", default="3.12", help="the GPU machine's python3")
    parser.add_argument("--fashion-mnist", default=str(FASHION_MNIST), help="its IDX .gz files")
    args = parser.parse_args(argv)
    out = Path(args.out)
    wheels = out / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)  # one version of each, or pip refuses them all
    wheels.mkdir(parents=True)
    pins = closure(ROOTS)
    binary = [f"{name}=={version}" for name, version in sorted(pins.items()) if name != "deepspeed"]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    pip(
        "download", "--quiet", "--no-deps", "--only-binary=:all:", "--dest", str(wheels),
        "--python-version", args.python_version, "--implementation", "cp", *platforms, *binary,
    )  # fmt: skip
    env = {**os.environ, "DS_BUILD_OPS": "0"}
    pip(
        "wheel",
        "--quiet",
        "--no-deps",
        "--wheel-dir",
        str(wheels),
        f"deepspeed=={pins['deepspeed']}",
        env=env,
    )
    (wheels / "requirements.txt").write_text(
        "".join(f"{name}=={pins[_canonical(name)]}\n" for name in ROOTS)
    )
    data = out / "fashion-mnist"
    data.mkdir(exist_ok=True)
    for name in FASHION_FILES:
        source = Path(args.fashion_mnist) / name
        if not source.exists():
            raise SystemExit(
                f"{source} not found: install Debian's dataset-fashion-mnist or pass "
                "--fashion-mnist DIR (the four IDX .gz files)"
            )
        shutil.copyfile(source, data / name)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    megabytes = round(sum(p.stat().st_size for p in files) / 2**20, 1)
    result = {"out": str(out), "files": [str(p.relative_to(out)) for p in files], "mib": megabytes}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
