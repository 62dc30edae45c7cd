"""The TLS inspection CA across the cluster: the master's CA (certificate and key) reaches each
slave over the authenticated, encrypted control plane, like a policy version.

The slave compares fingerprints whenever it compares policy versions (on connect, on the slow
poll, on the reload task) and when the master announces a replaced CA; it fetches the bundle
only when the fingerprint differs, checks it, stores it 0600 in its own state dir and uses it
from the next tunnel on. The key is never logged: only the certificate's fingerprint is.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger

from safesquid_tw.cluster import wire
from safesquid_tw.proxy.intercept.ca import CAError, CAStore, InspectionCA, parse_ca

log = Logger()


# -- master -----------------------------------------------------------------------------------

def master_ca_fingerprint(plane) -> str:
    store: CAStore | None = getattr(plane, "ca_store", None)
    ca = store.current if store is not None else None
    return ca.fingerprint if ca is not None else ""


def master_ca_bundle(plane, node: str) -> dict:
    store: CAStore | None = getattr(plane, "ca_store", None)
    ca = store.current if store is not None else None
    if ca is None:
        from safesquid_tw.cluster.master_side import ClusterRefused

        raise ClusterRefused("the master has no inspection CA")
    log.info("inspection CA {fp} sent to slave {node}", fp=ca.fingerprint[:16], node=node)
    return {"fingerprint": ca.fingerprint, "cert": ca.cert_pem, "key": ca.key_pem}


def announce_ca(plane, ca: InspectionCA) -> None:
    """The master's CA was replaced: tell every connected slave (each fetches it)."""
    for name, avatar in list(plane.avatars.items()):
        d = avatar._call("inspection_ca_changed", ca.fingerprint)
        d.addErrback(lambda f, name=name: log.warn("telling {node} about the new inspection CA failed: {why}",
                                                    node=name, why=f.getErrorMessage()))
    if plane.avatars:
        log.info("inspection CA {fp} announced to {n} slave(s)", fp=ca.fingerprint[:16], n=len(plane.avatars))


def attach_master(plane, store: CAStore) -> None:
    plane.ca_store = store
    store.add_observer(lambda ca: announce_ca(plane, ca))


# -- slave ------------------------------------------------------------------------------------

class SlaveCASync:
    def __init__(self, client, store: CAStore) -> None:
        self.client = client
        self.store = store
        self._running: defer.Deferred | None = None
        self._again = False
        client.extra_syncs.append(self.sync_soon)

    def sync_soon(self, why: str) -> None:
        if self._running is not None:
            self._again = True
            return
        self._running = defer.ensureDeferred(self._sync(why))
        self._running.addErrback(lambda f: log.warn("inspection CA sync failed: {why}", why=f.getErrorMessage()))
        self._running.addBoth(self._done)

    def _done(self, _ignored) -> None:
        self._running = None
        if self._again:
            self._again = False
            self.sync_soon("asked again meanwhile")

    async def _sync(self, why: str) -> None:
        fingerprint = await self.client._call("inspection_ca_fingerprint")
        wire.check_result("avatar", "inspection_ca_fingerprint", fingerprint)
        current = self.store.current
        if not fingerprint or (current is not None and current.fingerprint == fingerprint):
            return
        bundle = await self.client._call("inspection_ca")
        wire.check_result("avatar", "inspection_ca", bundle)
        try:
            ca = parse_ca(bundle["cert"], bundle["key"])
        except CAError as e:
            log.error("refused the master's inspection CA: {why}", why=str(e))
            return
        if ca.fingerprint != bundle["fingerprint"]:
            log.error("refused the master's inspection CA: its fingerprint does not match")
            return
        try:
            self.store.replace(ca)
        except OSError as e:
            log.error("cannot store the master's inspection CA: {why}", why=str(e))
            return
        log.info("inspection CA {subject} (SHA-256 {fp}) from the master is in use ({why})",
                 subject=ca.subject, fp=ca.fingerprint, why=why)


__all__ = ["SlaveCASync", "announce_ca", "attach_master", "master_ca_bundle", "master_ca_fingerprint"]
