"""`twistd safesquid` options: contradictions are refused with one clear message, good
combinations become a NodeConfig."""

from __future__ import annotations

import json

import pytest
from twisted.python import usage

from safesquid_tw import tap
from safesquid_tw.config import Limits, NodeConfig

VALID_POLICY = {"format": "safesquid-policy/1", "access": {"default_action": "allow", "rules": []}}
INVALID_POLICY = {
    "format": "safesquid-policy/1",
    "access": {"default_action": "allow", "rules": [{"name": "bad-domain", "action": "deny", "domains": ["*."]}]},
}


def parse(argv: list[str]) -> NodeConfig:
    options = tap.Options()
    options.parseOptions(argv)
    return options.config


@pytest.fixture
def files(tmp_path):
    """Paths of helper files, made on demand: name -> path."""
    made = {
        "key": tmp_path / "activation.key",
        "empty-key": tmp_path / "empty.key",
        "short-key": tmp_path / "short.key",
        "good-policy": tmp_path / "good.json",
        "bad-policy": tmp_path / "bad.json",
        "not-json": tmp_path / "not-json.json",
        "missing": tmp_path / "does-not-exist.json",
    }
    made["key"].write_text("  s3cret-activation-key  \nsecond line ignored\n")
    made["empty-key"].write_text("\n")
    made["short-key"].write_text("fifteen-chars-k\n")
    made["good-policy"].write_text(json.dumps(VALID_POLICY))
    made["bad-policy"].write_text(json.dumps(INVALID_POLICY))
    made["not-json"].write_text("{ this is not json")
    return made


def expand(argv: list[str], files: dict) -> list[str]:
    return [str(files[a[1:]]) if a.startswith("@") else a for a in argv]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--role", "bogus"], "--role must be one of standalone, master, slave, not 'bogus'"),
        (["--role", "slave"], "a slave needs --master=HOST:PORT"),
        (["--master", "10.0.0.1:8888"], "--master is for slaves only"),
        (["--role", "master", "--master", "10.0.0.1:8888"], "--master is for slaves only"),
        (["--role", "slave", "--master", "10.0.0.1"], "--master: '10.0.0.1' is not HOST:PORT"),
        (["--role", "slave", "--master", "10.0.0.1:0"], "is not HOST:PORT"),
        (["--role", "slave", "--master", "10.0.0.1:65536"], "is not HOST:PORT"),
        (["--role", "slave", "--master", ":8888"], "is not HOST:PORT"),
        (["--role", "slave", "--master", "host:http"], "is not HOST:PORT"),
        (["--listen", "foo:bar"], "--listen: 'foo:bar' is not a server endpoint"),
        (["--listen", "tcp:notaport"], "--listen: 'tcp:notaport' is not a server endpoint"),
        (["--portal", "nonsense"], "--portal: 'nonsense' is not a server endpoint"),
        (["--role", "slave", "--master", "10.0.0.1:8888", "--listen", "foo:1"], "--listen:"),
        (["--head-timeout", "0"], "--head-timeout must be a positive number"),
        (["--idle-timeout", "-1"], "--idle-timeout must be a positive number"),
        (["--max-connections", "0"], "--max-connections must be a positive number"),
        (["--max-request-body", "-5"], "--max-request-body must be a positive number"),
        (["--tunnel-idle-timeout", "0"], "--tunnel-idle-timeout must be a positive number"),
        (["--max-connections", "many"], "--max-connections must be a whole number, not 'many'"),
        (["--head-timeout", "soon"], "--head-timeout must be a number, not 'soon'"),
        (["--max-connections", "1.5"], "--max-connections must be a whole number"),
        (["--activation-key-file", "@missing"], "--activation-key-file:"),
        (["--activation-key-file", "@empty-key"], "is empty"),
        (["--role", "slave", "--master", "m:1", "--activation-key-file", "@short-key"], "at least 16"),
        (["--role", "slave", "--master", "10.0.0.1:8888"], "a slave needs --activation-key-file=FILE"),
        (["--role", "slave", "--master", "10.0.0.1:8888", "--activation-key-file", "@missing"],
         "--activation-key-file:"),
        (["--master-fingerprint", "ab" * 32], "--master-fingerprint is for slaves only"),
        (["--role", "slave", "--master", "m:1", "--activation-key-file", "@key", "--master-fingerprint", "abc"],
         "--master-fingerprint: 'abc' is not a SHA-256 fingerprint"),
        (["--keepalive", "0"], "--keepalive must be a positive number"),
        (["--poll-interval", "-1"], "--poll-interval must be a positive number"),
        (["--drain-grace", "0"], "--drain-grace must be a positive number"),
        (["--spool-cap-bytes", "0"], "--spool-cap-bytes must be a positive number"),
        (["--log-keep", "many"], "--log-keep must be a whole number"),
        (["--policy", "@missing"], "--policy"),
        (["--policy", "@not-json"], "line 1"),
        (["--policy", "@bad-policy"], "access.rules[0]"),
    ],
)
def test_contradictions_are_usage_errors(argv, expected, files):
    with pytest.raises(usage.UsageError) as caught:
        parse(expand(argv, files))
    message = str(caught.value)
    assert expected in message
    assert "\n" not in message.strip(), "the error must be one line"


def test_invalid_policy_error_names_the_field(files):
    with pytest.raises(usage.UsageError) as caught:
        parse(["--policy", str(files["bad-policy"])])
    message = str(caught.value)
    assert str(files["bad-policy"]) in message
    assert "bad-domain" in message and "domains[0]" in message


def test_no_options_is_a_standalone_node_with_defaults():
    config = parse([])
    assert config.role == "standalone"
    assert config.listen == "tcp:8080"
    assert config.portal == "tcp:8888"
    assert config.state_dir == "safesquid-state"
    assert config.policy_file is None
    assert config.master is None
    assert config.limits == Limits()
    assert config.serves_proxy


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--role", "slave", "--master", "10.0.0.1:8888", "--activation-key-file", "@key"],
         {"role": "slave", "master": "10.0.0.1:8888"}),
        (["--role", "slave", "--master", "[::1]:8888", "--activation-key-file", "@key"],
         {"role": "slave", "master": "[::1]:8888"}),
        (["--role", "slave", "--master", "master.example:443", "--activation-key-file", "@key"],
         {"master": "master.example:443"}),
        (["--role", "slave", "--master", "m:1", "--activation-key-file", "@key", "--master-fingerprint",
          "SHA256:" + ":".join(["AB"] * 32)], {"role": "slave"}),
        (["--role", "master", "--activation-key-file", "@key"], {"role": "master", "master": None}),
        (["--role", "standalone"], {"role": "standalone"}),
        (["--listen", "tcp:0:interface=127.0.0.2"], {"listen": "tcp:0:interface=127.0.0.2"}),
        (["--portal", "tcp6:8888:interface=\\:\\:1"], {"portal": "tcp6:8888:interface=\\:\\:1"}),
        (["--state-dir", "/var/lib/x"], {"state_dir": "/var/lib/x"}),
        (["--node-name", "edge-1"], {"node_name": "edge-1"}),
        (["--log-rotate-bytes", "1000", "--log-keep", "3"], {"log_rotate_bytes": 1000, "log_keep": 3}),
        (["--activation-key-file", "@key", "--role", "slave", "--master", "m:1"], {"role": "slave"}),
        (["--policy", "@good-policy"], {}),
    ],
)
def test_good_combinations_make_a_config(argv, expected, files):
    config = parse(expand(argv, files))
    assert isinstance(config, NodeConfig)
    for field, value in expected.items():
        assert getattr(config, field) == value
    if "--policy" in argv:
        assert config.policy_file == str(files["good-policy"])


def test_master_serves_no_proxy(files):
    key = str(files["key"])
    assert not parse(["--role", "master", "--activation-key-file", key]).serves_proxy
    assert parse(["--role", "slave", "--master", "m:1", "--activation-key-file", key]).serves_proxy


@pytest.mark.parametrize(
    "option, value, field, expected",
    [
        ("head-timeout", "2.5", "head_timeout", 2.5),
        ("idle-timeout", "3", "idle_timeout", 3.0),
        ("max-request-body", "1024", "max_request_body", 1024),
        ("max-connections", "7", "max_connections", 7),
        ("max-request-line", "1000", "max_request_line", 1000),
        ("max-header-bytes", "4096", "max_header_bytes", 4096),
        ("connect-timeout", "1.5", "connect_timeout", 1.5),
        ("response-timeout", "2", "response_timeout", 2.0),
        ("read-timeout", "9", "read_timeout", 9.0),
        ("tunnel-idle-timeout", "4", "tunnel_idle_timeout", 4.0),
        ("dns-timeout", "0.5", "dns_timeout", 0.5),
        ("upstream-idle-per-host", "2", "upstream_idle_per_host", 2),
    ],
)
def test_limit_options_reach_the_limits(option, value, field, expected):
    limits = parse([f"--{option}", value]).limits
    assert getattr(limits, field) == expected
    assert type(getattr(limits, field)) is type(getattr(Limits(), field))


def test_every_limit_option_is_in_the_help():
    help_text = str(tap.Options())
    for name, _doc, _kind in tap._LIMIT_OPTIONS:
        assert f"--{name}=" in help_text


def test_a_master_without_a_key_file_gets_one_in_its_state_dir(tmp_path):
    config = parse(["--role", "master", "--state-dir", str(tmp_path / "state")])
    assert config.activation_key_file == str(tmp_path / "state" / "activation.key")
    from safesquid_tw.cluster.keyfile import ensure_master_key
    from safesquid_tw.config import read_activation_key

    assert ensure_master_key(config.activation_key_file)
    assert (tmp_path / "state" / "activation.key").stat().st_mode & 0o777 == 0o600
    assert len(read_activation_key(config.activation_key_file)) >= 16
    assert not ensure_master_key(config.activation_key_file)  # never replaced
def test_report_store_options(files, tmp_path):
    password_file = tmp_path / "pw"
    password_file.write_text("s3cret\n")
    config = parse(["--role=master", f"--activation-key-file={files['key']}",
                    "--report-store=postgresql://reports@db.test:5432/reports?sslmode=verify-full",
                    "--report-read-url=postgresql://reports@replica.test/reports",
                    f"--report-store-password-file={password_file}"])
    assert config.report_store == "postgresql://reports@db.test:5432/reports?sslmode=verify-full"
    assert config.report_read_url == "postgresql://reports@replica.test/reports"
    assert config.report_store_password_file == str(password_file)
    assert parse([]).report_store == "sqlite"


@pytest.mark.parametrize(("argv", "message"), [
    (["--report-store=postgresql://u:pw@db.test/r"], "carries a password"),
    (["--report-store=mysql://db.test/r"], "neither sqlite nor"),
    (["--report-read-url=postgresql://db.test/r"], "needs --report-store=postgresql"),
    (["--report-store=postgresql://db.test/r", "--report-store-password-file=/nonexistent/pw"], "password-file"),
])
def test_report_store_options_refused(argv, message):
    with pytest.raises(usage.UsageError, match=message) as caught:
        parse(argv)
    assert "pw@" not in str(caught.value)
