"""Putting TLS inspection into a node: the CA store, the leaf cache and its minting threads,
verified origin TLS, and the interceptor the front door asks about every allowed CONNECT."""

from __future__ import annotations

from pathlib import Path

from twisted.application.service import Service
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool

from safesquid_tw.proxy.intercept.ca import CAError, CAStore, InspectionCA
from safesquid_tw.proxy.intercept.mint import LeafCache
from safesquid_tw.proxy.intercept.session import Interceptor
from safesquid_tw.proxy.intercept.upstream_tls import UpstreamTLS

log = Logger()

MINT_THREADS = 4


def open_ca_store(root: Path, node_name: str, *, create: bool) -> CAStore:
    """The node's CA store; a master or standalone node creates its CA on first start. A damaged
    CA is reported and left in place (an administrator replaces it); inspection stays off."""
    store = CAStore(root)
    try:
        if create:
            ca = store.load_or_create(f"safesquid-tw inspection CA ({node_name})"[:64])
            log.info("inspection CA {subject}, SHA-256 {fp}", subject=ca.subject, fp=ca.fingerprint)
        else:
            ca = store.load()
            if ca is not None:
                log.info("inspection CA {subject} (from the master), SHA-256 {fp}", subject=ca.subject, fp=ca.fingerprint)
    except (CAError, OSError) as e:
        log.error("the inspection CA in {dir} cannot be used: {error}; TLS inspection is off until it is replaced",
                  dir=str(store.dir), error=str(e))
    return store


class MintPoolService(Service):
    name = "tls-mint-pool"

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self):
        super().stopService()
        self.pool.stop()


def install_interception(factory, reactor, ca_store: CAStore, policy_store, *, upstream_ca_file: str | None) -> Service:
    """Give the proxy factory its interceptor and verified origin TLS; returns the service that
    owns the minting threads (add it to the node)."""
    pool = ThreadPool(minthreads=0, maxthreads=MINT_THREADS, name="safesquid-mint")
    leaves = LeafCache(reactor, pool)

    def ca_changed(ca: InspectionCA) -> None:
        leaves.set_ca(ca)

    ca_store.add_observer(ca_changed)
    if ca_store.current is not None:
        leaves.set_ca(ca_store.current)

    def tolerated(host: str) -> bool:
        policy = policy_store.current
        return policy is not None and policy.compiled.tls_inspection.allows_invalid_certificate(host)

    factory.pool.tls = UpstreamTLS(upstream_ca_file, tolerated=tolerated)
    factory.intercept = Interceptor(reactor, leaves, factory.limits)
    return MintPoolService(pool)


__all__ = ["install_interception", "open_ca_store"]
