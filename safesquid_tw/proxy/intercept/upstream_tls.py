"""TLS toward origin servers: verified against the system trust store plus the node-local
`--upstream-ca-file`, host names checked with service_identity, TLS 1.2 at least.

Verification runs to the end of the handshake with every problem recorded, and the origin
connection is handed out only after `check` found none (or the policy tolerates them for this
host, which is logged every time). So a certificate error becomes a precise answer to the
client (`502`, `Proxy-Status: ...; error=tls_certificate_error; details="..."`), and no request
byte ever reaches an origin that failed verification.

Sessions are resumed per origin (host name and port): the session of a connection that passed
verification (not one merely tolerated) is kept once it goes idle, when a TLS 1.3 origin has sent
its ticket, and offered only to the next new connection to that same host and port, under the
same SNI and trust store. A resumed handshake skips the origin's signature and the chain check;
the host name is still checked on the certificate the session carries, and an expired one is
refused as in a full handshake.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable

from OpenSSL import SSL
from OpenSSL._util import lib as _lib
from service_identity import VerificationError
from service_identity.pyopenssl import verify_hostname, verify_ip_address
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.logger import Logger
from zope.interface import implementer

from safesquid_tw.proxy.responses import ProxyFailure
from safesquid_tw.proxy.intercept.fasttls import connect_tls

log = Logger()

# X509_V_ERR_* codes, named the way a block page reader understands them.
_VERIFY_ERRORS = {
    2: "unknown certificate authority (issuer certificate not found)",
    9: "certificate is not yet valid",
    10: "certificate has expired",
    18: "self-signed certificate",
    19: "self-signed certificate in the chain (unknown certificate authority)",
    20: "unknown certificate authority (issuer not trusted)",
    21: "unknown certificate authority (cannot verify the first certificate)",
    23: "certificate has been revoked",
    24: "invalid CA certificate in the chain",
    26: "certificate not meant for a server",
    7: "certificate signature failure",
}
_MAX_CREATORS = 4096
_MAX_SESSIONS = 4096


def verify_error_text(code: int) -> str:
    return _VERIFY_ERRORS.get(code, f"certificate verification error {code}")


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@implementer(IOpenSSLClientConnectionCreator)
class _OriginCreator:
    """One origin host name: SNI (for names), and verification that records instead of failing."""

    def __init__(self, ctx: SSL.Context, host: str) -> None:
        self._ctx = ctx
        self.host = host
        self._sni = None if _is_ip(host) else host.encode("idna")

    def clientConnectionForTLS(self, tls_protocol) -> SSL.Connection:
        conn = SSL.Connection(self._ctx, None)
        if self._sni is not None:
            conn.set_tlsext_host_name(self._sni)
        problems: list[tuple[int, int]] = []

        def record(_conn, _cert, errno: int, depth: int, ok: int) -> bool:
            if not ok:
                problems.append((errno, depth))
            return True  # decided after the handshake, in UpstreamTLS.check

        conn.set_verify(SSL.VERIFY_PEER, record)
        tls_protocol.safesquid_verify_problems = problems
        return conn


@implementer(IOpenSSLClientConnectionCreator)
class _Resuming:
    """The host's creator, offering the session kept for this host and port."""

    __slots__ = ("_creator", "_session")

    def __init__(self, creator: _OriginCreator, session: SSL.Session) -> None:
        self._creator = creator
        self._session = session

    def clientConnectionForTLS(self, tls_protocol) -> SSL.Connection:
        conn = self._creator.clientConnectionForTLS(tls_protocol)
        conn.set_session(self._session)
        return conn


class UpstreamTLS:
    def __init__(self, ca_file: str | None = None, *, tolerated: Callable[[str], bool] = lambda host: False) -> None:
        ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        ctx.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
        ctx.set_default_verify_paths()
        if ca_file:
            ctx.load_verify_locations(ca_file)
        ctx.set_alpn_protos([b"http/1.1"])
        self._ctx = ctx
        self.ca_file = ca_file
        self.tolerated = tolerated
        self._creators: dict[str, _OriginCreator] = {}
        self._sessions: OrderedDict[tuple[str, int], SSL.Session] = OrderedDict()
        # Origin handshakes checked, and how many of them resumed a kept session (metrics: is
        # resumption hitting?).
        self.handshakes = 0
        self.resumed = 0

    def creator_for(self, host: str) -> _OriginCreator:
        creator = self._creators.get(host)
        if creator is None:
            if len(self._creators) >= _MAX_CREATORS:
                self._creators.clear()
            creator = self._creators[host] = _OriginCreator(self._ctx, host)
        return creator

    def connect(self, reactor, ip: str, port: int, factory, host: str, *, timeout: float) -> None:
        """A new verified TLS connection to `host` at `ip`:`port` (its writes coalesced per turn)."""
        connect_tls(reactor, ip, port, factory, self.connection_creator(host, port), timeout=timeout)

    def connection_creator(self, host: str, port: int):
        """What makes the next connection to `host`:`port`: resuming its kept session, if any."""
        creator = self.creator_for(host)
        session = self._sessions.get((host, port))
        return creator if session is None else _Resuming(creator, session)

    def remember(self, transport, host: str, port: int) -> None:
        """Keep the session of a verified origin connection for the next one to `host`:`port`.
        Call it when the connection first goes idle (a TLS 1.3 ticket arrives after the
        handshake) and only for one whose certificate `check` found good, never a tolerated one."""
        handle = transport.getHandle()
        if getattr(handle.get_app_data(), "safesquid_verify_problems", None):
            return
        session = handle.get_session()
        if session is None:
            return
        key = (host, port)
        self._sessions[key] = session
        self._sessions.move_to_end(key)
        while len(self._sessions) > _MAX_SESSIONS:
            self._sessions.popitem(last=False)

    def forget(self, host: str, port: int) -> None:
        self._sessions.pop((host, port), None)

    def check(self, transport, host: str, peer: str) -> tuple[ProxyFailure | None, bool]:
        """After the handshake: (None, False) when the certificate is good, (None, True) when it is
        not but the policy tolerates it for this host, (why not, False) otherwise."""
        handle = transport.getHandle()
        tls_protocol = handle.get_app_data()
        problems = getattr(tls_protocol, "safesquid_verify_problems", [])
        detail = None
        self.handshakes += 1
        if _resumed(handle):
            self.resumed += 1
        if problems:
            errno, _depth = problems[0]
            detail = verify_error_text(errno)
        elif _resumed(handle) and _expired(handle):
            detail = verify_error_text(10)
        else:
            try:
                if _is_ip(host):
                    verify_ip_address(handle, host)
                else:
                    verify_hostname(handle, host)
            except VerificationError:
                detail = f"certificate does not name {host}{_names_of(handle)}"
        if detail is None:
            return None, False
        for key in [key for key in self._sessions if key[0] == host]:
            del self._sessions[key]  # nothing of a certificate that fails any more is resumed
        if self.tolerated(host):
            log.warn("tolerated an invalid certificate from {host} ({peer}): {detail}", host=host, peer=peer, detail=detail)
            return None, True
        return ProxyFailure(502, "tls_certificate_error", f"{host}: {detail}", extra=_details(detail)), False

    @staticmethod
    def handshake_failure(reason, host: str, peer: str) -> ProxyFailure:
        """The TLS handshake itself failed (old protocol only, no common cipher, not TLS)."""
        err = reason.value
        if isinstance(err, SSL.Error):
            text = "; ".join(str(e[2]) for e in err.args[0] if isinstance(e, tuple) and len(e) == 3) or str(err)
        else:
            text = "the origin closed the connection during the handshake"
        detail = f"TLS handshake with {host} ({peer}) failed: {text}"
        return ProxyFailure(502, "tls_protocol_error", detail, extra=_details(text))


def _resumed(handle: SSL.Connection) -> bool:
    return bool(_lib.SSL_session_reused(handle._ssl))


def _expired(handle: SSL.Connection) -> bool:
    """A resumed session skips the chain check: its certificate may have expired since."""
    cert = handle.get_peer_certificate()
    return cert is None or cert.has_expired()


def _names_of(handle: SSL.Connection) -> str:
    cert = handle.get_peer_certificate()
    if cert is None:
        return ""
    try:
        from cryptography import x509

        san = cert.to_cryptography().extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = [str(n) for n in san.get_values_for_type(x509.DNSName)][:4]
        names += [str(n) for n in san.get_values_for_type(x509.IPAddress)][:2]
    except Exception:
        names = []
    return f" (it names {', '.join(names)})" if names else ""


def _details(text: str) -> str:
    safe = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'details="{safe[:200]}"'


__all__ = ["UpstreamTLS", "verify_error_text"]
