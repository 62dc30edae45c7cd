"""Why an identity could not be established (kept apart so the front door imports no LDAP code)."""


class DirectoryUnavailable(Exception):
    """No directory server answered (down, unreachable, TLS failure, timeout, search refused)."""


class NegotiateError(Exception):
    """The token could not be accepted (bad token, wrong principal, expired or replayed ticket)."""


__all__ = ["DirectoryUnavailable", "NegotiateError"]
