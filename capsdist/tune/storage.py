"""Where Ray keeps a run's state: one rule for Ray Train runs (`LAUNCHER=ray`) and Ray Tune
sweeps (`capsdist sweep`).

With `ray.storage_path` set, a run's Ray folder is `<ray.storage_path>/<name>`: the name is
run.dir's last component for a training run, the sweep's name for a sweep, the trial's id for a
multi-worker trial. Without it, the folder is `ray/` inside run.dir (or the sweep directory).

Ray Train and Tune require that every node of a multi-node cluster reads and writes that folder
(they check with a marker file): a shared file system, or a URL such as `s3://bucket/prefix`.
URLs go to pyarrow, which takes the endpoint and credentials from the standard AWS variables
(`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, ...; instance roles work too). The driver resolves the
endpoint and hands it to the workers; the credentials come from each node's own environment.
"""

from __future__ import annotations

from pathlib import Path

from capsdist.errors import UserError

LOCAL_NAME = "ray"  # the folder inside run.dir (or the sweep directory) without a storage_path


class StorageError(UserError, RuntimeError):
    """ray.storage_path cannot be used; the message names it and what to check."""


def is_url(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def ray_storage(configured: str, local_dir: str | Path, name: str) -> tuple[str, str]:
    """(storage_path, name) for Ray's RunConfig. `configured` is ray.storage_path (a URL is kept
    as written, a folder made absolute: Ray runs workers in directories of their own);
    `local_dir` is run.dir (or the sweep directory), used when `configured` is empty."""
    if not configured:
        return str(Path(local_dir).absolute()), LOCAL_NAME
    if is_url(configured):
        return configured.rstrip("/"), name
    return str(Path(configured.removeprefix("file://")).absolute()), name


def experiment_path(storage_path: str, name: str) -> str:
    """The folder or URL of one run's Ray state (what `Tuner.can_restore` looks at)."""
    return f"{storage_path}/{name}" if is_url(storage_path) else str(Path(storage_path) / name)


def check_storage(storage_path: str) -> None:
    """Fail early, naming ray.storage_path, when the driver cannot create the storage folder
    (Ray's own check fails later, less clearly). Each node's access is checked by Ray itself."""
    import pyarrow.fs

    try:
        filesystem, path = pyarrow.fs.FileSystem.from_uri(storage_path)
    except ValueError as err:  # pyarrow.ArrowInvalid: a scheme pyarrow does not know
        raise StorageError(
            f"ray.storage_path={storage_path}: not a location Ray can use ({err}); use a folder "
            "every node sees, or a URL such as s3://bucket/prefix"
        ) from err
    except OSError as err:  # S3: the bucket's region could not be found out
        raise _cannot_write(storage_path, err) from err
    try:
        filesystem.create_dir(path, recursive=True)
    except OSError as err:
        raise _cannot_write(storage_path, err) from err


def _cannot_write(storage_path: str, err: OSError) -> StorageError:
    hint = (
        "check the bucket exists, AWS_ENDPOINT_URL (for an S3-compatible server) and the "
        "credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an instance role)"
        if storage_path.startswith("s3://")
        else "check the location exists and can be written"
    )
    first_line = (str(err).splitlines() or [type(err).__name__])[0]
    return StorageError(
        f"ray.storage_path={storage_path}: cannot write there ({first_line}); {hint}"
    )
