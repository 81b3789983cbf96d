"""Files replaced atomically: a crash, a kill or an exception mid-write never leaves half a file.

Standard library only, below every part (``tests/test_package.py``): the scan cache
(``data/scan.py``), model checkpoints (``models/checkpoints.py``) and training files
(``engine/``) are all written through :func:`atomic_write`.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write"]


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], object]) -> Path:
    """Call ``write(temporary_path)`` and move the result to ``path`` atomically; return ``path``.

    The temporary file lies in ``path``'s folder, which must exist, so the move is a rename
    within one filesystem. Once ``write`` returns, the file is fsynced (its bytes reach the
    disk before the name points at them), renamed over ``path`` with ``os.replace`` (atomic on
    POSIX and Windows), and the folder is fsynced (so the rename reaches the disk too). On any
    exception, KeyboardInterrupt included, the temporary file is removed and ``path`` is left
    as it was. The temporary name starts with a dot, so it is never taken for a result, and
    keeps ``path``'s suffix, so writers that choose the format by suffix still work.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}{path.suffix}")
    try:
        write(temporary)
        os.chmod(temporary, _new_file_mode())  # some writers create private (0600) files
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


def _new_file_mode() -> int:
    """The mode a new file gets under this process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _fsync_folder(folder: Path) -> None:
    # Windows cannot open folders, where this is moot.
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
