"""A slave: the forward proxy with its policy from its master (starting from its cache), its
records shipped to the master, and the master's tasks (drain, resume, reload) carried out."""

from __future__ import annotations

from twisted.application.service import MultiService
from twisted.logger import Logger

from safesquid_tw import __version__
from safesquid_tw.assembly.base import NodeBase
from safesquid_tw.assembly.proxynode import ProxyParts, build_proxy_parts, finish_proxy_node
from safesquid_tw.config import NodeConfig, read_activation_key
from safesquid_tw.identity.watch import directory_summary, summary_of
from safesquid_tw.metrics.collectors import MasterLinkCollector
from safesquid_tw.proxy.service import ProxyFactory

log = Logger()


class RateMeter:
    """Requests per second between two status reports."""

    def __init__(self, reactor, factory: ProxyFactory, directory=None) -> None:
        self.reactor = reactor
        self.factory = factory
        self.directory = directory  # the merged /health directory figures, on a node with workers
        self._last = (reactor.seconds(), 0)

    def sample(self) -> dict:
        now, total = self.reactor.seconds(), self.factory.requests
        then, before = self._last
        self._last = (now, total)
        rate = (total - before) / (now - then) if now > then else 0.0
        return {"requests_total": total, "requests_per_second": round(rate, 2),
                "directory": summary_of(self.directory()) if self.directory is not None
                else directory_summary(self.factory.current_policy)}


def listen_interface(endpoint: str) -> str | None:
    """The address a `tcp:PORT:interface=ADDR` endpoint names, unless it is a wildcard.

    A slave's control-plane connection leaves from the address its proxy listens on, so the
    master's allow list and cluster view see the node's own address."""
    for part in endpoint.replace("\\:", "\0").split(":")[1:]:
        if part.startswith("interface="):
            address = part[len("interface="):].replace("\0", ":")
            return None if address in ("", "0.0.0.0", "::") else address
    return None


def build_slave(config: NodeConfig, reactor) -> MultiService:
    base = NodeBase.create(config, reactor)
    parts = build_proxy_parts(base)
    _cluster_link(base, parts)
    return finish_proxy_node(base, parts)


def _cluster_link(base: NodeBase, parts: ProxyParts) -> None:
    from safesquid_tw.cluster.ca_sync import SlaveCASync
    from safesquid_tw.cluster.keyproof import ClusterKey, NodeVersion
    from safesquid_tw.cluster.slave_side import ClusterClient
    from safesquid_tw.cluster.tlsconfig import MasterTrust

    config, reactor, state = base.config, base.reactor, base.state

    def cache_loaded(loaded: bool) -> None:
        if loaded:
            log.info(
                "serving cached policy version {version} until the master at {master} answers",
                version=state.policy_version, master=config.master,
            )
        else:
            log.warn(
                "no cached policy: this node refuses to proxy (and /health says 503) until the master at "
                "{master} sends one",
                master=config.master,
            )

    base.cached_policy_service(cache_loaded).setServiceParent(base.top)
    proxy = parts.proxy

    def on_task(task: str) -> str:
        if task == "drain":
            return proxy.drain()
        if task == "resume":
            return proxy.resume()
        return "reloading the policy from the master"

    client = ClusterClient(
        reactor=reactor,
        master=config.master,
        key=ClusterKey.from_activation_key(read_activation_key(config.activation_key_file)),
        version=NodeVersion(__version__),
        node_name=config.node_name,
        trust=MasterTrust.for_state_dir(base.root, pinned=config.master_fingerprint),
        store=base.store,
        state=state,
        shipper=parts.shipper,
        status_extra=RateMeter(reactor, parts.factory, directory=state.health_parts["directory"]
                               if "workers" in state.health_parts else None).sample,
        on_task=on_task,
        keepalive=config.keepalive,
        poll_interval=config.poll_interval,
        source_address=listen_interface(config.listen),
    )
    client.setServiceParent(base.top)
    base.top.cluster_client = client
    state.health_parts["master"] = client.master_health
    base.metrics.register(MasterLinkCollector(client, now=client.wall_clock))
    SlaveCASync(client, base.top.ca_store)
    base.reloads.add("ask the master for its policy version", client.recheck)
