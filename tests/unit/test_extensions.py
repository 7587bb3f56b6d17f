"""C++ extension builds never hang (issue 12, case 1): a build killed half-way leaves torch's
`lock` baton behind, which made every later load wait forever; capsdist's build lock dies with
its holder, says whom it waits for, and the routing kernel gets one binary per CPU kind.

One real compile of the routing kernel (~30 s on 2 cores), into a private TORCH_EXTENSIONS_DIR,
serves the whole file; the other tests take the lock without compiling anything."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from capsdist.extensions import build_lock, cpu_feature_key
from capsdist.models.routing import cpu_kernels_name
from tests.conftest import ROOT, cli_env

LOAD_KERNELS = (
    "from capsdist.models.routing import cpu_kernels\n"
    "assert cpu_kernels() is not None, 'the kernels did not build'\n"
)
# Without capsdist's lock a stale baton made this wait forever: the timeout turns that into a
# failure. Generous: a compile competes with whatever else runs on the machine.
BUILD_TIMEOUT_S = 300


def python(code: str, ext_dir: Path, stderr=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=cli_env(TORCH_EXTENSIONS_DIR=str(ext_dir)),
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )


def wait_for_text(path: Path, text: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in path.read_text():
        assert proc.poll() is None, f"ended early: {path.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"no {text!r} in: {path.read_text()[-2000:]}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def built_after_a_killed_build(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """A private extensions folder where a build of the routing kernel was killed (its baton
    left in the build dir), then one load of the kernel: the file's one compile."""
    ext_dir = tmp_path_factory.mktemp("torch_extensions")
    baton = ext_dir / cpu_kernels_name() / "lock"
    baton.parent.mkdir()
    baton.touch()
    proc = subprocess.run(
        [sys.executable, "-c", LOAD_KERNELS],
        cwd=ROOT,
        env=cli_env(TORCH_EXTENSIONS_DIR=str(ext_dir)),
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT_S,
    )
    return ext_dir, proc


@pytest.mark.slow
def test_a_killed_build_does_not_block_the_next_one(built_after_a_killed_build):
    ext_dir, proc = built_after_a_killed_build
    assert proc.returncode == 0, proc.stderr[-3000:]
    name = cpu_kernels_name()
    assert f"removed stale torch build lock {ext_dir / name / 'lock'}" in proc.stderr
    assert (ext_dir / name / f"{name}.so").exists()
    assert not (ext_dir / name / "lock").exists()


@pytest.mark.slow
def test_a_second_build_waits_for_the_first_and_says_so(built_after_a_killed_build, monkeypatch):
    ext_dir, _ = built_after_a_killed_build
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(ext_dir))
    err = ext_dir / "second.err"
    with build_lock(cpu_kernels_name()), err.open("w") as err_file:
        second = python(LOAD_KERNELS, ext_dir, stderr=err_file)
        wait_for_text(err, f"waiting for PID {os.getpid()} on ", second)
        assert f"building {cpu_kernels_name()} in {ext_dir}" in err.read_text()
        assert second.poll() is None
    second.communicate(timeout=BUILD_TIMEOUT_S)  # built already: this only loads it
    assert second.returncode == 0, err.read_text()[-3000:]
    assert "removed stale" not in err.read_text()


def test_the_lock_of_a_killed_builder_is_released_and_its_baton_removed(tmp_path, monkeypatch):
    """SIGKILL mid-"build": the kernel drops the flock at once; torch's baton is left behind."""
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    holder = python(
        "from capsdist.extensions import build_lock\n"
        "import time\n"
        "with build_lock('demo') as build_dir:\n"
        "    (build_dir / 'lock').touch()  # what torch's load does first\n"
        "    print('building', flush=True)\n"
        "    time.sleep(600)\n",
        tmp_path,
    )
    assert holder.stdout.readline() == "building\n", holder.communicate()[1][-2000:]
    holder.send_signal(signal.SIGKILL)
    holder.communicate(timeout=30)
    start = time.monotonic()
    with build_lock("demo") as build_dir:
        assert time.monotonic() - start < 1.0  # no wait: the lock died with its holder
        assert not (build_dir / "lock").exists()


def test_the_routing_kernel_is_cached_per_cpu_kind(tmp_path):
    def key(flags: str) -> str:
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
        return cpu_feature_key(cpuinfo)

    assert key("sse2 avx2 fma") == key("fma sse2 avx2")
    assert key("sse2 avx2 fma") != key("sse2 avx2 fma avx512f")  # a newer node: another binary
    assert re.fullmatch(r"[0-9a-f]{8}", cpu_feature_key(tmp_path / "missing"))
    assert cpu_kernels_name() == f"capsdist_routing_cpu_{cpu_feature_key()}"
