"""The data position across a change of layout (issue 15): after any sequence of world sizes,
micro-batches and reader workers, every sample of an epoch is trained on once, but for less than
one global batch left out at a switch; with an unchanged layout, a resume continues each rank's
stream exactly. Real readers on real shards; no engine."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from capsdist.config import load_config
from capsdist.data import read_meta, read_split_arrays
from capsdist.train.data_position import (
    DataLayout,
    DataPosition,
    Streams,
    plan_resume,
    rank_batches,
)
from data_tools.synthetic import make_synthetic_shards

GLOBAL = 16  # train.batch_size; 256 samples = 16 global steps per epoch


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return make_setup(tmp_path_factory.mktemp("positions"), n_train=256, samples_per_shard=32)


def make_setup(root, n_train: int, samples_per_shard: int):
    """(config, meta, Counter of every training sample's key) of new synthetic shards."""
    make_synthetic_shards(root, n_train=n_train, n_test=16, samples_per_shard=samples_per_shard)
    overrides = [f"data.root={root}", f"train.batch_size={GLOBAL}", "data.shift_pixels=0"]
    cfg = load_config(["configs/debug_cpu.yaml"], [*overrides, "data.shuffle_buffer=40"])
    meta = read_meta(str(root))
    images, _ = read_split_arrays(root, "train", meta)
    every = Counter(key(torch.from_numpy(i).permute(2, 0, 1).float() / 255) for i in images)
    assert len(every) == n_train  # the noise makes every synthetic image unique
    return cfg, meta, every


def key(image: torch.Tensor) -> bytes:
    return (image * 255).round().to(torch.uint8).numpy().tobytes()


class Job:
    """One training job's readers, every rank of `layout`, resuming at `step` from `saved`."""

    def __init__(self, setup, layout: DataLayout, saved: DataPosition | None, step: int):
        cfg, meta, _ = setup
        self.layout, self.step = layout, step
        self.streams = [Streams(cfg, meta, torch.device("cpu")) for _ in range(layout.world_size)]
        saved = saved or DataPosition(layout)
        self.position, self.note = plan_resume(
            saved, step, layout, GLOBAL, self.streams[0].epoch_length
        )

    def run(self, steps: int) -> list[list[bytes]]:
        """Each rank's sample keys over `steps` global steps."""
        seen = []
        for rank, streams in enumerate(self.streams):
            batches = rank_batches(self.position, self.step, rank, GLOBAL, streams)
            mine = []
            for _ in range(steps * self.layout.accumulation(GLOBAL)):
                batch = next(batches)
                assert batch.images.shape[0] == self.layout.micro_batch
                mine += [key(image) for image in batch.images]
            batches.close()
            seen.append(mine)
        self.step += steps
        return seen


def flat(per_rank: list[list[bytes]]) -> list[bytes]:
    return [k for rank in per_rank for k in rank]


def test_world_size_changes_repeat_and_skip_nothing(setup):
    every = setup[2]
    two = DataLayout(2, 8, 0)
    one = DataLayout(1, 4, 2)  # another micro-batch and reader workers too
    first = Job(setup, two, None, 0)
    seen = flat(first.run(5))
    second = Job(setup, one, first.position, 5)
    assert "steps 5-15" in second.note and second.position.start_step == 16
    seen += flat(second.run(4))  # to step 9: the replay is in progress
    third = Job(setup, two, second.position, 9)  # 1 → 2 ranks again, mid-replay
    seen += flat(third.run(7))  # to the end of epoch 0
    assert Counter(seen) == every, "epoch 0 holds every sample once"
    assert Counter(flat(third.run(16))) == every, "and so does the next one"


def test_a_switch_leaves_out_less_than_one_global_batch(tmp_path):
    # 200 samples in 8 shards: 2 ranks × micro-batch 4 × accumulation 2 read 25 batches each
    # per epoch, so after 3 steps each rank has 19 batches (76 samples) left: 152 = 9 global
    # steps and 8 samples, which are left out.
    setup = make_setup(tmp_path, n_train=200, samples_per_shard=25)
    every = setup[2]
    first = Job(setup, DataLayout(2, 4, 0), None, 0)
    seen = flat(first.run(3))
    second = Job(setup, DataLayout(1, 16, 0), first.position, 3)
    assert second.position.start_step == 3 + 9 and "8 sample(s)" in second.note
    seen += flat(second.run(9))
    assert max(Counter(seen).values()) == 1, "nothing repeated"
    assert len(set(every) - set(seen)) == 8


def test_same_layout_resume_is_the_uninterrupted_stream(setup):
    layout = DataLayout(2, 8, 0)
    whole = Job(setup, layout, None, 0).run(20)  # across an epoch boundary
    first = Job(setup, layout, None, 0)
    part = first.run(7)
    again = Job(setup, layout, first.position, 7)
    assert again.note == "" and again.position == first.position
    rest = again.run(13)
    assert [p + r for p, r in zip(part, rest, strict=True)] == whole
