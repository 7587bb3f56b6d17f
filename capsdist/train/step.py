"""One optimisation micro-step, and the running statistics the loop reports."""

from __future__ import annotations

import hashlib
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


@dataclass
class WindowStats:
    """Loss and accuracy summed since the last report; averaged over ranks when read."""

    loss_sum: float = 0.0
    correct: int = 0
    examples: int = 0
    batches: int = 0

    def add(self, loss: torch.Tensor, correct: torch.Tensor, batch_size: int) -> None:
        self.loss_sum += float(loss)
        self.correct += int(correct)
        self.examples += batch_size
        self.batches += 1

    def reduce(self) -> tuple[float, float]:
        """(mean loss, accuracy) over every rank's window, then reset the window."""
        totals = torch.tensor(
            [self.loss_sum, self.correct, self.examples, self.batches], dtype=torch.float64
        )
        if dist.is_initialized():
            totals = totals.to(_reduce_device())
            dist.all_reduce(totals)
        loss_sum, correct, examples, batches = totals.tolist()
        self.loss_sum, self.correct, self.examples, self.batches = 0.0, 0, 0, 0
        return loss_sum / max(batches, 1), correct / max(examples, 1)


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


def max_over_ranks(value: int) -> int:
    """The largest of an integer over every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.int64, device=_reduce_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())


def any_rank(flag: bool) -> bool:
    """True on every rank if the flag is set on any rank (stop decisions must agree)."""
    return bool(max_over_ranks(int(flag)))


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
