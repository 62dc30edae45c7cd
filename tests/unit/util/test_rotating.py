import os
import stat

import pytest

from safesquid_tw.util.rotating import RotatingFile


def names(directory):
    return sorted(os.listdir(directory))


def test_creates_directory_and_file_with_mode(tmp_path):
    f = RotatingFile(str(tmp_path / "logs" / "x.log"), rotate_bytes=100, keep=2)
    f.write(b"hello\n")
    f.close()
    path = tmp_path / "logs" / "x.log"
    assert path.read_bytes() == b"hello\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_rotates_before_a_write_that_would_cross_the_limit(tmp_path):
    path = str(tmp_path / "x.log")
    f = RotatingFile(path, rotate_bytes=10, keep=3)
    for chunk in (b"aaaa\n", b"bbbb\n", b"cccc\n", b"dddd\n", b"eeee\n"):
        f.write(chunk)
    f.close()
    assert open(path, "rb").read() == b"eeee\n"
    assert open(path + ".1", "rb").read() == b"cccc\ndddd\n"
    assert open(path + ".2", "rb").read() == b"aaaa\nbbbb\n"
    assert names(tmp_path) == ["x.log", "x.log.1", "x.log.2"]


def test_keeps_only_n_rotated_files(tmp_path):
    path = str(tmp_path / "x.log")
    f = RotatingFile(path, rotate_bytes=5, keep=2)
    for i in range(10):
        f.write(b"%04d\n" % i)
    f.close()
    assert names(tmp_path) == ["x.log", "x.log.1", "x.log.2"]
    assert [open(p, "rb").read() for p in (path + ".2", path + ".1", path)] == [b"0007\n", b"0008\n", b"0009\n"]


def test_keep_zero_keeps_only_the_current_file(tmp_path):
    path = str(tmp_path / "x.log")
    f = RotatingFile(path, rotate_bytes=5, keep=0)
    for i in range(3):
        f.write(b"%04d\n" % i)
    f.close()
    assert names(tmp_path) == ["x.log"]


def test_removes_files_beyond_a_smaller_keep(tmp_path):
    path = str(tmp_path / "x.log")
    for suffix in ("", ".1", ".2", ".3", ".4"):
        (tmp_path / f"x.log{suffix}").write_bytes(b"old\n")
    f = RotatingFile(path, rotate_bytes=5, keep=2)
    f.write(b"new!\n")
    f.close()
    assert names(tmp_path) == ["x.log", "x.log.1", "x.log.2"]


def test_appends_to_an_existing_file_and_counts_its_size(tmp_path):
    path = tmp_path / "x.log"
    path.write_bytes(b"12345678")
    f = RotatingFile(str(path), rotate_bytes=10, keep=1)
    f.write(b"9")
    assert path.read_bytes() == b"123456789"
    f.write(b"ab")  # would make 11 bytes: rotate first
    f.close()
    assert path.read_bytes() == b"ab"


def test_a_write_larger_than_the_limit_goes_whole_into_a_fresh_file(tmp_path):
    path = tmp_path / "x.log"
    f = RotatingFile(str(path), rotate_bytes=4, keep=1)
    f.write(b"ab")
    f.write(b"0123456789")
    f.close()
    assert path.read_bytes() == b"0123456789"


@pytest.mark.parametrize("rotate_bytes, keep", [(0, 1), (-5, 1), (10, -1)])
def test_rejects_bad_settings(tmp_path, rotate_bytes, keep):
    with pytest.raises(ValueError):
        RotatingFile(str(tmp_path / "x"), rotate_bytes=rotate_bytes, keep=keep)
