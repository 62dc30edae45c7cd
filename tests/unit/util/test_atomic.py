import os
import stat

import pytest

from safesquid_tw.util import atomic
from safesquid_tw.util.atomic import atomic_write


def test_writes_content_with_mode_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "policy.json"
    atomic_write(target, b'{"a": 1}', mode=0o640)
    assert target.read_bytes() == b'{"a": 1}'
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    assert os.listdir(tmp_path) == ["policy.json"]


def test_default_mode_is_owner_only_even_with_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        atomic_write(str(tmp_path / "key"), b"secret")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "key").stat().st_mode) == 0o600


def test_replaces_existing_content(tmp_path):
    target = tmp_path / "cache"
    target.write_bytes(b"old content that is longer")
    atomic_write(target, b"new")
    assert target.read_bytes() == b"new"


def test_failed_replace_keeps_old_content_and_removes_temporary(tmp_path, monkeypatch):
    target = tmp_path / "cache"
    target.write_bytes(b"old")

    def failing_replace(src, dst):
        raise OSError("disk on fire")

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk on fire"):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["cache"]


def test_data_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    atomic_write(tmp_path / "f", b"x")
    assert calls == ["fsync", "replace", "fsync"]  # file, rename, directory
