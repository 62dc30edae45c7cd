"""An LDAP / Active Directory server seen as a directory of proxy users and their groups.

Every call here blocks on the network, so it runs in a worker thread (the proxy's bounded
authentication pool), never on the reactor. ldap3 was chosen over the Twisted-native ldaptor
because the password check already lives in that bounded pool (argon2 for local users), and
ldap3 brings StartTLS, LDAPS with a private CA and per-operation timeouts without code of our
own; each worker thread keeps its own two connections (one bound as the search account, one
re-bound as each user being checked), so connections are pooled and bounded by the pool size.

A user's password is checked by binding as that user: it is never compared here. An empty
password is refused before any bind (servers treat it as an anonymous bind and say yes).
"""

from __future__ import annotations

import socket
import ssl
import threading
from collections.abc import Iterable
from typing import Any

import attrs
import ldap3
from ldap3.core import exceptions as ldap_errors
from ldap3.utils.conv import escape_filter_chars

from safesquid_tw.identity.errors import DirectoryUnavailable

# LDAP_MATCHING_RULE_IN_CHAIN: Active Directory expands nested groups on the server.
IN_CHAIN = "1.2.840.113556.1.4.1941"
MAX_NESTING = 8  # levels of nested groups followed by hand when the server does not
MAX_GROUPS = 1000


@attrs.frozen
class DirectorySettings:
    """The `authentication.directory` section of a policy version, as checked by validation."""

    urls: tuple[str, ...]
    bind_dn: str
    bind_password: str = attrs.field(repr=False)
    user_base: str
    user_filter: str
    group_base: str
    group_membership: str = "memberOf"
    start_tls: bool = False
    ca_pem: str | None = attrs.field(default=None, repr=False)
    principal_filter: str | None = None
    timeout_seconds: float = 5.0
    cache_seconds: float = 300.0

    @classmethod
    def from_policy(cls, section: dict[str, Any]) -> "DirectorySettings":
        return cls(
            urls=tuple(section["urls"]),
            bind_dn=section["bind_dn"],
            bind_password=section["bind_password"],
            user_base=section["user_base"],
            user_filter=section["user_filter"],
            group_base=section["group_base"],
            group_membership=section["group_membership"],
            start_tls=section["start_tls"],
            ca_pem=section["ca_pem"],
            principal_filter=section["principal_filter"],
            timeout_seconds=section["timeout_seconds"],
            cache_seconds=section["cache_seconds"],
        )


@attrs.frozen
class DirectoryUser:
    """A user entry found in the directory and the groups it belongs to."""

    name: str
    dn: str
    groups: frozenset[str]  # group DNs, lower-cased


class LdapDirectory:
    """Bind, search and group look-ups against the servers of one policy version."""

    def __init__(self, settings: DirectorySettings) -> None:
        self.settings = settings
        self._servers = [self._server(url) for url in settings.urls]
        self._local = threading.local()
        self._lock = threading.Lock()
        self._open: list[ldap3.Connection] = []
        self._closed = False

    # -- what the authenticator asks ------------------------------------------------------------
    def authenticate(self, user: str, password: str) -> DirectoryUser | None:
        """The user if the password binds as them; None for a wrong password or unknown user."""
        if not password or not user:
            return None
        found = self.find_user(user)
        if found is None:
            return None
        if not self._bind_as(found.dn, password):
            return None
        return found

    def find_user(self, user: str, *, principal: str | None = None) -> DirectoryUser | None:
        """Look a user up by name (or Kerberos principal) with the search account."""
        settings = self.settings
        if principal is not None and settings.principal_filter:
            query = settings.principal_filter.replace("{principal}", escape_filter_chars(principal))
        else:
            query = settings.user_filter.replace("{user}", escape_filter_chars(user))
        attributes = ["memberOf"] if settings.group_membership == "memberOf" else []
        entries = self._search(settings.user_base, query, attributes, size_limit=2)
        if len(entries) != 1:
            return None  # unknown, or ambiguous: never guess which of two entries is meant
        dn, attrs_found = entries[0]
        if settings.group_membership == "memberOf":
            groups = frozenset(str(g).lower() for g in attrs_found.get("memberOf", ())[:MAX_GROUPS])
        else:
            groups = self._member_groups(dn)
        return DirectoryUser(name=user, dn=dn, groups=groups)

    def probe(self) -> None:
        """Bind with the search account: raises DirectoryUnavailable when nothing answers."""
        self._connection("search")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections, self._open = self._open, []
        for conn in connections:
            try:
                conn.unbind()
            except Exception:
                pass

    # -- groups ---------------------------------------------------------------------------------
    def _member_groups(self, dn: str) -> frozenset[str]:
        """Groups that list `dn` as a member, following nested groups up to MAX_NESTING levels."""
        settings = self.settings
        found: set[str] = set()
        frontier = [dn]
        for _level in range(MAX_NESTING):
            if not frontier or len(found) >= MAX_GROUPS:
                break
            query = "(|" + "".join(f"(member={escape_filter_chars(d)})" for d in frontier) + ")"
            entries = self._search(settings.group_base, query, [], size_limit=MAX_GROUPS)
            frontier = [d for d, _ in entries if d.lower() not in found]
            found.update(d.lower() for d in frontier)
        return frozenset(found)

    # -- connections ----------------------------------------------------------------------------
    def _server(self, url: str) -> ldap3.Server:
        settings = self.settings
        tls = None
        if url.lower().startswith("ldaps://") or settings.start_tls:
            tls = ldap3.Tls(
                validate=ssl.CERT_REQUIRED,
                version=ssl.PROTOCOL_TLS_CLIENT,
                ca_certs_data=settings.ca_pem,
            )
        return ldap3.Server(url, tls=tls, connect_timeout=settings.timeout_seconds, get_info=ldap3.NONE)

    def _new_connection(self, user: str | None, password: str | None) -> ldap3.Connection:
        """Open, secure and bind a connection, trying each server in turn."""
        settings = self.settings
        errors = []
        for server in self._servers:
            conn = ldap3.Connection(
                server, user=user, password=password, receive_timeout=settings.timeout_seconds,
                auto_bind=ldap3.AUTO_BIND_NONE, raise_exceptions=False, read_only=True,
            )
            try:
                conn.open()
                _no_delay(conn)
                if settings.start_tls and not server.ssl:
                    if not conn.start_tls():
                        raise DirectoryUnavailable(f"{server.name}: StartTLS refused")
                if user is not None and not conn.bind():
                    if conn.result.get("result") == 49:
                        raise _WrongPassword()
                    raise DirectoryUnavailable(f"{server.name}: bind refused ({conn.result.get('description')})")
            except _WrongPassword:
                _quietly_unbind(conn)
                raise
            except (ldap_errors.LDAPException, OSError, ssl.SSLError, DirectoryUnavailable) as e:
                _quietly_unbind(conn)
                errors.append(f"{server.name}: {_describe(e)}")
                continue
            with self._lock:
                if self._closed:
                    _quietly_unbind(conn)
                    raise DirectoryUnavailable("the directory settings were replaced")
                self._open.append(conn)
            return conn
        raise DirectoryUnavailable("; ".join(errors) or "no directory server configured")

    def _connection(self, kind: str) -> ldap3.Connection:
        conn = getattr(self._local, kind, None)
        if conn is not None and not conn.closed:
            return conn
        settings = self.settings
        if kind == "search":
            try:
                conn = self._new_connection(settings.bind_dn, settings.bind_password)
            except _WrongPassword:
                raise DirectoryUnavailable("the search account's bind DN or password is wrong") from None
        else:
            conn = self._new_connection(None, None)
        setattr(self._local, kind, conn)
        return conn

    def _drop(self, kind: str) -> None:
        conn = getattr(self._local, kind, None)
        setattr(self._local, kind, None)
        if conn is not None:
            _quietly_unbind(conn)
            with self._lock:
                if conn in self._open:
                    self._open.remove(conn)

    def _search(self, base: str, query: str, attributes: list[str], *, size_limit: int) -> list[tuple[str, dict]]:
        for attempt in (1, 2):
            conn = self._connection("search")
            try:
                ok = conn.search(base, query, search_scope=ldap3.SUBTREE, attributes=attributes,
                                 size_limit=size_limit, time_limit=int(max(1, self.settings.timeout_seconds)))
            except (ldap_errors.LDAPException, OSError, ssl.SSLError) as e:
                # A pooled connection the server has closed: one retry on a fresh one.
                self._drop("search")
                if attempt == 2:
                    raise DirectoryUnavailable(f"search failed: {_describe(e)}") from None
                continue
            code = conn.result.get("result")
            if not ok and code not in (0, 4, 32):  # success, size limit exceeded, no such object
                self._drop("search")
                if attempt == 2:
                    raise DirectoryUnavailable(f"search refused: {conn.result.get('description')}")
                continue
            return [(e["dn"], e.get("attributes", {})) for e in conn.response or () if e.get("type") == "searchResEntry"]
        return []

    def _bind_as(self, dn: str, password: str) -> bool:
        for attempt in (1, 2):
            conn = self._connection("auth")
            try:
                ok = conn.rebind(user=dn, password=password)
            except ldap_errors.LDAPBindError:
                return False
            except (ldap_errors.LDAPException, OSError, ssl.SSLError) as e:
                self._drop("auth")
                if attempt == 2:
                    raise DirectoryUnavailable(f"bind failed: {_describe(e)}") from None
                continue
            if ok:
                return True
            if conn.result.get("result") == 49:  # invalidCredentials
                return False
            self._drop("auth")
            if attempt == 2:
                raise DirectoryUnavailable(f"bind refused: {conn.result.get('description')}")
        return False


class _WrongPassword(Exception):
    pass


def _no_delay(conn: ldap3.Connection) -> None:
    # Without TCP_NODELAY every exchange on a TLS connection waits ~40 ms for delayed ACKs.
    sock = getattr(conn, "socket", None)
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


def _quietly_unbind(conn: ldap3.Connection) -> None:
    try:
        conn.unbind()
    except Exception:
        pass


def _describe(error: BaseException) -> str:
    text = str(error) or type(error).__name__
    return text[:200]


def group_names(dns: Iterable[str]) -> list[str]:
    """The first RDN value of each group DN (cn=staff,ou=groups,... -> staff), for records."""
    out = []
    for dn in dns:
        first = dn.split(",", 1)[0]
        out.append(first.partition("=")[2] or first)
    return sorted(out)


__all__ = ["DirectorySettings", "DirectoryUnavailable", "DirectoryUser", "LdapDirectory", "group_names"]
