"""No device→host read between log steps (issue 15 item 3), counted on the real loop.

On a GPU every read of a device tensor (`.item()`, `float()`, `int()`, `bool()`, `.tolist()`,
`.cpu()`, `.numpy()`, formatting) makes the host wait for the step it has just queued. The
counter below is a TorchFunctionMode around `run_training`: every torch call passes through it,
so it sees each such read, and it follows which tensors would live on the device (parameters,
what `.to(device)` and factories with `device=` return, and everything computed from those),
so that host-side work (the reader's CPU random draws) is not mistaken for a transfer. Each read
is charged to the optimizer step in progress, counted by wrapping `train_step`.
"""

from __future__ import annotations

import traceback
from collections import defaultdict

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from capsdist.config import load_config

pytestmark = pytest.mark.slow

READS = {
    "item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__", "__index__",
    "__format__", "__array__", "__repr__",
}  # fmt: skip
MARK = "_counted_as_on_device"  # set on tensors that would live on the training device


class DeviceReadCounter(TorchFunctionMode):
    """Counts reads of device tensors, by optimizer step (`self.step`, set by the caller)."""

    def __init__(self):
        super().__init__()
        self.step = 0
        self.reads: dict[int, list[str]] = defaultdict(list)

    @staticmethod
    def _is_device(value) -> bool:
        return isinstance(value, torch.nn.Parameter) or getattr(value, MARK, False)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        inputs, _ = tree_flatten((args, kwargs))
        from_device = any(self._is_device(x) for x in inputs)
        if name in READS and self.step and args and self._is_device(args[0]):
            frames = traceback.extract_stack(limit=4)[:-1]
            where = " <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno}" for f in frames[::-1])
            self.reads[self.step].append(f"{name} at {where}")
        out = func(*args, **kwargs)
        # Factories given a device, `.to(device)` and `.cuda()` place their results on it.
        placed = "device" in kwargs or name == "cuda"
        placed |= name == "to" and any(isinstance(x, (torch.device, str)) for x in inputs[1:])
        if from_device or placed:
            for x in tree_flatten(out)[0]:
                if isinstance(x, torch.Tensor):
                    setattr(x, MARK, True)
        return out


def train_counting_reads(tmp_path, mnist_sample, monkeypatch, inject_float_loss=False, ds=()):
    """Train debug_cpu for 12 steps under the counter: the reads charged to each step."""
    import capsdist.train.loop as loop

    counter = DeviceReadCounter()
    steps = {"micro": 0}
    real_step = loop.train_step

    def counted_step(engine, batch, loss_cfg):
        steps["micro"] += 1
        counter.step = steps["micro"]  # one micro-batch per step here (no accumulation)
        loss, correct = real_step(engine, batch, loss_cfg)
        if inject_float_loss:
            float(loss)  # what the loop did before issue 15, on every step
        return loss, correct

    monkeypatch.setattr(loop, "train_step", counted_step)
    cfg = load_config(
        ["configs/debug_cpu.yaml"],
        [
            f"data.root={mnist_sample}",
            f"run.dir={tmp_path / 'run'}",
            "train.batch_size=8",
            "train.max_steps=12",
            "train.log_every=4",
            "train.checkpoint_every=6",
            *ds,
        ],
    )
    logged = []
    with counter:
        result = loop.run_training(cfg, callbacks=[lambda step, m, model: logged.append(step)])
    assert result["step"] == 12 and logged == [4, 8, 12]
    return counter.reads


SYNC_STEPS = {4, 6, 8, 12}  # log steps (every 4, and the last) and the checkpoint step 6


@pytest.mark.parametrize(
    "ds",
    [(), ("ds.zero_stage=2", "ds.precision=bf16")],
    ids=["zero0-fp32", "zero2-bf16"],  # ZeRO-1/2 read grad-norm / overflow flags unless told not to
)
def test_training_reads_nothing_from_the_device_between_log_and_checkpoint_steps(
    tmp_path, mnist_sample, monkeypatch, ds
):
    reads = train_counting_reads(tmp_path, mnist_sample, monkeypatch, ds=ds)
    between = {step: where for step, where in reads.items() if step not in SYNC_STEPS}
    assert between == {}, f"device→host reads between sync steps: {between}"
    # The counter sees the reads that are there: the window's one read at each log step.
    for step in (4, 8):
        assert any(r.startswith("tolist at step.py") for r in reads[step]), reads[step]


def test_the_counter_catches_a_float_of_the_loss_on_every_step(tmp_path, mnist_sample, monkeypatch):
    """The check can fail: one `float(loss)` per step, as the loop had, is charged to each step."""
    reads = train_counting_reads(tmp_path, mnist_sample, monkeypatch, inject_float_loss=True)
    for step in set(range(1, 13)) - SYNC_STEPS:
        assert any(r.startswith("__float__ at test_host_sync.py") for r in reads[step]), reads
