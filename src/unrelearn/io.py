"""Atomic outputs: a run either leaves a complete folder/file or nothing."""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

from unrelearn.errors import UnrelearnError


def ensure_writable_parent(path: Path) -> None:
    """Fail early, before any work, if ``path`` cannot be created."""
    parent = path.resolve().parent
    probe_from = parent
    while not probe_from.exists():
        probe_from = probe_from.parent
    if not probe_from.is_dir():
        raise UnrelearnError(f"cannot write to {str(path)!r}: {str(probe_from)!r} is a file, not a folder")
    if path.exists() and not path.is_dir():
        raise UnrelearnError(f"cannot write to {str(path)!r}: a file of that name exists")
    # os.access says yes to root even on read-only mounts; creating something is the real test.
    try:
        shutil.rmtree(tempfile.mkdtemp(prefix=".unrelearn-probe-", dir=probe_from))
    except OSError as error:
        raise UnrelearnError(f"cannot write to {str(path)!r}: {str(probe_from)!r} is not writable ({error.strerror})") from None


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces ``path``, on error it vanishes."""
    path = Path(path)
    ensure_writable_parent(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would hide a shared model folder from other users
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
        os.replace(path, old / path.name)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to a unique sibling, then rename: readers and concurrent writers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def library_versions() -> dict[str, str]:
    """Versions of everything that can change a result, for run records."""
    versions = {"python": platform.python_version()}
    for package in ("unrelearn", "torch", "diffusers", "transformers", "peft", "torchmetrics", "safetensors", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions
