"""One port, two protocols: ALPN picks the control plane or the portal; plain text is refused.

The first tests run over in-memory TLS (iosim, a fake clock); the last ones listen on a real
loopback socket and make a real PB login (the key proof) and real HTTPS and HTTP requests to
the same port.
"""

from __future__ import annotations

import pytest
import pytest_twisted
from cryptography.hazmat.primitives import serialization
from twisted.internet import defer, endpoints
from twisted.internet.address import IPv4Address, IPv6Address, UNIXAddress
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import Certificate, CertificateOptions, optionsForClientTLS
from twisted.internet.testing import MemoryReactorClock
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.spread import pb
from twisted.test import iosim
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.iweb import IPolicyForHTTPS
from twisted.web.resource import Resource
from twisted.web.server import Site
from zope.interface import implementer

from safesquid_tw import __version__
from safesquid_tw.cluster import wire
from safesquid_tw.cluster.jellysafety import ClusterClientFactory, ClusterServerFactory
from safesquid_tw.cluster.keyproof import ClusterKey, KeyProofFailed, MasterKeyProof, NodeVersion, SlaveKeyProof
from safesquid_tw.cluster.mux import PortalPortFactory, is_loopback, use_https_response
from safesquid_tw.cluster.tlsconfig import (
    MasterClientCreator,
    MasterTrust,
    channel_binding,
    load_or_create_master_identity,
    master_fingerprint,
)

TIMEOUT = 15.0


class Recorder(Protocol):
    def __init__(self, name):
        self.name = name
        self.data = b""
        self.lost = None

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.lost = reason


class RecordingFactory(Factory):
    def __init__(self, name):
        self.name = name
        self.built = []
        self.started = 0

    def buildProtocol(self, addr):
        p = Recorder(self.name)
        self.built.append(p)
        return p

    def startFactory(self):
        self.started += 1

    def stopFactory(self):
        self.started -= 1


class Greeter(Protocol):
    """A client that sends some bytes once connected (inside TLS, once the handshake is done)."""

    def __init__(self, payload=b""):
        self.payload = payload
        self.data = b""

    def connectionMade(self):
        if self.payload:
            self.transport.write(self.payload)

    def dataReceived(self, data):
        self.data += data


@pytest.fixture(scope="module")
def identity(tmp_path_factory):
    return load_or_create_master_identity(
        tmp_path_factory.mktemp("master"), hostname="master.example", discover=lambda: ["127.0.0.1", "::1"]
    )


@pytest.fixture
def port(identity):
    clock = MemoryReactorClock()
    return PortalPortFactory(
        identity.server_options(), RecordingFactory("control"), RecordingFactory("web"), clock=clock, handshake_timeout=TIMEOUT
    )


def connect(port, client_protocol, host=None):
    server_transport = lambda p: iosim.FakeTransport(p, isServer=True, hostAddress=host)  # noqa: E731
    client, server, pump = iosim.connectedServerAndClient(
        lambda: port.buildProtocol(None), lambda: client_protocol, serverTransportFactory=server_transport, clock=port.clock
    )
    pump.flush()
    return server, pump


def tls_client(port, options, payload=b"hello"):
    clock = port.clock  # the pump advances it, flushing the TLS layer's buffered writes
    greeter = Greeter(payload)
    factory = TLSMemoryBIOFactory(options, True, Factory.forProtocol(lambda: greeter), clock=clock)
    return factory.buildProtocol(None), greeter


@pytest.mark.parametrize(
    "alpn,negotiated,chosen",
    [
        ([wire.ALPN_CONTROL_PLANE], wire.ALPN_CONTROL_PLANE, "control"),
        ([b"h2", b"http/1.1"], b"http/1.1", "web"),  # a browser
        ([b"http/1.1"], b"http/1.1", "web"),
        (None, None, "web"),  # curl --no-alpn, old clients
    ],
)
def test_alpn_picks_the_protocol(port, alpn, negotiated, chosen):
    tls, _greeter = tls_client(port, CertificateOptions(acceptableProtocols=alpn), b"first bytes")
    connect(port, tls)
    picked, other = (
        (port.control_factory, port.web_factory) if chosen == "control" else (port.web_factory, port.control_factory)
    )
    assert len(picked.built) == 1 and other.built == []
    assert picked.built[0].data == b"first bytes"
    # The inner protocol sees the TLS transport itself (channel binding needs it).
    assert picked.built[0].transport.negotiatedProtocol == negotiated
    assert picked.built[0].transport.getHandle().get_protocol_version_name() == "TLSv1.3"
    assert (port.stats.control_plane, port.stats.web_tls) == ((1, 0) if chosen == "control" else (0, 1))


def test_a_client_offering_only_unknown_protocols_gets_nothing(port):
    tls, _greeter = tls_client(port, CertificateOptions(acceptableProtocols=[b"h2"]))
    server, pump = connect(port, tls)
    assert port.control_factory.built == [] and port.web_factory.built == []
    assert server.transport.disconnecting
    assert port.stats.closed_early == 1 and port.stats.timed_out == 0


def test_answers_flow_back_through_tls(port):
    tls, greeter = tls_client(port, CertificateOptions(acceptableProtocols=[b"http/1.1"]), b"ping")
    _server, pump = connect(port, tls)
    port.web_factory.built[0].transport.write(b"pong")
    pump.flush()
    assert greeter.data == b"pong"


def test_the_deadline_does_not_cut_a_dispatched_connection(port):
    tls, _ = tls_client(port, CertificateOptions(acceptableProtocols=[wire.ALPN_CONTROL_PLANE]))
    server, pump = connect(port, tls)
    port.clock.advance(TIMEOUT * 10)
    pump.flush()
    assert port.control_factory.built[0].lost is None and port.stats.timed_out == 0


def test_a_silent_connection_is_dropped_at_the_deadline(port):
    server, pump = connect(port, Greeter())
    port.clock.advance(TIMEOUT - 0.1)
    assert not server.transport.disconnecting
    port.clock.advance(0.2)
    pump.flush()
    assert server.transport.disconnecting and port.stats.timed_out == 1


def test_a_stalled_tls_handshake_is_dropped_at_the_deadline(port):
    server, pump = connect(port, Greeter(b"\x16\x03\x01\x02\x00"))  # the start of a ClientHello, then nothing
    port.clock.advance(TIMEOUT + 0.1)
    pump.flush()
    assert server.transport.disconnecting and port.stats.timed_out == 1
    assert port.control_factory.built == [] and port.web_factory.built == []
    assert port.stats.closed_early == 0


REQUEST = b"GET /status HTTP/1.1\r\nHost: 10.0.0.5:8888\r\nUser-Agent: curl\r\n\r\n"


def test_plain_http_is_answered_with_a_pointer_to_https(port):
    client = Greeter(REQUEST)
    server, pump = connect(port, client, host=IPv4Address("TCP", "10.0.0.5", 8888))
    assert client.data.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert b'<a href="https://10.0.0.5:8888/">' in client.data
    assert server.transport.disconnecting
    assert port.web_factory.built == [] and port.stats.plain_refused == 1


@pytest.mark.parametrize(
    "host,served",
    [
        (IPv4Address("TCP", "127.0.0.1", 8888), True),
        (IPv6Address("TCP", "::1", 8888), True),
        (UNIXAddress(b"/run/portal.sock"), True),
        (IPv4Address("TCP", "10.0.0.5", 8888), False),  # plain HTTP never leaves the box
    ],
)
def test_plain_http_is_served_only_on_loopback_when_enabled(port, host, served):
    port.plain_http = True
    client = Greeter(REQUEST)
    connect(port, client, host=host)
    if served:
        assert port.web_factory.built[0].data == REQUEST and port.stats.web_plain == 1
        assert client.data == b""
    else:
        assert port.web_factory.built == [] and client.data.startswith(b"HTTP/1.1 400")


def test_plain_http_on_loopback_is_refused_unless_enabled(port):
    client = Greeter(REQUEST)
    connect(port, client, host=IPv4Address("TCP", "127.0.0.1", 8888))
    assert client.data.startswith(b"HTTP/1.1 400") and port.web_factory.built == []


@pytest.mark.parametrize(
    "first,local,link",
    [
        (REQUEST, None, b"https://10.0.0.5:8888/"),
        (b"GET / HTTP/1.1\r\nhost: [::1]:8888\r\n\r\n", None, b"https://[::1]:8888/"),
        (b"GET / HTTP/1.1\r\nHost: <script>x</script>\r\n\r\n", IPv4Address("TCP", "10.1.1.1", 8888), b"https://10.1.1.1:8888/"),
        (b"GET / HTTP/1.0\r\n\r\n", IPv6Address("TCP", "fd00::1", 443), b"https://[fd00::1]:443/"),
    ],
)
def test_the_https_pointer_uses_a_safe_host(first, local, link):
    response = use_https_response(first, local)
    head, body = response.split(b"\r\n\r\n", 1)
    assert b"Content-Length: %d" % len(body) in head
    assert b'href="' + link + b'"' in body
    assert b"<script>" not in response


@pytest.mark.parametrize(
    "address,loopback",
    [
        (IPv4Address("TCP", "127.0.0.2", 1), True),
        (IPv6Address("TCP", "::1", 1), True),
        (IPv4Address("TCP", "192.168.1.1", 1), False),
        (IPv6Address("TCP", "fe80::1%eth0", 1), False),
        (IPv4Address("TCP", "not-an-ip", 1), False),
    ],
)
def test_is_loopback(address, loopback):
    assert is_loopback(address) is loopback


def test_the_wrapped_factories_start_and_stop_with_the_port(port):
    port.doStart()
    assert port.control_factory.started == 1 and port.web_factory.started == 1
    port.doStop()
    assert port.control_factory.started == 0 and port.web_factory.started == 0


# --- on a real loopback socket ------------------------------------------------------------------

ACTIVATION_KEY = ClusterKey.from_activation_key("TEST-ACTIVATION-KEY")
VERSION = NodeVersion(__version__)


class Avatar(pb.Referenceable):
    def __init__(self, name, mind):
        self.name = name
        self.mind = mind

    @wire.checked("avatar")
    def remote_ping(self):
        return None


class Gate(pb.Referenceable):
    """The master's root object for one connection: the key proof, then the avatar."""

    def __init__(self, broker):
        # PB builds the root object before the broker has its transport: bind at hello.
        self.broker = broker
        self.proof = None

    @wire.checked("gate")
    def remote_hello(self, protocol, product, node, nonce):
        self.proof = MasterKeyProof(ACTIVATION_KEY, VERSION, channel_binding(self.broker.transport, "master"))
        return self.proof.challenge(protocol, product, node, nonce)

    @wire.checked("gate")
    def remote_prove(self, proof, mind):
        if self.proof is None:
            raise KeyProofFailed("prove before hello")
        master_proof = self.proof.verify(proof)
        return {"proof": master_proof, "avatar": Avatar(self.proof.slave_name, mind)}


@implementer(pb.IPBRoot)
class GateRoot:
    def rootObject(self, broker):
        return Gate(broker)


class Mind(pb.Referenceable):
    @wire.checked("mind")
    def remote_ping(self):
        return None


@implementer(IPolicyForHTTPS)
class TrustTheMaster:
    """A browser that trusts the master's certificate and checks the address it names."""

    def __init__(self, certificate):
        self.root = Certificate.loadPEM(certificate.public_bytes(serialization.Encoding.PEM))

    def creatorForNetloc(self, hostname, port):
        return optionsForClientTLS(hostname.decode("ascii"), trustRoot=self.root)


class PortalPage(Resource):
    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"content-type", b"text/plain")
        return b"portal ok"


@pytest.fixture
def listening(identity):
    from twisted.internet import reactor

    site = Site(PortalPage())
    factory = PortalPortFactory(identity.server_options(), ClusterServerFactory(GateRoot()), site, clock=reactor)
    listening_port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    yield listening_port.getHost().port, factory
    listening_port.stopListening()


@pytest.mark.timeout(30)
@pytest.mark.filterwarnings("ignore:Using readBody with a transport that does not have an abortConnection")
@pytest_twisted.inlineCallbacks
def test_one_port_serves_a_pb_login_and_https_and_refuses_plain_http(listening, identity, tmp_path):
    from twisted.internet import reactor

    port_number, factory = listening

    # A slave: TLS 1.3 with trust on first use, PB, the key proof both ways, then a call.
    trust = MasterTrust.for_state_dir(tmp_path / "slave")
    endpoint = endpoints.wrapClientTLS(
        MasterClientCreator(trust, f"127.0.0.1:{port_number}"),
        endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port_number),
    )
    pb_factory = ClusterClientFactory()
    broker = yield endpoint.connect(pb_factory)
    gate = yield pb_factory.getRootObject()
    proof = SlaveKeyProof(ACTIVATION_KEY, VERSION, "slave-1", channel_binding(broker.transport, "slave"))
    challenge = wire.check_result("gate", "hello", (yield gate.callRemote("hello", *proof.hello_args())))
    answer = wire.check_result("gate", "prove", (yield gate.callRemote("prove", proof.answer(challenge), Mind())))
    proof.verify_master(answer["proof"])
    assert proof.authenticated
    assert trust.confirm(master_fingerprint(broker.transport, "slave"))
    assert (yield answer["avatar"].callRemote("ping")) is None
    assert factory.stats.control_plane == 1

    # The same port serves the portal over HTTPS, to a client that checks the certificate.
    agent = Agent(reactor, contextFactory=TrustTheMaster(identity.certificate), pool=HTTPConnectionPool(reactor, persistent=False))
    response = yield agent.request(b"GET", f"https://127.0.0.1:{port_number}/".encode())
    assert response.code == 200 and (yield readBody(response)) == b"portal ok"
    assert factory.stats.web_tls == 1

    # Plain HTTP to the same port gets the pointer to https://.
    plain = Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False))
    response = yield plain.request(b"GET", f"http://127.0.0.1:{port_number}/".encode())
    body = yield readBody(response)
    assert response.code == 400 and f"https://127.0.0.1:{port_number}/".encode() in body

    broker.transport.loseConnection()
    yield _lost(broker)


@pytest.mark.timeout(30)
@pytest_twisted.inlineCallbacks
def test_a_slave_with_another_activation_key_is_refused_on_the_real_port(listening, tmp_path):
    from twisted.internet import reactor

    port_number, _factory = listening
    trust = MasterTrust.for_state_dir(tmp_path / "slave")
    endpoint = endpoints.wrapClientTLS(
        MasterClientCreator(trust), endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port_number)
    )
    pb_factory = ClusterClientFactory()
    broker = yield endpoint.connect(pb_factory)
    gate = yield pb_factory.getRootObject()
    wrong_key = ClusterKey.from_activation_key("SOME-OTHER-KEY")
    proof = SlaveKeyProof(wrong_key, VERSION, "intruder", channel_binding(broker.transport, "slave"))
    challenge = yield gate.callRemote("hello", *proof.hello_args())
    with pytest.raises(pb.RemoteError) as excinfo:
        yield gate.callRemote("prove", proof.answer(challenge), Mind())
    assert excinfo.value.remoteType == b"safesquid_tw.cluster.keyproof.KeyProofFailed"
    assert not trust.store_path.exists()  # a master that was never proven is not recorded
    broker.transport.loseConnection()
    yield _lost(broker)


def _lost(broker):
    d = defer.Deferred()
    if broker.disconnected:
        d.callback(None)
    else:
        broker.notifyOnDisconnect(lambda: d.callback(None))
    return d


def test_plain_http_from_elsewhere_goes_to_the_limited_site_when_there_is_one(port):
    limited = RecordingFactory("limited")
    port.plain_limited_factory = limited
    client = Greeter(b"GET /health HTTP/1.0\r\n\r\n")
    connect(port, client, host=IPv4Address("TCP", "10.0.0.5", 8888))
    assert limited.built[0].data == b"GET /health HTTP/1.0\r\n\r\n"
    assert port.web_factory.built == [] and client.data == b""
