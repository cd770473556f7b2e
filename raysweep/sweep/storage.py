"""Where a sweep's files live: local paths or ``s3://…`` URIs (through ``pyarrow.fs``).

Standard library only (``pyarrow`` is imported when a remote path is used)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def is_remote(path: str) -> bool:
    """``s3://…``, ``gs://…``: anything with a scheme (a local path has none)."""
    return "://" in str(path)


def _remote(path: str):
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(path)


def write_json(path: str, data: Any, mkdir: bool = False) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n", mkdir)


def write_text(path: str, text: str, mkdir: bool = False) -> None:
    if is_remote(path):
        fs, inner = _remote(path)
        if mkdir:
            fs.create_dir(inner.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(inner) as f:
            f.write(text.encode())
    else:
        if mkdir:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)


def read_json(path: str) -> Any:
    """The parsed file, or None if it does not exist."""
    try:
        if is_remote(path):
            fs, inner = _remote(path)
            with fs.open_input_stream(inner) as f:
                return json.loads(f.readall().decode())
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, OSError):
        return None


def read_text(path: str | None, filesystem: Any = None) -> str | None:
    """The file's text (``filesystem``: a ``pyarrow.fs`` filesystem), or None if unreadable."""
    if not path:
        return None
    try:
        if filesystem is not None:
            with filesystem.open_input_stream(path) as f:
                return f.readall().decode("utf-8", "replace")
        return Path(path).read_text(errors="replace")
    except Exception:  # noqa: BLE001
        return None


def copy_into(files: list[Path], directory: str) -> None:
    """Copy local ``files`` into the remote ``directory`` (``s3://…``)."""
    fs, inner = _remote(directory)
    for file in files:
        with fs.open_output_stream(f"{inner.rstrip('/')}/{file.name}") as f:
            f.write(file.read_bytes())



LOCK_FILE = ".raysweep.lock"
_HELD: dict[str, int] = {}  # experiment directory -> the open, flock-ed lock file of this process


class ExperimentBusy(Exception):
    """Another live sweep holds the experiment directory's lock."""


def _try_lock(directory: Path) -> int | None:
    """The descriptor of ``directory/.raysweep.lock`` held with an exclusive ``flock``, or None
    when another process holds it. The kernel drops the lock when its process ends, however it
    ends, so a crashed or killed sweep never leaves a stale one."""
    import fcntl
    import os
    import socket

    fd = os.open(directory / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
    return fd


def claim_experiment(storage: str, name: str, *, rename: bool) -> str:
    """Claim ``storage/name`` for this process (an exclusive ``flock`` on its ``.raysweep.lock``,
    held until the process ends), so that two sweeps started together never share an experiment
    directory.

    ``rename``: the name was generated (``<experiment>-<timestamp>``); a directory another sweep
    holds, or one already holding an experiment, moves this sweep to ``<name>-2``, ``-3``, ...
    Otherwise (``--name``, ``--resume``) :class:`ExperimentBusy` when a live sweep holds it.
    Remote storage is not locked. Returns the name claimed."""
    import os

    if is_remote(storage):
        return name
    base, n = name, 1
    while True:
        directory = Path(storage) / name
        directory.mkdir(parents=True, exist_ok=True)
        fd = _try_lock(directory)
        if fd is not None and rename and any(directory.glob("experiment_state-*.json")):
            os.close(fd)  # an earlier sweep's experiment: not this new one's directory
            fd = None
        elif fd is None and not rename:
            holder = (directory / LOCK_FILE).read_text().strip() or "another process"
            raise ExperimentBusy(f"another sweep ({holder}) is running in {directory}")
        if fd is not None:
            _HELD[str(directory)] = fd
            return name
        n += 1
        name = f"{base}-{n}"


def release_experiment(storage: str, name: str) -> None:
    """Drop this process's lock on ``storage/name`` (the file stays; an unlocked file is free)."""
    import os

    fd = _HELD.pop(str(Path(storage) / name), None)
    if fd is not None:
        os.close(fd)
