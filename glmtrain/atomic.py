"""Crash-safe file writes, used for everything glmtrain writes that a later run reads back.

The data goes to ``.<name>.tmp-<pid>`` in the target directory, is flushed and fsync'ed, and is
renamed onto the final name only when complete; on any error (a crash is the same as far as the
final name is concerned, and a full disk raises) the temporary file is removed and an existing file
of that name is left exactly as it was.  Leftovers of killed processes match ``.*.tmp-*``.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


@contextmanager
def atomic_write(path: str | os.PathLike, sync_dir: bool = False) -> Iterator[BinaryIO]:
    """``with atomic_write(p) as f: f.write(...)`` -- ``p`` appears complete or not at all."""
    path = Path(path)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync_dir:  # make the rename itself durable (checkpoints)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
