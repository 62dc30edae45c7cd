"""The portal's own state, built once per site: accounts, sessions, tokens, drafts, audit log."""

from __future__ import annotations

import time
from typing import Any, Callable

import argon2
import attrs
from twisted.internet import defer
from twisted.logger import Logger

from safesquid_tw.portal.accounts import AccountStore
from safesquid_tw.portal.allowlist import PortalAllowList
from safesquid_tw.portal.audit import AuditLog
from safesquid_tw.portal.context import PortalContext
from safesquid_tw.portal.drafts import DraftStore
from safesquid_tw.portal.refusals import RefusedLogins
from safesquid_tw.portal.sessions import SessionStore
from safesquid_tw.portal.throttle import LoginThrottle
from safesquid_tw.portal.tokens import TokenStore
from safesquid_tw.portal.worklimit import WorkLimiter, niced_pool

log = Logger()

PASSWORD_CHECKS = 2
PASSWORD_QUEUE = 8
HEAVY_JOBS = 2
HEAVY_QUEUE = 16


@attrs.define
class PortalServices:
    ctx: PortalContext
    accounts: AccountStore
    sessions: SessionStore
    throttle: LoginThrottle
    tokens: TokenStore
    audit: AuditLog
    drafts: DraftStore
    allow: PortalAllowList
    # Heavy work in worker threads, a few at a time (worklimit.py); built in create().
    passwords: WorkLimiter | None = None
    refusals: RefusedLogins | None = None
    heavy: WorkLimiter | None = None
    # One edit at a time per account, so two browser tabs cannot lose each other's draft edits.
    draft_locks: dict[str, defer.DeferredLock] = attrs.field(factory=dict)

    @classmethod
    def create(cls, ctx: PortalContext, *, admin_hasher: argon2.PasswordHasher | None = None) -> "PortalServices":
        wall = ctx.wall_clock or time.time
        accounts = AccountStore(ctx.state_dir, hasher=admin_hasher, clock=wall)
        created = accounts.ensure_initial_admin()
        if created is not None:
            log.info(
                "portal: created the administrator account 'admin'; its password is in {path} (mode 0600)",
                path=str(created),
            )
        reactor_clock = ctx.reactor.seconds
        services = cls(
            ctx=ctx,
            accounts=accounts,
            sessions=SessionStore(reactor_clock),
            throttle=LoginThrottle(reactor_clock),
            tokens=TokenStore(ctx.state_dir, clock=wall),
            audit=AuditLog(ctx.state_dir, clock=wall),
            drafts=DraftStore(ctx.state_dir, clock=wall),
            allow=PortalAllowList(ctx.store),
        )
        # argon2id costs 64 MiB and tens of milliseconds per check: two at a time node-wide, in
        # low-priority threads of their own, a short queue, and "busy" past it, however many
        # logins arrive at once.
        # Own threads at a lower priority for hashing, unless the context runs work itself (tests).
        hashing = ctx.run_in_thread if ctx.in_thread is not None else niced_pool(
            ctx.reactor, "portal-passwords", PASSWORD_CHECKS)
        services.passwords = WorkLimiter(hashing, concurrency=PASSWORD_CHECKS, max_waiting=PASSWORD_QUEUE)
        services.refusals = RefusedLogins(services.audit, ctx.reactor, ctx.run_in_thread)
        services.heavy = WorkLimiter(ctx.run_in_thread, concurrency=HEAVY_JOBS, max_waiting=HEAVY_QUEUE)
        return services

    def now(self) -> float:
        """Wall-clock time (audit lines, report periods)."""
        return (self.ctx.wall_clock or time.time)()

    def in_thread(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> defer.Deferred:
        return self.ctx.run_in_thread(fn, *args, **kwargs)

    def draft_lock(self, account: str) -> defer.DeferredLock:
        lock = self.draft_locks.get(account)
        if lock is None:
            lock = self.draft_locks[account] = defer.DeferredLock()
        return lock


__all__ = ["PortalServices"]
