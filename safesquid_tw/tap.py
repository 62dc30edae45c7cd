"""`twistd safesquid`: command-line options and the service they build."""

from __future__ import annotations

import os
import sys

import attrs
from twisted.application.service import IService
from twisted.internet import endpoints
from twisted.python import usage

from safesquid_tw.config import ROLES, Limits, NodeConfig

_LIMIT_OPTIONS: list[tuple[str, str, type]] = [
    ("head-timeout", "seconds a client may take to send a whole request head", float),
    ("idle-timeout", "seconds a keep-alive client connection may sit idle", float),
    ("max-request-body", "largest request body in bytes", int),
    ("max-connections", "most concurrent client connections", int),
    ("max-request-line", "longest request line in bytes (longer: 414)", int),
    ("max-header-bytes", "largest request header section in bytes (larger: 431)", int),
    ("connect-timeout", "seconds to connect to an origin (then 504)", float),
    ("response-timeout", "seconds from request sent to the first byte of the response (then 504)", float),
    ("read-timeout", "seconds a body may stall in either direction", float),
    ("tunnel-idle-timeout", "seconds a CONNECT or Upgrade tunnel may sit idle", float),
    ("dns-timeout", "seconds a name lookup may take (then 504)", float),
    ("upstream-idle-per-host", "idle keep-alive connections kept per origin", int),
    ("max-connections-per-client", "most concurrent connections from one client address (more: closed at once)", int),
    ("first-byte-timeout", "seconds a new connection may take to send its first byte (or PROXY header)", float),
]


def _number(name: str, kind: type) -> "callable":
    """A coercer whose error names the option, so the one-line message says what to fix."""

    def coerce(value: str):
        try:
            return kind(value)
        except ValueError:
            noun = "a whole number" if kind is int else "a number"
            raise ValueError(f"--{name} must be {noun}, not {value!r}") from None

    coerce.coerceDoc = ""
    return coerce


class Options(usage.Options):
    synopsis = "[options]"
    longdesc = (
        "Run one safesquid-tw node. A standalone node (the default) runs the forward proxy "
        "and its own portal; a master serves the Configuration Portal and the control plane and "
        "carries no client traffic; a slave runs the proxy under the policy its master pushes. "
        "Addresses are Twisted endpoint strings, e.g. tcp:8080, tcp:8080:interface=127.0.0.2, "
        "tcp6:8080:interface=\\:\\:1."
    )
    optParameters = [
        ["role", None, "standalone", "standalone, master or slave"],
        ["portal", None, "tcp:8888", "endpoint of the portal, management API and /health"],
        ["state-dir", None, "safesquid-state", "directory for policy, cache, logs and keys (created mode 0700)"],
        ["policy", None, None, "policy document to start from (default: the sample policy)"],
        ["master", None, None, "HOST:PORT of the master's portal (slaves only)"],
        ["activation-key-file", None, None, "file whose first line is the cluster's activation key"],
        ["node-name", None, None, "this node's name (default: the host name)"],
        ["log-rotate-bytes", None, 50 * 1024 * 1024, "rotate logs when they reach this size",
         _number("log-rotate-bytes", int)],
        ["log-keep", None, 10, "rotated log files kept", _number("log-keep", int)],
        ["master-fingerprint", None, None,
         "SHA-256 fingerprint of the master's key to pin (slaves; default: trust on first use)"],
        ["keepalive", None, 10.0, "control-plane keepalive in seconds (a silent peer is gone after 3)",
         _number("keepalive", float)],
        ["poll-interval", None, 60.0, "seconds between a slave's policy version checks", _number("poll-interval", float)],
        ["drain-grace", None, 10.0, "seconds after a drain task before new connections are refused",
         _number("drain-grace", float)],
        ["stop-grace", None, 5.0,
         "seconds a stopping node keeps serving (with /health at 503) so load balancers move away first",
         _number("stop-grace", float)],
        ["report-retention-days", None, 90.0, "days the report store keeps access records (master, standalone)",
         _number("report-retention-days", float)],
        ["spool-cap-bytes", None, 512 * 1024 * 1024, "most bytes of unshipped access records kept on disk",
         _number("spool-cap-bytes", int)],
        ["keytab", None, None, "Kerberos keytab holding the proxy's service key (for authentication.negotiate)"],
        ["service-principal", None, None,
         "Kerberos service principal clients ask tickets for, e.g. HTTP/proxy.example.com (the balancer's name)"],
        ["proxy-protocol-from", None, None,
         "comma-separated networks that may send PROXY headers on haproxy: listeners (default: any)"],
        ["spool-fsync-interval", None, 1.0,
         "seconds between fsyncs of the access record spool (a machine crash can lose this window)",
         _number("spool-fsync-interval", float)],
        ["spool-memory-bytes", None, 64 * 1024 * 1024,
         "most bytes of access records held in memory while the spool cannot be written",
         _number("spool-memory-bytes", int)],
        ["upstream-ca-file", None, None,
         "PEM bundle of CA certificates trusted for origin servers, beside the system trust store"],
        ["report-store", None, "sqlite",
         "where the reports live (master, standalone): sqlite (embedded) or postgresql://USER@HOST:PORT/DB"],
        ["report-read-url", None, None, "postgresql:// URL of a read replica for report pages and searches"],
        ["report-store-password-file", None, None,
         "file whose first line is the report database's password (else PGPASSFILE / ~/.pgpass)"],
    ] + [
        [name, None, getattr(Limits(), name.replace("-", "_")), doc, _number(name, kind)]
        for name, doc, kind in _LIMIT_OPTIONS
    ] + [
        ["metrics-token-file", None, None,
         "file whose first line is a bearer token GET /metrics then requires (at least 16 characters)"],
        ["workers", None, "auto",
         "proxy worker processes sharing the --listen sockets (standalone, slave): N, or auto for one per usable CPU"],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["listen"] = []

    def opt_listen(self, endpoint: str) -> None:
        self["listen"].append(endpoint)

    # usage prints an option's docstring as written: one line, built here.
    opt_listen.__doc__ = (
        "endpoint of the forward proxy (standalone and slave; default tcp:8080); may be given more than once; "
        "haproxy:tcp:3128 reads a PROXY protocol header (v1 or v2) from a balancer first"
    )

    def postOptions(self) -> None:
        self.config = options_to_config(self)

    def parseOptions(self, options=None) -> None:
        try:
            super().parseOptions(options)
        except usage.UsageError as e:
            if getattr(self, "parent", None) is None:
                raise  # called directly (tests, tools): the caller reports it
            # Under twistd: one line naming the problem and where the options are explained,
            # instead of twistd's whole help text.
            import sys

            sys.stderr.write(f"twistd safesquid: {e} (see: twistd safesquid --help)\n")
            raise SystemExit(1) from None


def _check_endpoint(kind: str, description: str) -> None:
    from twisted.internet import reactor

    try:
        endpoints.serverFromString(reactor, description)
    except Exception as e:
        raise usage.UsageError(f"--{kind}: {description!r} is not a server endpoint ({e}); try e.g. tcp:8080")


def _check_master(value: str) -> None:
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise usage.UsageError(f"--master: {value!r} is not HOST:PORT (e.g. --master=10.0.0.1:8888)")


def _listen_list(opts) -> list[str]:
    """--listen values in order (one string from callers that set a single value); tcp:8080 if none."""
    value = opts.get("listen")
    if isinstance(value, str):
        value = [value]
    return list(value or ["tcp:8080"])
def _check_ca_file(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise usage.UsageError(f"--upstream-ca-file: {e}")
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise usage.UsageError(f"--upstream-ca-file: {path} holds no PEM certificate")
    return path


def options_to_config(opts: usage.Options) -> NodeConfig:
    """Check the options for contradictions and turn them into a NodeConfig."""
    role = opts["role"]
    if role not in ROLES:
        raise usage.UsageError(f"--role must be one of {', '.join(ROLES)}, not {role!r}")
    if role == "slave" and not opts["master"]:
        raise usage.UsageError("a slave needs --master=HOST:PORT (the master's portal address)")
    if role != "slave" and opts["master"]:
        raise usage.UsageError(f"--master is for slaves only; drop it or use --role=slave (role is {role})")
    if opts["master"]:
        _check_master(opts["master"])
    listens = _listen_list(opts)
    if role != "master":
        for endpoint in listens:
            _check_endpoint("listen", endpoint)
    proxy_protocol_from = opts.get("proxy-protocol-from")
    if proxy_protocol_from is not None:
        from safesquid_tw.proxy.proxyheader import parse_networks

        try:
            parse_networks(proxy_protocol_from)
        except ValueError as e:
            raise usage.UsageError(f"--proxy-protocol-from: {e}")
    _check_endpoint("portal", opts["portal"])
    for name, _doc, _kind in _LIMIT_OPTIONS:
        if opts[name] is None or opts[name] <= 0:
            raise usage.UsageError(f"--{name} must be a positive number")
    key_file = opts["activation-key-file"]
    if role == "master" and not key_file:
        # A master without a key makes one at its first start (see cluster/keyfile.py).
        import os

        key_file = os.path.join(opts["state-dir"], "activation.key")
    if role == "slave" and not key_file:
        raise usage.UsageError(
            f"a {role} needs --activation-key-file=FILE (the cluster's shared key, the same on every node)"
        )
    if opts["master-fingerprint"] and role != "slave":
        raise usage.UsageError("--master-fingerprint is for slaves only")
    if opts["master-fingerprint"]:
        from safesquid_tw.cluster.tlsconfig import parse_fingerprint

        try:
            parse_fingerprint(opts["master-fingerprint"])
        except ValueError as e:
            raise usage.UsageError(f"--master-fingerprint: {e}")
    for name in ("keepalive", "poll-interval", "drain-grace", "spool-cap-bytes", "report-retention-days",
                 "spool-fsync-interval", "spool-memory-bytes"):
        if opts[name] <= 0:
            raise usage.UsageError(f"--{name} must be a positive number")
    if opts["stop-grace"] < 0:
        raise usage.UsageError("--stop-grace must be zero or more seconds")
    _check_report_store(opts)
    if key_file:
        from safesquid_tw.cluster.keyfile import check_key_length
        from safesquid_tw.config import read_activation_key
        import os

        if not (role == "master" and not os.path.exists(key_file)):  # else created at start
            try:
                check_key_length(read_activation_key(key_file), key_file)
            except (OSError, ValueError) as e:
                raise usage.UsageError(f"--activation-key-file: {e}")
    _check_kerberos(opts, role)
    limits = Limits(**{n.replace("-", "_"): opts[n] for n, _d, _k in _LIMIT_OPTIONS})
    fields = dict(
        role=role,
        listen=listens[0],
        more_listen=tuple(listens[1:]),
        proxy_protocol_from=proxy_protocol_from,
        portal=opts["portal"],
        state_dir=opts["state-dir"],
        policy_file=opts["policy"],
        master=opts["master"],
        activation_key_file=key_file,
        log_rotate_bytes=opts["log-rotate-bytes"],
        log_keep=opts["log-keep"],
        master_fingerprint=opts["master-fingerprint"],
        keepalive=opts["keepalive"],
        poll_interval=opts["poll-interval"],
        drain_grace=opts["drain-grace"],
        stop_grace=opts["stop-grace"],
        report_retention_days=opts["report-retention-days"],
        spool_cap_bytes=opts["spool-cap-bytes"],
        keytab=opts["keytab"],
        service_principal=opts["service-principal"],
        upstream_ca_file=_check_ca_file(opts["upstream-ca-file"]),
        limits=limits,
        spool_fsync_interval=opts["spool-fsync-interval"],
        spool_memory_bytes=opts["spool-memory-bytes"],
        metrics_token_file=opts["metrics-token-file"],
        report_store=opts["report-store"],
        report_read_url=opts["report-read-url"],
        report_store_password_file=opts["report-store-password-file"],
    )
    if opts["metrics-token-file"]:
        from safesquid_tw.metrics.resource import read_token_file

        try:
            read_token_file(opts["metrics-token-file"])
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise usage.UsageError(f"--metrics-token-file: {e}")
    if opts["node-name"]:
        fields["node_name"] = opts["node-name"]
    fields["workers"] = _workers(opts["workers"], role)
    config = NodeConfig(**fields)
    config = _with_saved_startup_params(config)
    if config.policy_file:
        from safesquid_tw.policy.codec import PolicyError, load_policy_file

        try:
            load_policy_file(config.policy_file)
        except (OSError, PolicyError) as e:
            raise usage.UsageError(f"--policy {config.policy_file}: {e}")
    return config


def _workers(value: str, role: str) -> int:
    """--workers N|auto: auto is one per CPU this process may use (its affinity)."""
    if value == "auto":
        from safesquid_tw.workers.pool import cpu_count

        count = cpu_count()
    else:
        try:
            count = int(value)
        except ValueError:
            raise usage.UsageError(f"--workers must be a whole number or auto, not {value!r}")
        if not 1 <= count <= 256:
            raise usage.UsageError("--workers must be between 1 and 256")
    if role == "master":
        return 1  # a master carries no traffic
    return count


def _check_kerberos(opts: usage.Options, role: str) -> None:
    keytab, principal = opts["keytab"], opts["service-principal"]
    if not keytab and not principal:
        return
    if role == "master":
        raise usage.UsageError("--keytab and --service-principal are for nodes that run the proxy, not a master")
    if not keytab or not principal:
        raise usage.UsageError("--keytab and --service-principal go together (e.g. --service-principal=HTTP/proxy.example.com)")
    try:
        with open(keytab, "rb"):
            pass
    except OSError as e:
        raise usage.UsageError(f"--keytab: cannot read {keytab}: {e.strerror}")
    service, slash, host = principal.partition("/")
    if not slash or not service or not host:
        raise usage.UsageError(f"--service-principal: {principal!r} is not SERVICE/host (e.g. HTTP/proxy.example.com)")
def _check_report_store(opts: usage.Options) -> None:
    from safesquid_tw.reporting.backend import ReportStoreError, check_url

    try:
        check_url("report-store", opts["report-store"])
        if opts["report-read-url"]:
            if opts["report-store"] == "sqlite":
                raise ReportStoreError("--report-read-url needs --report-store=postgresql://...")
            check_url("report-read-url", opts["report-read-url"])
    except ReportStoreError as e:
        raise usage.UsageError(str(e))
    password_file = opts["report-store-password-file"]
    if password_file:
        try:
            with open(password_file, encoding="utf-8"):
                pass
        except OSError as e:
            raise usage.UsageError(f"--report-store-password-file: {e}")


def _with_saved_startup_params(config: NodeConfig) -> NodeConfig:
    """Startup parameters saved from a slave's portal (`<state-dir>/startup.json`) win over the
    command line: the portal is where an administrator changed them last."""
    if config.role not in ("slave", "standalone"):
        return config
    if config.role == "standalone" and not os.path.isfile(os.path.join(config.state_dir, "startup.json")):
        return config  # written only by "join a cluster"; a bad state dir is reported at start
    from safesquid_tw.portal.startup import StartupParamError, read_startup_file

    try:
        saved = read_startup_file(config.state_dir)
    except (OSError, ValueError, StartupParamError) as e:
        raise usage.UsageError(f"{config.state_dir}/startup.json: {e}")
    if config.role == "standalone" and saved.get("role") != "slave":
        return config  # a standalone node reads the file only once "join a cluster" wrote it
    changes = {key: value for key, value in saved.items() if value}
    return attrs.evolve(config, **changes) if changes else config


def makeService(options: Options) -> IService:
    from safesquid_tw.assembly.roles import build_node_service
    from safesquid_tw.statedir import state_dir_problem

    if (problem := state_dir_problem(options.config.state_dir)) is not None:
        # One line and exit status 1, not a traceback from deep inside a store.
        print(f"safesquid: {problem}", file=sys.stderr)
        raise SystemExit(1)
    service = build_node_service(options.config)
    # The running policy out of the garbage collector's full collections (policy/heapfreeze.py);
    # here, in the node's own process only, not in tests that build a node in theirs.
    from safesquid_tw.policy.heapfreeze import freeze_after_swaps

    freeze_after_swaps(service.policy_store)
    return service


__all__ = ["Options", "makeService", "options_to_config"]
