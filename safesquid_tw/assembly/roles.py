"""What each role is made of, in one place.

- standalone: NodeBase + proxy parts (assembly/proxynode.py) + policy file + own report store
  (assembly/standalone.py)
- slave: NodeBase + proxy parts + cluster link to the master (assembly/slave.py)
- master: NodeBase + policy file/history + control plane + report store, no proxy
  (assembly/master.py)

Every builder takes the NodeConfig and the reactor and returns the node's top MultiService.
"""

from __future__ import annotations

from typing import Callable, Protocol

from twisted.application.service import MultiService

from safesquid_tw.config import NodeConfig


class RoleBuilder(Protocol):
    def __call__(self, config: NodeConfig, reactor) -> MultiService: ...


def _master(config: NodeConfig, reactor) -> MultiService:
    from safesquid_tw.assembly.master import build_master

    return build_master(config, reactor)


def _slave(config: NodeConfig, reactor) -> MultiService:
    from safesquid_tw.assembly.slave import build_slave

    return build_slave(config, reactor)


def _standalone(config: NodeConfig, reactor) -> MultiService:
    from safesquid_tw.assembly.standalone import build_standalone

    return build_standalone(config, reactor)


# Imported on use: a master never loads the proxy, a slave never the control-plane server.
ROLES: dict[str, RoleBuilder | Callable[[NodeConfig, object], MultiService]] = {
    "standalone": _standalone,
    "slave": _slave,
    "master": _master,
}


def build_node_service(config: NodeConfig, reactor=None) -> MultiService:
    """The whole node for its role."""
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    return ROLES[config.role](config, reactor)
