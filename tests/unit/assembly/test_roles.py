"""The role list and the node's policy state: what assembly/ builds."""

from __future__ import annotations

import subprocess
import sys

from twisted.internet.task import Clock

from safesquid_tw.assembly.base import state_follows_store
from safesquid_tw.assembly.roles import ROLES
from safesquid_tw.nodestate import NodeState
from safesquid_tw.policy.store import PolicyStore, source_kind

DOC = {"format": "safesquid-policy/1", "access": {"default_action": "allow", "rules": []}}


def test_every_role_has_one_builder():
    assert set(ROLES) == {"standalone", "slave", "master"}


def test_each_role_module_imports_on_its_own_without_a_cycle():
    """Each module imported first in a fresh interpreter: a cycle would fail one of them."""
    for module in ("safesquid_tw.assembly.master", "safesquid_tw.assembly.slave",
                   "safesquid_tw.assembly.standalone", "safesquid_tw.assembly.roles", "safesquid_tw.tap"):
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True)


def test_a_master_never_loads_the_proxy_assembly():
    code = ("import sys, safesquid_tw.assembly.master; "
            "assert 'safesquid_tw.assembly.proxynode' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_source_kind_names_who_set_the_policy():
    assert source_kind(None) is None
    assert source_kind("master") == "master"
    assert source_kind("master", from_cache=True) == "cache"
    assert source_kind("file /etc/p.json") == "file"
    assert source_kind("portal") == "portal"
    assert source_kind("rollback 3") == "portal"


def test_state_follows_store_from_cache_then_master(tmp_path):
    clock = Clock()
    clock.advance(50)
    store = PolicyStore(tmp_path)
    state = NodeState(role="slave", node="n1")
    state_follows_store(state, store, now=clock.seconds)
    store.apply_document(DOC, source="master")
    assert (state.policy_version, state.policy_source, state.policy_since) == (1, "master", 50)

    again = PolicyStore(tmp_path)
    state2 = NodeState(role="slave", node="n1")
    state_follows_store(state2, again, now=clock.seconds)
    again.load_cache()
    assert (state2.policy_version, state2.policy_source) == (1, "cache")
