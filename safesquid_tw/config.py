"""Node-local settings: where this node listens, where it keeps its state, its limits.

Nothing here is ever part of the policy, and nothing here is ever synced between nodes.
"""

from __future__ import annotations

import socket

import attrs

ROLES = ("standalone", "master", "slave")


@attrs.frozen
class Limits:
    """Protocol limits and deadlines of the proxy (seconds and bytes)."""

    max_request_line: int = 8192
    max_header_bytes: int = 65536
    max_headers: int = 100
    head_timeout: float = 30.0  # the whole request head must arrive within this (slowloris)
    idle_timeout: float = 120.0  # keep-alive client connection with no request in progress
    max_request_body: int = 1 << 30
    max_connections: int = 10000
    connect_timeout: float = 10.0  # TCP connect to the origin
    response_timeout: float = 60.0  # request sent -> first byte of the response head
    read_timeout: float = 300.0  # no bytes in either direction while a body streams
    tunnel_idle_timeout: float = 600.0  # CONNECT / Upgrade tunnel with no bytes either way
    dns_timeout: float = 5.0
    dns_threads: int = 32
    dns_cache_ttl: float = 60.0
    upstream_idle_per_host: int = 64
    upstream_idle_timeout: float = 30.0
    max_connections_per_client: int = 256  # one client address cannot take all of max_connections
    first_byte_timeout: float = 10.0  # a new connection's first request byte (or PROXY header)


@attrs.frozen
class NodeConfig:
    role: str = "standalone"
    listen: str = "tcp:8080"
    portal: str = "tcp:8888"
    state_dir: str = "safesquid-state"
    policy_file: str | None = None
    master: str | None = None
    activation_key_file: str | None = None
    node_name: str = attrs.field(factory=socket.gethostname)
    log_rotate_bytes: int = 50 * 1024 * 1024
    log_keep: int = 10
    master_fingerprint: str | None = None  # pin the master's key (slaves); else trust on first use
    keepalive: float = 10.0  # control-plane keepalive; a silent peer is gone after 3 of these
    poll_interval: float = 60.0  # slaves compare policy versions with the master this often
    drain_grace: float = 10.0  # after "drain", seconds before new connections are refused
    stop_grace: float = 5.0  # at SIGTERM: /health says 503 while traffic is still served, this long
    spool_cap_bytes: int = 512 * 1024 * 1024
    report_retention_days: float = 90.0  # the report store keeps records this long
    keytab: str | None = None  # Kerberos keytab for Negotiate proxy authentication
    service_principal: str | None = None  # e.g. HTTP/proxy.example.com
    upstream_ca_file: str | None = None  # PEM bundle trusted for origins beside the system store
    limits: Limits = attrs.field(factory=Limits)
    # Further proxy listeners after `listen` (--listen given more than once), e.g. a PROXY
    # protocol listener for the balancer beside a plain one for direct clients.
    more_listen: tuple[str, ...] = ()
    # Networks that may send PROXY headers on `haproxy:` listeners (comma-separated); None: any.
    proxy_protocol_from: str | None = None

    spool_fsync_interval: float = 1.0  # group commit: a machine crash can lose this window
    spool_memory_bytes: int = 64 * 1024 * 1024  # records held in memory while the spool is unwritable
    metrics_token_file: str | None = None  # GET /metrics then needs this bearer token too

    @property
    def listen_endpoints(self) -> tuple[str, ...]:
        """Every proxy listener, `listen` first."""
        return (self.listen, *self.more_listen)
    report_store: str = "sqlite"  # or postgresql://user@host:port/dbname (master, standalone)
    report_read_url: str | None = None  # a read replica for report pages and searches
    report_store_password_file: str | None = None
    workers: int = 1  # proxy worker processes sharing the --listen sockets (standalone, slave)

    @property
    def serves_proxy(self) -> bool:
        return self.role in ("standalone", "slave")


def read_activation_key(path: str) -> str:
    """The activation key is the first line of its file, surrounding blanks removed."""
    with open(path, encoding="utf-8") as f:
        key = f.readline().strip()
    if not key:
        raise ValueError(f"activation key file {path} is empty")
    return key
