"""Portal login sessions, kept in memory on the server: the cookie holds only a random id.

twisted.web's own sessions are not used: their cookie has neither HttpOnly nor SameSite, and
they expire on idleness alone. Here a session ends after `idle_timeout` without a request, or
`absolute_timeout` after login whatever happens, or at logout. Each session has its own CSRF
token, which every form carries back. A node restart ends every session (they live in memory).
"""

from __future__ import annotations

import secrets
from typing import Callable

import attrs

COOKIE_NAME = b"safesquid_session"
IDLE_TIMEOUT = 30 * 60.0
ABSOLUTE_TIMEOUT = 12 * 3600.0
MAX_SESSIONS = 10000
MAX_FLASHES = 10


@attrs.define
class Session:
    id: str
    account: str
    csrf: str
    address: str
    created: float
    last_seen: float
    flashes: list[tuple[str, str]] = attrs.field(factory=list)  # (kind, text) for the next page

    def flash(self, kind: str, text: str) -> None:
        """A message for the next page this session sees ("ok", "error" or "info")."""
        self.flashes.append((kind, text))
        del self.flashes[:-MAX_FLASHES]

    def take_flashes(self) -> list[tuple[str, str]]:
        taken, self.flashes = self.flashes, []
        return taken


def new_secret() -> str:
    """256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


class SessionStore:
    def __init__(
        self,
        clock: Callable[[], float],
        *,
        idle_timeout: float = IDLE_TIMEOUT,
        absolute_timeout: float = ABSOLUTE_TIMEOUT,
        max_sessions: int = MAX_SESSIONS,
    ) -> None:
        self._clock = clock
        self.idle_timeout = idle_timeout
        self.absolute_timeout = absolute_timeout
        self.max_sessions = max_sessions
        self._sessions: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, account: str, address: str) -> Session:
        now = self._clock()
        self._expire(now)
        if len(self._sessions) >= self.max_sessions:
            # The oldest goes: a flood of logins cannot grow the store without bound.
            oldest = min(self._sessions.values(), key=lambda s: s.last_seen)
            del self._sessions[oldest.id]
        session = Session(id=new_secret(), account=account, csrf=new_secret(), address=address,
                          created=now, last_seen=now)
        self._sessions[session.id] = session
        return session

    def get(self, session_id: str | None) -> Session | None:
        """The live session with this id (its idle timer restarts), or None."""
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        if session is None:
            return None
        now = self._clock()
        if self._expired(session, now):
            del self._sessions[session_id]
            return None
        session.last_seen = now
        return session

    def end(self, session_id: str) -> None:
        self._sessions.pop(session_id, None)

    def end_account(self, account: str, *, keep: str | None = None) -> int:
        """End every session of `account` (password changed, account removed), but `keep`."""
        doomed = [s.id for s in self._sessions.values() if s.account == account and s.id != keep]
        for session_id in doomed:
            del self._sessions[session_id]
        return len(doomed)

    def _expired(self, session: Session, now: float) -> bool:
        return now - session.last_seen >= self.idle_timeout or now - session.created >= self.absolute_timeout

    def _expire(self, now: float) -> None:
        for session in [s for s in self._sessions.values() if self._expired(s, now)]:
            del self._sessions[session.id]


__all__ = ["ABSOLUTE_TIMEOUT", "COOKIE_NAME", "IDLE_TIMEOUT", "Session", "SessionStore", "new_secret"]
