"""Atomic outputs: a run either leaves a complete folder/file or nothing."""

from __future__ import annotations

import fcntl
import glob
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from unrelearn.errors import UnrelearnError

if TYPE_CHECKING:  # torch is imported where it is used: the CLI's error paths stay fast
    import torch


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
    """Yield a temporary sibling folder; on success it replaces ``path``, on error it vanishes.

    Everything inside gets the modes the umask gives new files (safetensors writes 0600, which
    would hide a model shared on a cluster from the group).
    """
    path = Path(path)
    ensure_writable_parent(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        apply_umask(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, path)


def apply_umask(folder: Path) -> None:
    """Give ``folder`` and everything under it the modes the umask gives new files and folders."""
    umask = _umask()
    os.chmod(folder, 0o777 & ~umask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~umask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~umask)


def replace_directory(source: Path, target: Path) -> None:
    """Move the finished folder ``source`` to ``target``, replacing what was there."""
    if target.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, old / target.name)
        os.replace(source, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(source, target)


class OutputBusy(UnrelearnError):
    """Another process holds the output lock."""


@contextmanager
def output_lock(path: str | Path, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on writing ``path`` (and its checkpoints) for the duration of a run.

    A second run into the same output fails at once (:class:`OutputBusy`) instead of
    interleaving checkpoints with the first, or with ``wait`` waits for the first to finish. The
    lock is an flock on a hidden sibling file, so the system drops it when a run is killed; the
    file is removed when the run ends.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = path.with_name(f".{path.name}.lock")
    while True:
        handle = open(lock_path, "a+")  # noqa: SIM115 - held open for the lock's lifetime
        try:
            fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "unknown"
            handle.close()
            raise OutputBusy(
                f"another unrelearn run is writing {str(path)!r} (pid {owner}); wait for it to finish or choose another output"
            ) from None
        # A run that just finished may have removed the file we locked; lock the file that is there now.
        try:
            same = os.fstat(handle.fileno()).st_ino == os.stat(lock_path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()
    try:
        handle.truncate(0)
        handle.write(str(os.getpid()))
        handle.flush()
        recover_interrupted_writes(path)
        recover_interrupted_writes(path.with_name(f"{path.name}.checkpoint"))
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        handle.close()


def recover_interrupted_writes(path: Path) -> None:
    """Undo what a run killed inside :func:`atomic_directory` left beside ``path``.

    Called with the output lock held, so no other run is writing there: a half-written
    ``.NAME.tmp-*`` folder is removed, and a ``NAME`` moved aside to ``.NAME.old-*`` just before
    the kill is put back when no new one took its place.
    """
    for old in sorted(path.parent.glob(f".{glob.escape(path.name)}.old-*")):
        if (old / path.name).exists() and not path.exists():
            os.replace(old / path.name, path)
        shutil.rmtree(old, ignore_errors=True)
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.tmp-*"):
        shutil.rmtree(tmp, ignore_errors=True)


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


def merge_json_rows(path: str | Path, ours: dict[str, list[dict]], keys: dict[str, tuple[str, ...]], extra: dict) -> dict:
    """Merge ``ours`` into the JSON file at ``path`` under a blocking lock and return the result.

    For each list name in ``keys``, rows already in the file are kept and ours replace those with
    the same key fields, so several processes filling one table lose none of each other's rows.
    ``extra`` entries (command, versions) are overwritten.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merged = json.loads(path.read_text()) if path.is_file() else {}
        for name, fields in keys.items():
            rows = {tuple(row.get(f) for f in fields): row for row in merged.get(name, [])}
            rows |= {tuple(row.get(f) for f in fields): row for row in ours.get(name, [])}
            merged[name] = list(rows.values())
        merged |= extra
        write_json_atomic(path, merged)
    return merged


def command_legend(rows: list[dict]) -> tuple[list[str], dict[str | None, str]]:
    """Markdown lines numbering the distinct ``"command"`` of ``rows``, and each command's mark
    for a "made by" column, so a table merged from several runs names the run of every row
    (rows written before rows carried their command get "-")."""
    commands = list(dict.fromkeys(row["command"] for row in rows if row.get("command")))
    marks: dict[str | None, str] = {None: "-"} | {command: str(n) for n, command in enumerate(commands, 1)}
    lines = ["Made by (the last column of each row):", ""] + [f"{n}. `{c}`" for n, c in enumerate(commands, 1)]
    if any(not row.get("command") for row in rows):
        lines.append("- rows marked - predate per-row commands; the README gives them beside their tables")
    return lines + [""], marks


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


def uint8_pixels(images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] as the 8-bit values an image file holds (rounded, on the CPU, same layout)."""
    import torch

    return (images.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
