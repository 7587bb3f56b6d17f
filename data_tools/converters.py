"""`capsdist data mnist | fashion-mnist | cifar10 | smallnorb | affnist`: raw files → shards.

Every converter is one `Converter` entry of `CONVERTERS`: where its files are downloaded from
(with their md5s), which files make each split, the reader of their format, the image shape
and classes. One function, `convert`, does the rest for all of them: find the source (--src, a
default folder, or a download), unpack an archive, read each split, check it against the
entry, and write shards + meta.json.

Checksums are the published ones (MNIST, Fashion-MNIST, CIFAR-10: the md5s on the data sets'
pages, also in torchvision's sources; smallNORB: the md5s listed by the `disent` library).
affNIST publishes none: its files are fetched unchecked and say so (`md5=None`), and
meta.json records what was read.
"""

from __future__ import annotations

import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capsdist.data.urls import is_remote, local
from data_tools import formats
from data_tools.destination import DataToolError, check_out_folder, download_dir
from data_tools.download import Source, download_files, safe_extract
from data_tools.shards import write_array_dataset


@dataclass(frozen=True)
class Converter:
    """What one raw data set is; `convert` turns it into shards."""

    dataset: str
    """Name in meta.json (`fashion_mnist`); the command is the same with `-` (`fashion-mnist`)."""
    help: str
    """One line for `capsdist data --help`."""
    src_help: str
    """What --src may be."""
    splits: dict[str, tuple[str, ...]]
    """Split name → the files (or file stems) `read` needs for it, in meta.json's split order."""
    read: Callable[[Path, tuple[str, ...]], formats.Split]
    """(source folder or file, a split's files) → (uint8 images (N, H, W, C), labels (N,))."""
    image_shape: tuple[int, int, int]
    """(H, W, C) of every image as the shards hold it."""
    num_classes: int
    sources: tuple[Source, ...]
    """The files to download when there is no --src."""
    source_note: str
    """meta.json's `source`, with `{src}` the resolved source path."""
    default_src: str | None = None
    """A folder used when --src is omitted, if it exists (before downloading)."""
    archive: str | None = None
    """Glob of the archive to unpack when a --src folder holds it rather than `extracted`."""
    extracted: str | None = None
    """Glob (below --src) that shows the files are already unpacked."""
    extra_meta: dict[str, Any] = field(default_factory=dict)


_DOWNLOAD = "; omitted: download from the official location, checksums verified"
_MNIST = "https://ossci-datasets.s3.amazonaws.com/mnist/"  # yann.lecun.com refuses scripts
_FASHION = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
_NORB = "https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/smallnorb-"
_NORB_TRAIN = "5x46789x9x18x6x2x96x96-training-{}.mat"
_NORB_TEST = "5x01235x9x18x6x2x96x96-testing-{}.mat"
# split → (images stem, labels stem); each may be spelled with `.idx` and end in `.gz`.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_SRC = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist


def _idx_sources(base: str, md5s: tuple[str, str, str, str]) -> tuple[Source, ...]:
    stems = [stem for files in IDX_FILES.values() for stem in files]
    return tuple(Source(f"{base}{stem}.gz", md5) for stem, md5 in zip(stems, md5s, strict=True))


CONVERTERS: dict[str, Converter] = {
    c.dataset: c
    for c in (
        Converter(
            dataset="mnist",
            help="MNIST IDX files (plain or .gz) → shards",
            src_help="folder with the four MNIST IDX files" + _DOWNLOAD,
            splits=IDX_FILES,
            read=formats.read_idx_split,
            image_shape=(28, 28, 1),
            num_classes=10,
            sources=_idx_sources(
                _MNIST,
                (
                    "f68b3c2dcbeaaa9fbdd348bbdeb94873",
                    "d53e105ee54ea40749a09fcbcd1e9432",
                    "9fb629c4189551a2d022fa330f9573f3",
                    "ec29112dd5afa0611ce80d1b7f02629c",
                ),
            ),
            source_note="IDX files in {src}",
        ),
        # Fashion-MNIST ships in exactly MNIST's format and file names.
        Converter(
            dataset="fashion_mnist",
            help="Fashion-MNIST IDX files → shards",
            src_help=f"folder with the four IDX files (default {FASHION_MNIST_SRC}, Debian's "
            f"dataset-fashion-mnist, if it exists{_DOWNLOAD})",
            splits=IDX_FILES,
            read=formats.read_idx_split,
            image_shape=(28, 28, 1),
            num_classes=10,
            sources=_idx_sources(
                _FASHION,
                (
                    "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
                    "25c81989df183df01b3e8a0aad5dffbe",
                    "bef4ecab320f06d8554ea6380940ec79",
                    "bb300cfdad3c16e7a12a480ee83cd310",
                ),
            ),
            source_note="IDX files in {src}",
            default_src=FASHION_MNIST_SRC,
        ),
        # Full 32x32x3 images; the 24x24 crops are the reader's job (configs/cifar10.yaml).
        Converter(
            dataset="cifar10",
            help="CIFAR-10 (binary or python version) → 32x32x3 shards",
            src_help="cifar-10-*.tar.gz or its extracted folder" + _DOWNLOAD,
            splits={
                "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
                "test": ("test_batch",),
            },
            read=formats.read_cifar_split,
            image_shape=(32, 32, 3),
            num_classes=10,
            sources=(
                Source(
                    "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
                    "c32a1d4ab5d03f1284b67883e8d87530",
                ),
            ),
            source_note="CIFAR-10 from {src}",
            archive="cifar-10-*.tar.gz",
            extracted="**/data_batch_1*",
        ),
        # 96x96 stereo pairs → 48x48x2; the 32x32 crops are the reader's (configs/smallnorb.yaml).
        Converter(
            dataset="smallnorb",
            help="smallNORB -dat/-cat .mat files → 48x48x2 shards",
            src_help="folder with smallNORB's training/testing -dat and -cat files (plain or .gz)"
            + _DOWNLOAD,
            splits={
                "train": tuple("smallnorb-" + _NORB_TRAIN.format(k) for k in ("dat", "cat")),
                "test": tuple("smallnorb-" + _NORB_TEST.format(k) for k in ("dat", "cat")),
            },
            read=formats.read_norb_split,
            image_shape=(48, 48, 2),
            num_classes=5,
            sources=(
                Source(
                    _NORB + _NORB_TRAIN.format("dat") + ".gz", "66054832f9accfe74a0f4c36a75bc0a2"
                ),
                Source(
                    _NORB + _NORB_TRAIN.format("cat") + ".gz", "23c8b86101fbf0904a000b43d3ed2fd9"
                ),
                Source(
                    _NORB + _NORB_TEST.format("dat") + ".gz", "e4ad715691ed5a3a5f138751a4ceb071"
                ),
                Source(
                    _NORB + _NORB_TEST.format("cat") + ".gz", "5aa791cd7e6016cf957ce9bdb93b8603"
                ),
            ),
            source_note="smallNORB files in {src}",
            extra_meta={"downsampled": "2x2 mean"},
        ),
        # affNIST's transformed test set only: the training set of that experiment is expanded
        # MNIST (`capsdist data expanded-mnist`).
        Converter(
            dataset="affnist",
            help="affNIST's transformed test set (.mat) → 40x40 shards",
            src_help="test.mat, test.mat.zip or a folder of affNIST .mat batches"
            + _DOWNLOAD
            + " (affNIST publishes no checksum)",
            splits={"test": ("test.mat",)},
            read=formats.read_affnist_split,
            image_shape=(40, 40, 1),
            num_classes=10,
            # No checksum is published for affNIST (none found on its page or in public loaders).
            sources=(
                Source(
                    "https://www.cs.toronto.edu/~tijmen/affNIST/32x/transformed/test.mat.zip", None
                ),
            ),
            source_note="affNIST from {src}",
            archive="test.mat.zip",
            extracted="**/*.mat",
        ),
    )
}


def resolve_src(
    spec: Converter, src: str | Path | None, out: str, mirror: str | None, progress: bool
) -> Path:
    """`src` if given; else `spec.default_src` if it exists; else download (`download_dir`).
    A folder that holds `spec.archive` but not its unpacked files becomes that archive."""
    if src:
        src = Path(src)
        if not src.exists():
            raise DataToolError(f"{src}: --src does not exist")
    elif spec.default_src and Path(spec.default_src).exists():
        src = Path(spec.default_src)
    else:
        check_out_folder(out, spec.dataset)  # before a long download, not after
        folder = download_dir(out, spec.dataset)
        src = download_files(spec.sources, folder, mirror=mirror, progress=progress)
    if spec.archive and src.is_dir() and not any(src.glob(spec.extracted)):
        src = next(iter(sorted(src.glob(spec.archive))), src)
    return src


def convert(
    dataset: str,
    src: str | Path | None,
    out: str | Path,
    *,
    samples_per_shard: int = 1000,
    mirror: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Convert `CONVERTERS[dataset]` from `src` (None: default folder or download, from
    `mirror` + file name if given) into shards + meta.json in `out` (a folder or an object
    store URL); returns the summary."""
    spec, out = CONVERTERS[dataset], local(out)
    src = resolve_src(spec, src, out, mirror, progress)
    scratch = None
    try:
        root = src
        if spec.archive and src.is_file() and (zipfile.is_zipfile(src) or tarfile.is_tarfile(src)):
            # Unpacked beside the shards (same disk, room already needed); a URL: the temp dir.
            work = None if is_remote(out) else Path(out)
            if work is not None:
                work.mkdir(parents=True, exist_ok=True)
            scratch = Path(tempfile.mkdtemp(prefix=".extract-", dir=work))
            root = safe_extract(src, scratch)
        splits = {split: spec.read(root, files) for split, files in spec.splits.items()}
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    for split, (images, labels) in splits.items():
        if images.shape[1:] != spec.image_shape:
            raise DataToolError(
                f"{src}: {split} images are {'x'.join(map(str, images.shape[1:]))}, "
                f"{dataset} is {'x'.join(map(str, spec.image_shape))}"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= spec.num_classes):
            raise DataToolError(
                f"{src}: {split} labels span {labels.min()}-{labels.max()}, "
                f"{dataset} has 0-{spec.num_classes - 1}"
            )
    return write_array_dataset(
        out,
        dataset=dataset,
        splits=splits,
        num_classes=spec.num_classes,
        samples_per_shard=samples_per_shard,
        extra_meta={"source": spec.source_note.format(src=src.resolve()), **spec.extra_meta},
        progress=progress,
    )


# The Python API, one entry per table row; `options` are those of `convert` (samples_per_shard,
# mirror, progress). `capsdist data NAME` calls `convert` directly.
def make_mnist(src: str | Path | None, out: str | Path, **options: Any) -> dict[str, Any]:
    """The four MNIST IDX files in `src` (None: download them) → `mnist` shards in `out`."""
    return convert("mnist", src, out, **options)


def make_fashion_mnist(src: str | Path | None, out: str | Path, **options: Any) -> dict[str, Any]:
    """Fashion-MNIST's IDX files in `src` (default: Debian's folder, else download)."""
    return convert("fashion_mnist", src, out, **options)


def make_cifar10(src: str | Path | None, out: str | Path, **options: Any) -> dict[str, Any]:
    """CIFAR-10 from `src` (.tar.gz of either version, or its extracted folder; None: download
    the binary version) → `cifar10` shards (50,000 / 10,000, 32x32x3) in `out`."""
    return convert("cifar10", src, out, **options)


def make_smallnorb(src: str | Path | None, out: str | Path, **options: Any) -> dict[str, Any]:
    """smallNORB's -dat/-cat files in `src` (plain or .gz; None: download) → `smallnorb`
    shards, 48x48x2 (24,300 train / 24,300 test), in `out`."""
    return convert("smallnorb", src, out, **options)


def make_affnist(src: str | Path | None, out: str | Path, **options: Any) -> dict[str, Any]:
    """affNIST's transformed test set (`src`: .mat, .mat.zip or folder; None: download) →
    `affnist` shards with one `test` split."""
    return convert("affnist", src, out, **options)
