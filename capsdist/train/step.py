"""One optimisation micro-step, and the running statistics the loop reports."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from capsdist.config.schema import LossConfig
from capsdist.data import Batch
from capsdist.models import compute_loss, num_correct


def train_step(engine, batch: Batch, loss_cfg: LossConfig):
    """Forward, loss, backward and (at an accumulation boundary) the optimizer step.

    `batch` is on the engine's device already. Returns (loss, number of correct examples) for
    this micro-batch, both detached.
    """
    images, labels = batch.images, batch.labels
    inputs = images.to(next(engine.module.parameters()).dtype)  # bf16 engines take bf16 inputs
    output = engine(inputs, labels)
    # The decoder reproduces the (shifted) input as fed, in fp32 pixels [0, 1], unless the
    # data says otherwise (MultiMNIST: each source digit).
    targets = images if batch.recon_targets is None else batch.recon_targets
    loss, _ = compute_loss(output, labels, targets, loss_cfg)
    engine.backward(loss)
    engine.step()
    return loss.detach(), num_correct(output, labels)


@dataclass(frozen=True)
class Tally:
    """What every rank agrees on at a sync step (log, checkpoint or last step), from one
    all-reduce: the window's statistics and the ranks' votes (e.g. "stop")."""

    loss: float
    """Mean micro-batch loss over the window and every rank; NaN or inf if any loss was."""
    accuracy: float
    """Correct / examples over the window and every rank."""
    votes: tuple[int, ...]
    """For each vote cast to `WindowStats.tally`, the number of ranks that cast it."""
    shared: tuple[float, ...] = ()
    """For each value passed to `WindowStats.tally` as `shared`, its sum over the ranks (a value
    that only the main rank passes, the others 0, reaches every rank as the main rank's)."""


class WindowStats:
    """Loss and correct counts summed on the device since the last log step.

    `add` launches two tiny device ops and reads nothing back: on a GPU the host never waits
    for the step it has just queued (nanoGPT-style loops read the loss only when they log).
    The host learns the sums, and whether any loss was NaN/inf (the sum is then non-finite
    too), only at `tally`.
    """

    def __init__(self) -> None:
        self._sums: torch.Tensor | None = None  # (2,) fp64 on the device: loss sum, correct
        self.examples = 0
        self.batches = 0

    def add(self, loss: torch.Tensor, correct: torch.Tensor, batch_size: int) -> None:
        both = torch.stack((loss.detach().to(torch.float64), correct.to(torch.float64)))
        self._sums = both if self._sums is None else self._sums.add_(both)
        self.examples += batch_size
        self.batches += 1

    def tally(
        self, votes: Sequence[bool] = (), reset: bool = True, shared: Sequence[float] = ()
    ) -> Tally:
        """Sum the window over every rank, with `votes` (one flag per question, e.g. "stop?")
        and `shared` (numbers, e.g. the main rank's clock), in one all-reduce; then start a new
        window if `reset`. Every rank must call it at the same step: it is a collective. The one
        device→host read of the window."""
        sums = self._sums if self._sums is not None else torch.zeros(2, dtype=torch.float64)
        if dist.is_initialized():
            sums = sums.to(_reduce_device())
        host = [self.examples, self.batches, *votes, *shared]
        totals = torch.cat((sums, torch.tensor(host, dtype=torch.float64, device=sums.device)))
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(totals)
        loss_sum, correct, examples, batches, *rest = totals.tolist()
        counts, summed = rest[: len(votes)], rest[len(votes) :]
        if reset:
            self._sums, self.examples, self.batches = None, 0, 0
        return Tally(
            loss_sum / max(batches, 1),
            correct / max(examples, 1),
            tuple(map(int, counts)),
            tuple(summed),
        )


def _reduce_device() -> torch.device:
    # NCCL reduces CUDA tensors only; gloo reduces CPU tensors.
    return torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_over_ranks(count: int) -> int:
    """The sum of an integer count over every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return count
    value = torch.tensor([count], dtype=torch.int64, device=_reduce_device())
    dist.all_reduce(value)
    return int(value.item())


def replica_report(model: torch.nn.Module, shards: list[str]) -> tuple[bool, list[list[str]]]:
    """(whether every rank holds bit-identical weights, the shards each rank read).

    Data-parallel replicas must stay identical; a mismatch means a rank diverged (a collective
    skipped, a non-deterministic op). Cheap: one hash per rank, gathered once at the end.
    """
    digest = hashlib.sha256()
    for tensor in model.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    mine = (digest.hexdigest(), list(shards))
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return True, [mine[1]]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return len({g[0] for g in gathered}) == 1, [g[1] for g in gathered]
