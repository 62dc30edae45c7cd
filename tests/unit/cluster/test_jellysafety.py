"""Only plain values cross the control plane: real PB brokers, connected in memory by iosim."""

from __future__ import annotations

import datetime
import decimal

import pytest
from twisted.python.failure import Failure
from twisted.spread import pb
from twisted.spread.jelly import InsecureJelly, SecurityOptions, globalSecurity
from twisted.test import iosim

from safesquid_tw.cluster.jellysafety import (
    ClusterClientFactory,
    ClusterSecurityOptions,
    ClusterServerFactory,
    cluster_security,
)


class Unregistered:
    """A class no one registered: an attacker's payload, or a programming mistake."""

    def __init__(self):
        self.x = 1


class Root(pb.Root):
    def __init__(self):
        self.received = []

    def remote_echo(self, value):
        self.received.append(value)
        return value

    def remote_accept(self, value):
        self.received.append(value)

    def remote_fail(self):
        raise pb.Error("refused on purpose")

    def remote_crash(self):
        raise ZeroDivisionError("crashed on purpose")

    def remote_call_back(self, mind):
        self.received.append(mind)
        return mind.callRemote("greet", "from the master")

    def remote_give_object(self):
        return Unregistered()

    def remote_give_set(self):
        return {1, 2}


class Mind(pb.Referenceable):
    def __init__(self):
        self.greetings = []

    def remote_greet(self, text):
        self.greetings.append(text)
        return "thanks"


class PermissiveServerFactory(pb.PBServerFactory):
    pass


def connect(server_factory, client_factory):
    """Connect a PB client to a server in memory; returns (root reference, root, pump)."""
    client, server, pump = iosim.connectedServerAndClient(
        lambda: server_factory.buildProtocol(None), lambda: client_factory.buildProtocol(None)
    )
    roots = []
    client_factory.getRootObject().addCallback(roots.append)
    pump.flush()
    assert len(roots) == 1
    return roots[0], server_factory.root, pump, client


def settle(d, pump):
    results = []
    d.addBoth(results.append)
    pump.flush()
    assert len(results) == 1, "the call never completed"
    return results[0]


@pytest.fixture
def root():
    return Root()


def restricted(root):
    return connect(ClusterServerFactory(root), ClusterClientFactory())


PLAIN_VALUES = [
    None,
    True,
    0,
    -(2**70),
    1.5,
    b"\x00bytes",
    "tëxt",
    [1, [2, [3]]],
    (1, "two", b"three"),
    {"a": {"b": [None, False]}, "c": (1.0,)},
]


@pytest.mark.parametrize("value", PLAIN_VALUES)
def test_plain_values_round_trip(root, value):
    remote, root, pump, _ = restricted(root)
    assert settle(remote.callRemote("echo", value), pump) == value
    assert root.received == [value]


def test_shared_containers_travel_as_references(root):
    remote, root, pump, _ = restricted(root)
    shared = [1, 2]
    value = {"a": shared, "b": shared, "c": ((), ())}
    assert settle(remote.callRemote("echo", value), pump) == value


def test_a_remote_call_carrying_an_unregistered_instance_is_refused(root):
    # The sender is permissive (an attacker, or a peer with other options); the receiver is not.
    permissive = SecurityOptions()
    permissive.allowInstancesOf(Unregistered)
    remote, root, pump, _ = connect(ClusterServerFactory(root), pb.PBClientFactory(security=permissive))
    result = settle(remote.callRemote("echo", Unregistered()), pump)
    assert isinstance(result, Failure)
    assert result.check(InsecureJelly)
    assert root.received == []  # the target method never ran


@pytest.mark.parametrize(
    "value",
    [{1, 2}, frozenset([3]), datetime.datetime(2024, 1, 1), decimal.Decimal("1.5"), datetime.timedelta(1)],
)
def test_types_twisted_allows_by_default_are_refused(root, value):
    remote, root, pump, _ = connect(ClusterServerFactory(root), pb.PBClientFactory(security=globalSecurity))
    result = settle(remote.callRemote("echo", value), pump)
    assert isinstance(result, Failure) and result.check(InsecureJelly)
    assert root.received == []


@pytest.mark.parametrize("value", [Unregistered(), {1}, len, Root, pytest])
def test_the_sending_side_refuses_before_anything_leaves(root, value):
    remote, root, pump, client = restricted(root)
    results = []
    remote.callRemote("echo", {"payload": value}).addBoth(results.append)
    # Failed at once, locally, with nothing written to the connection.
    assert len(results) == 1 and isinstance(results[0], Failure) and results[0].check(InsecureJelly)
    assert client.transport.getOutBuffer() is None
    pump.flush()
    assert root.received == []


def test_an_answer_the_caller_refuses_fails_the_call_and_closes_the_connection(root):
    remote, root, pump, client = connect(PermissiveServerFactory(root, security=globalSecurity), ClusterClientFactory())
    result = settle(remote.callRemote("give_set"), pump)
    assert isinstance(result, Failure) and result.check(InsecureJelly)
    assert client.disconnected


def test_an_unjellyable_answer_is_caught_by_the_answering_side(root):
    remote, root, pump, _ = restricted(root)
    result = settle(remote.callRemote("give_object"), pump)
    assert isinstance(result, Failure) and result.check(InsecureJelly)


@pytest.mark.parametrize(
    "method,error,text",
    [("fail", pb.Error, "refused on purpose"), ("crash", ZeroDivisionError, "crashed on purpose")],
)
def test_remote_errors_still_arrive_as_failures(root, method, error, text):
    remote, root, pump, _ = restricted(root)
    result = settle(remote.callRemote(method), pump)
    assert isinstance(result, Failure)
    assert result.check(error) and text in result.getErrorMessage()
    assert result.traceback == "Traceback unavailable\n"  # no tracebacks leave the master


def test_remote_references_pass_both_ways(root):
    remote, root, pump, _ = restricted(root)
    mind = Mind()
    assert settle(remote.callRemote("call_back", mind), pump) == "thanks"
    assert mind.greetings == ["from the master"]
    assert isinstance(root.received[0], pb.RemoteReference)


class Status(pb.Copyable):
    def __init__(self, value=0):
        self.value = value


class RemoteStatus(pb.RemoteCopy):
    pass


STATUS_NAME = f"{Status.__module__}.{Status.__qualname__}"
pb.setUnjellyableForClass(STATUS_NAME, RemoteStatus)


def test_registered_copyables_pass_only_when_allowed(root):
    remote, root, pump, _ = restricted(root)
    refused = settle(remote.callRemote("echo", Status(3)), pump)
    assert isinstance(refused, Failure) and refused.check(InsecureJelly)

    remote, root, pump, _ = connect(
        ClusterServerFactory(root, cluster_security([STATUS_NAME])), ClusterClientFactory(cluster_security([STATUS_NAME]))
    )
    assert settle(remote.callRemote("accept", Status(3)), pump) is None
    assert isinstance(root.received[0], RemoteStatus) and root.received[0].value == 3


def test_options_cannot_be_widened_by_the_generic_methods():
    options = ClusterSecurityOptions()
    for widen in (options.allowBasicTypes, lambda: options.allowTypes("set"), lambda: options.allowInstancesOf(Root)):
        with pytest.raises(TypeError):
            widen()
    with pytest.raises(ValueError, match="not registered"):
        options.allow_copyable("no.such.Copy")
    assert not options.isTypeAllowed(b"set")
    assert not options.isTypeAllowed(b"os.system")
    assert not options.isModuleAllowed("os")
    assert options.isTypeAllowed(b"dictionary")


@pytest.mark.parametrize("garbage", [b"\x93\x93\x93\x93", b"\x7f" * 8 + b"\x82", b"\xff" * 40])
def test_a_peer_sending_garbage_is_dropped_quietly(garbage):
    from twisted.internet.testing import StringTransport

    from safesquid_tw.cluster.jellysafety import ClusterBroker

    broker = ClusterBroker(isClient=False, security=cluster_security())
    transport = StringTransport()
    transport.abortConnection = lambda: setattr(transport, "aborted", True)
    broker.makeConnection(transport)
    broker.dataReceived(garbage)  # must not raise: the reactor would log a traceback
    assert getattr(transport, "aborted", False)
