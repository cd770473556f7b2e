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
