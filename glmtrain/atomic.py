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


class _Recorded:
    """A file whose write errors are remembered: torch.save turns a failed write (a full disk) into a
    RuntimeError about zip-file positions; the OSError under it is what the user needs to see."""

    def __init__(self, f):
        self._f, self.error = f, None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name):
        return getattr(self._f, name)


@contextmanager
def atomic_write(path: str | os.PathLike, sync_dir: bool = False) -> Iterator[BinaryIO]:
    """``with atomic_write(p) as f: f.write(...)`` -- ``p`` appears complete or not at all.  A failure of
    the file system (full disk, quota, read-only) is raised as an OSError naming ``p``."""
    path = Path(path)
    tmp = temporary_name(path)
    f = None
    try:
        with open(tmp, "wb") as raw:
            f = _Recorded(raw)
            yield f
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        cause = e if isinstance(e, OSError) else (f.error if f is not None else None)
        if cause is not None and (cause is not e or e.filename is None):
            raise OSError(cause.errno, cause.strerror, str(path)) from e
        raise
    if sync_dir:  # make the rename itself durable (checkpoints)
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
