"""Writing files so that a crash or a bad input never leaves a half-written one behind."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

# peft's file names: tools that look for an adapter folder find ours.
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


def apply_umask_mode(path: str | os.PathLike) -> None:
    """Give a temporary file or folder the mode a plain ``open``/``mkdir`` would have.

    ``tempfile`` makes them private (0600/0700) and ``os.replace`` keeps that mode, so without
    this an adapter or model saved atomically could not be read by another user or a serving
    container running under another uid.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Write through a temporary file in the same folder, then rename over ``path``."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        apply_umask_mode(tmp)  # after writing: a writer may replace the file it was given
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
