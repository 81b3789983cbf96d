"""nai_fast.files.atomic_write: the one way the package replaces a file."""

import os
import stat
from pathlib import Path

import pytest

from nai_fast import files


def test_a_write_replaces_the_file_and_reaches_the_disk_with_its_folder(tmp_path, monkeypatch):
    target = tmp_path / "weights.safetensors"
    target.write_bytes(b"old")
    synced, seen = [], []
    real_fsync = os.fsync

    def fsync(descriptor: int) -> None:
        synced.append(os.fstat(descriptor).st_mode)
        real_fsync(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)

    def write(temporary: Path) -> None:
        seen.append(temporary)
        temporary.write_bytes(b"new")
        os.chmod(temporary, 0o600)  # as mkstemp-style writers do

    assert files.atomic_write(target, write) == target
    assert target.read_bytes() == b"new"
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".") and seen[0].suffix == ".safetensors"
    assert [stat.S_ISREG(mode) for mode in synced] == [True, False]  # the file, then its folder
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_a_failed_or_interrupted_write_leaves_the_old_file_and_no_temporary(tmp_path, error):
    target = tmp_path / "state.pt"
    target.write_bytes(b"old")

    def fail_half_way(temporary: Path) -> None:
        temporary.write_bytes(b"partial")
        raise error

    with pytest.raises(type(error)):
        files.atomic_write(target, fail_half_way)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


def test_every_atomic_write_in_the_package_is_this_one():
    from nai_fast.data import scan
    from nai_fast.engine import train, train_state
    from nai_fast.models import checkpoints

    for module in (scan, checkpoints, train_state, train):
        assert module.atomic_write is files.atomic_write, module.__name__
