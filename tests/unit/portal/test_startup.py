"""Restart with any pidfile (the pidfile twistd was given, removed only when it names us) and
the startup parameters "join a cluster" saves on a standalone node."""

from __future__ import annotations

import json
import os

import pytest

from safesquid_tw.portal.startup import StartupParamError, StartupParams, pidfile_from_argv, remove_own_pidfile


@pytest.mark.parametrize("argv, expected", [
    (["python", "twistd", "-n", "safesquid", "--role", "standalone"], "twistd.pid"),
    (["twistd", "--pidfile=/run/x.pid", "safesquid"], "/run/x.pid"),
    (["twistd", "--pidfile", "y.pid", "-n", "safesquid"], "y.pid"),
    (["twistd", "-n", "--pidfile=", "safesquid"], None),
    (["twistd", "safesquid", "--pidfile=not-twistds"], "twistd.pid"),
])
def test_the_pidfile_twistd_was_given(argv, expected):
    assert pidfile_from_argv(argv) == expected


def test_only_a_pidfile_naming_this_process_is_removed(tmp_path):
    mine, other = tmp_path / "mine.pid", tmp_path / "other.pid"
    mine.write_text(f"{os.getpid()}\n")
    other.write_text("1\n")
    assert remove_own_pidfile(["twistd", f"--pidfile={other}", "safesquid"]) is None
    assert other.exists()
    assert remove_own_pidfile(["twistd", f"--pidfile={mine}", "safesquid"]) == str(mine)
    assert not mine.exists()


def test_join_writes_a_private_key_file_and_slave_parameters(tmp_path):
    params = StartupParams(tmp_path)
    saved = params.join("10.0.0.1:8888", "the-key\nignored", node_name="gw7")
    assert saved["role"] == "slave" and saved["master"] == "10.0.0.1:8888" and saved["node_name"] == "gw7"
    key = tmp_path / "activation-key"
    assert key.read_text() == "the-key\n" and key.stat().st_mode & 0o077 == 0
    # Editing the slave's startup page later keeps what joining wrote.
    params.save({"listen": "tcp:3128", "portal": "", "master": "10.0.0.2:8888", "node_name": ""})
    again = json.loads((tmp_path / "startup.json").read_text())
    assert again["role"] == "slave" and again["activation_key_file"] == str(key) and again["master"] == "10.0.0.2:8888"


@pytest.mark.parametrize("master, key, field", [("nowhere", "k", "master"), ("10.0.0.1:8888", "  ", "activation_key")])
def test_join_refuses_what_would_not_start(tmp_path, master, key, field):
    with pytest.raises(StartupParamError) as e:
        StartupParams(tmp_path).join(master, key)
    assert e.value.field == field
    assert not (tmp_path / "startup.json").exists()
