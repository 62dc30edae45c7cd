"""A policy version compiled into look-up tables, and the decision for one request.

`CompiledPolicy` is built once per version and shared by every request under it; its only
changing parts are memo tables (host and client look-ups, verified credentials) that depend on
nothing but the version itself, so a request in flight can keep using an old version safely.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import attrs

from safesquid_tw.identity.authenticator import DirectoryAuthenticator
from safesquid_tw.policy.antivirus import AntivirusRules
from safesquid_tw.policy.classify import ApplicationIndex, CategoryIndex
from safesquid_tw.policy.content import ContentRules
from safesquid_tw.policy.credentials import Credentials
from safesquid_tw.policy.dlp import DlpRules
from safesquid_tw.policy.forwarding import Forwarding
from safesquid_tw.policy.hosts import normalise_host, suffixes
from safesquid_tw.policy.incremental import reuse_or_build
from safesquid_tw.policy.model import CachedIdentity, Decision, Identity, RequestFacts
from safesquid_tw.policy.networks import NetworkSet, parse_address
from safesquid_tw.policy.rules import CompiledRule, RuleTable, full_url
from safesquid_tw.policy.tlsinspection import compile_tls_inspection

# Memo tables are cleared when they reach this size: a working set of hosts and clients stays
# fast, and a scan over millions of names cannot grow memory without bound.
_MEMO_LIMIT = 65536
# Kept decisions (`CompiledPolicy.decide`): keyed by path too, so kept fewer (a few MB at most).
_DECISION_MEMO_LIMIT = 4096


class CompiledPolicy:
    def __init__(self, document: dict[str, Any], previous: CompiledPolicy | None = None) -> None:
        # The big pieces of a version whose sections equal the previous version's are taken from
        # it as they are: they depend on nothing else (policy/incremental.py).
        before = previous._pieces if previous is not None else None
        self._pieces: dict[str, tuple[Any, Any]] = {}
        access = document["access"]
        self.default_action: str = access["default_action"]
        self._default_reason = f"no rule matched; the default action is {self.default_action}"
        self._rules = reuse_or_build(before, self._pieces, "rules", access["rules"], RuleTable)
        self.rule_names = tuple(rule.name for rule in self._rules.rules)
        self._categories = reuse_or_build(before, self._pieces, "categories", document["categories"], CategoryIndex)
        self._applications = reuse_or_build(before, self._pieces, "applications", document["applications"],
                                            ApplicationIndex)
        authentication = document["authentication"]
        self.auth_enabled: bool = authentication["enabled"]
        self.realm: str = authentication["realm"]
        self._exempt = NetworkSet(authentication["exempt_networks"])
        self._credentials = Credentials(document["users"])
        self._local_users = frozenset(u["name"] for u in document["users"])
        self.directory = DirectoryAuthenticator.from_policy(document)
        self.negotiate: bool = authentication.get("negotiate", False)
        self.connect_ports: frozenset[int] = frozenset(document["connect"]["allowed_ports"])
        self.content = ContentRules(document["content_security"])
        self.dlp = DlpRules(document["dlp"])
        self.tls_inspection = compile_tls_inspection(document)
        self.antivirus = AntivirusRules.from_section(document.get("antivirus"))
        self._no_application_mask = self._rules.application_mask(None)
        # host -> (normalised host, categories, rules its host satisfies, application candidates)
        self._hosts: dict[str, tuple[str, tuple[str, ...], int, tuple[int, ...]]] = {}
        # client address -> (rules its address satisfies, exempt from authentication)
        self._clients: dict[str, tuple[int, bool]] = {}
        self._ports: dict[int, int] = {}
        self.forwarding = Forwarding(document.get("forwarding", {}))
        self.uses_tls_condition: bool = self._rules.tls_conditioned  # some rule matches on `tls`
        # Decisions by every fact they can depend on, except headers (read only for hosts with
        # application candidates) and the time (read only by a rule with a schedule): a decision
        # that read either is not kept. See `decide`.
        self._decisions: dict[tuple, Decision] = {}

    # -- memo tables -------------------------------------------------------------------------

    def _host(self, raw_host: str) -> tuple[str, tuple[str, ...], int, tuple[int, ...]]:
        found = self._hosts.get(raw_host)
        if found is None:
            host = normalise_host(raw_host)
            chain = suffixes(host)
            categories = self._categories.lookup(chain)
            found = (host, categories, self._rules.host_mask(chain, categories), self._applications.candidates(chain))
            if len(self._hosts) >= _MEMO_LIMIT:
                self._hosts.clear()
            self._hosts[raw_host] = found
        return found

    def _client(self, client_ip: str) -> tuple[int, bool]:
        found = self._clients.get(client_ip)
        if found is None:
            address = parse_address(client_ip)
            found = (self._rules.client_mask(address), self._exempt.contains_address(address))
            if len(self._clients) >= _MEMO_LIMIT:
                self._clients.clear()
            self._clients[client_ip] = found
        return found

    def _port(self, port: int) -> int:
        found = self._ports.get(port)
        if found is None:
            found = self._ports[port] = self._rules.port_mask(port)
        return found

    # -- classification ----------------------------------------------------------------------

    def categories_of(self, host: str) -> tuple[str, ...]:
        return self._host(host)[1]

    def category_of(self, host: str) -> str | None:
        categories = self._host(host)[1]
        return categories[0] if categories else None

    def application_of(self, facts: RequestFacts) -> str | None:
        candidates = self._host(facts.host)[3]
        if not candidates:
            return None
        return self._applications.first_match(candidates, facts.path, facts.headers)

    # -- access decision ---------------------------------------------------------------------

    def known_decision(self, host: str, method: str, port: int, client_ip: str, user: str | None,
                       groups: frozenset[str], tls: str | None, scheme: str, path: str) -> Decision | None:
        """The decision `decide` kept for facts with these values (whatever their headers and
        time: it keeps only decisions that read neither), or None: then build the facts and
        call `decide`. Saves the request path building facts for a repeat."""
        try:
            return self._decisions.get((host, method, port, client_ip, user, groups, tls, scheme, path))
        except TypeError:  # groups given as a mutable set
            return None

    def decide(self, facts: RequestFacts) -> Decision:
        host, categories, mask, app_candidates = self._host(facts.host)
        key = None
        if not app_candidates:  # the decision reads no header: a repeat may reuse it
            key = (facts.host, facts.method, facts.port, facts.client_ip, facts.user, facts.groups, facts.tls,
                   facts.scheme, facts.path)  # the order of known_decision's arguments
            try:
                known = self._decisions.get(key)
            except TypeError:  # groups given as a mutable set: decided without the memo
                key = known = None
            if known is not None:
                return known
        timed = False  # a schedule was consulted: the decision depends on the time
        application = None
        if app_candidates:
            application = self._applications.first_match(app_candidates, facts.path, facts.headers)
        table = self._rules
        if mask:
            mask &= self._no_application_mask if application is None else table.application_mask(application)
        if mask:
            mask &= table.method_mask(facts.method)
        if mask:
            mask &= self._port(facts.port)
        if mask:
            mask &= self._client(facts.client_ip)[0]
        if mask:
            mask &= table.identity_mask(facts.user, facts.groups)
        if mask and table.tls_conditioned:
            mask &= table.tls_mask(facts.tls)
        url: str | None = None
        now: datetime | None = None
        if mask & table.url_mask and table.url_union is not None:
            scheme = facts.scheme or ("https" if facts.method == "CONNECT" else "http")
            url = full_url(scheme, host, facts.port, facts.path)
            prefilter = table.url_prefilter
            if (prefilter is not None and prefilter.search(url) is None) or table.url_union.match(url) is None:
                mask &= ~table.url_mask
        while mask:
            lowest = mask & -mask
            rule = table.rules[lowest.bit_length() - 1]
            if lowest & table.needs_check:
                if rule.url_regex is not None:
                    if url is None:
                        scheme = facts.scheme or ("https" if facts.method == "CONNECT" else "http")
                        url = full_url(scheme, host, facts.port, facts.path)
                    if not rule.url_regex.match(url):
                        mask ^= lowest
                        continue
                if rule.schedule is not None:
                    timed = True
                    if now is None:
                        now = _aware_now(facts.now)
                    if not rule.schedule.active(now):
                        mask ^= lowest
                        continue
            decision = Decision(rule.action, rule.name, rule.reason, _reported_category(rule, categories), application)
            break
        else:
            decision = Decision(
                self.default_action, None, self._default_reason, categories[0] if categories else None, application
            )
        if key is not None and not timed:
            decisions = self._decisions
            if len(decisions) >= _DECISION_MEMO_LIMIT:
                decisions.clear()
            decisions[key] = decision
        return decision

    # -- authentication ----------------------------------------------------------------------

    def auth_required(self, client_ip: str) -> bool:
        """Whether this client must send proxy credentials (authentication on, client not exempt)."""
        return self.auth_enabled and not self._client(client_ip)[1]

    def cached_identity(self, user: str, password: str) -> CachedIdentity:
        """Fast: the identity, None for a pair known to be wrong, or MISS (verify it in a thread)."""
        if self.directory is not None and user not in self._local_users:
            return self.directory.cached(user, password)
        return self._credentials.cached(user, password)

    def verify_credentials(self, user: str, password: str) -> Identity | None:
        """Slow (argon2id, or a bind to the directory) and thread-safe: run it off the reactor
        thread. Local users are checked first; other names go to the directory, if there is one.
        Raises DirectoryUnavailable when the directory does not answer."""
        if self.directory is not None and user not in self._local_users:
            return self.directory.verify(user, password)
        return self._credentials.verify(user, password)

    def principal_identity(self, user: str, principal: str) -> Identity | None:
        """The identity of a Kerberos principal: from the directory when there is one (blocking:
        call it from a thread), else a local user of that name, else the name without groups."""
        if self.directory is not None:
            return self.directory.for_principal(user, principal)
        return self._credentials.identity(user) or Identity(user=user, groups=frozenset())

    def identity(self, user: str) -> Identity | None:
        """The user's identity under this version, without checking any password."""
        return self._credentials.identity(user)

    def inherit_from(self, previous: CompiledPolicy) -> None:
        """Carry verified credentials over from the version this one replaces."""
        self._credentials.inherit(previous._credentials)
        if self.directory is not None and previous.directory is not None:
            self.directory.adopt(previous.directory)


def _aware_now(now: datetime | float | None) -> datetime:
    if now is None:
        return datetime.now(timezone.utc)
    if isinstance(now, (int, float)):
        return datetime.fromtimestamp(now, timezone.utc)
    if now.tzinfo is None:
        return now.replace(tzinfo=timezone.utc)
    return now


def _reported_category(rule: CompiledRule, categories: tuple[str, ...]) -> str | None:
    # A rule that matched on a category reports that category, even when the host is in others.
    if rule.categories:
        for name in categories:
            if name in rule.categories:
                return name
    return categories[0] if categories else None


def compile_policy(document: dict[str, Any], previous: CompiledPolicy | None = None) -> CompiledPolicy:
    """Compile a validated (canonical) document; with `previous` (the version it replaces), its
    unchanged sections' compiled pieces are reused (exactly what compiling them again gives)."""
    return CompiledPolicy(document, previous)


@attrs.frozen(eq=False)
class Policy:
    """One version of the policy: its number, digest, canonical document and compiled form.

    Compared by identity: two versions are the same policy when their digests are equal.
    """

    version: int
    digest: str
    document: dict[str, Any] = attrs.field(repr=False)
    compiled: CompiledPolicy = attrs.field(repr=False)


__all__ = ["CompiledPolicy", "Policy", "compile_policy"]
