"""Progress without a terminal (SLURM logs, CI): plain lines, never carriage-return updates."""

from __future__ import annotations

from capsdist.track import ProgressBar
from tests.conftest import run_capsdist


def test_plain_progress_prints_lines_with_values_rate_and_eta(capsys, monkeypatch):
    monkeypatch.setenv("CAPSDIST_PROGRESS_EVERY_S", "0")  # a line at every update
    bar = ProgressBar(10, desc="train", unit="step", plain=True)
    bar.update(1, loss="0.5000")
    bar.update(1, loss="0.4000", acc="0.812")
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 3 and "\r" not in "".join(lines)
    assert lines[0].startswith("train: 1/10 steps loss=0.5000 ")
    assert lines[1].startswith("train: 2/10 steps loss=0.4000 acc=0.812 ")
    assert "steps/s" in lines[1] and "ETA" in lines[1]


def test_a_new_total_moves_the_eta(capsys, monkeypatch):
    """Under a time budget the expected end is re-estimated: the lines follow it."""
    monkeypatch.setenv("CAPSDIST_PROGRESS_EVERY_S", "0")
    bar = ProgressBar(1_000_000, plain=True)
    bar.update(1)
    bar.set_total(40)
    bar.update(1)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("train: 1/1000000 steps") and lines[1].startswith("train: 2/40 ")


def test_plain_progress_waits_for_its_interval(capsys, monkeypatch):
    monkeypatch.setenv("CAPSDIST_PROGRESS_EVERY_S", "3600")
    bar = ProgressBar(100, plain=True)
    for _ in range(50):
        bar.update(1)
    bar.close()
    # 50 updates inside one interval: only the closing line, where it ended.
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("train: 50/100 steps ")


def test_a_training_log_without_a_terminal_has_no_carriage_returns(mnist_sample, tmp_path):
    out = run_capsdist(
        "train",
        "-c",
        "configs/debug_cpu.yaml",
        f"data.root={mnist_sample}",
        f"run.dir={tmp_path / 'run'}",
        "train.max_steps=6",
        CAPSDIST_PROGRESS_EVERY_S="0",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "\r" not in out.stderr
    progress = [line for line in out.stderr.splitlines() if line.startswith("train: ")]
    assert progress[-1].startswith("train: 6/6 steps ") and len(progress) >= 6
