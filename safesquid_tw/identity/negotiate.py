"""Kerberos proxy authentication: SPNEGO tokens (`Proxy-Authorization: Negotiate ...`).

The node accepts tickets for one service principal (`--service-principal HTTP/proxy.example.com`,
the name clients use for the balancer, shared by every node behind it) from a node-local keytab
(`--keytab`). Kerberos configuration comes the usual way (KRB5_CONFIG). Accepting a token reads
the keytab and may touch the replay cache on disk, so it runs in a worker thread.
"""

from __future__ import annotations

import base64
import binascii
import threading

import attrs

from safesquid_tw.identity.errors import NegotiateError


@attrs.frozen
class AcceptedToken:
    principal: str  # user@REALM
    reply: bytes | None  # the mutual-authentication token for the client, if any

    @property
    def user(self) -> str:
        """The principal's name before @REALM (what `{user}` means in the directory filter)."""
        return self.principal.rpartition("@")[0] or self.principal


def negotiate_token(value: bytes | None) -> bytes | None:
    """The raw SPNEGO token of a `Negotiate <base64>` field, or None for any other scheme."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(b" ")
    if scheme.lower() != b"negotiate":
        return None
    try:
        raw = base64.b64decode(token.strip(), validate=True)
    except binascii.Error:
        return None
    return raw or None


class NegotiateAcceptor:
    """Accepts single-leg Kerberos SPNEGO tokens for one service principal from a keytab."""

    def __init__(self, keytab: str, service_principal: str) -> None:
        import gssapi  # imported here: nodes without Kerberos never load the library

        self._gssapi = gssapi
        self.service_principal = service_principal
        if "@" in service_principal:  # HTTP/proxy.example.com@REALM: a full principal name
            name = gssapi.Name(service_principal, gssapi.NameType.kerberos_principal)
        else:  # HTTP/proxy.example.com: the service on that host, in the default realm
            name = gssapi.Name(service_principal.replace("/", "@", 1), gssapi.NameType.hostbased_service)
        self._creds = gssapi.Credentials(name=name, usage="accept", store={"keytab": keytab})
        self._lock = threading.Lock()

    def accept(self, token: bytes) -> AcceptedToken:
        gssapi = self._gssapi
        try:
            context = gssapi.SecurityContext(creds=self._creds, usage="accept")
            reply = context.step(token)
            complete = context.complete  # python-gssapi may raise a step's error only here
            principal = str(context.initiator_name) if complete else None
        except gssapi.exceptions.GSSError as e:
            raise NegotiateError(_gss_message(e)) from None
        if principal is None:
            # Kerberos through SPNEGO completes in one leg; anything longer (NTLM) is not offered.
            raise NegotiateError("the Negotiate exchange needs more than one step (NTLM is not supported)")
        return AcceptedToken(principal=principal, reply=reply)


def _gss_message(error: Exception) -> str:
    text = " ".join(str(error).split())
    return text[:300]


__all__ = ["AcceptedToken", "NegotiateAcceptor", "NegotiateError", "negotiate_token"]
