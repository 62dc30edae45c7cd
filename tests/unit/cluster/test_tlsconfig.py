"""The master's TLS identity, the slave's trust in it, and channel binding, over in-memory TLS."""

from __future__ import annotations

import datetime
import ipaddress
import stat

import pytest
from OpenSSL import SSL
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet.interfaces import IHandshakeListener
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.test import iosim
from zope.interface import implementer

from safesquid_tw.cluster import tlsconfig
from safesquid_tw.cluster.tlsconfig import (
    ChannelBindingUnavailable,
    MasterClientCreator,
    MasterIdentityMismatch,
    MasterTrust,
    channel_binding,
    format_fingerprint,
    load_or_create_master_identity,
    local_addresses,
    master_fingerprint,
    parse_fingerprint,
)
from safesquid_tw.cluster.wire import ALPN_CONTROL_PLANE

NOW = datetime.datetime(2030, 6, 1, tzinfo=datetime.timezone.utc)
FP = "ab" * 32


def fixed_addresses(*addresses):
    return lambda: list(addresses)


def make_identity(state_dir, *, addresses=(), discover=("10.0.0.5",), now=NOW, hostname="master.example"):
    return load_or_create_master_identity(
        state_dir, addresses, hostname=hostname, now=now, discover=fixed_addresses(*discover)
    )


def sans(cert):
    value = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(value.get_values_for_type(x509.DNSName)), {str(ip) for ip in value.get_values_for_type(x509.IPAddress)}


# --- identity on disk ---------------------------------------------------------------------------


def test_first_start_makes_a_private_key_and_a_certificate_naming_the_master(tmp_path):
    identity = make_identity(tmp_path, addresses=["203.0.113.9", "portal.example.net", "[2001:db8::7]"])
    tls_dir = tmp_path / "tls"
    assert stat.S_IMODE(tls_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(identity.key_path.stat().st_mode) == 0o600
    assert identity.key_path == tls_dir / "master.key" and identity.cert_path == tls_dir / "master.crt"
    dns, ips = sans(identity.certificate)
    assert dns == {"master.example", "portal.example.net"}
    assert ips == {"10.0.0.5", "203.0.113.9", "2001:db8::7"}
    cert = identity.certificate
    assert cert.issuer == cert.subject
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "master.example"
    assert cert.not_valid_after_utc - NOW > datetime.timedelta(days=700)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert len(identity.fingerprint) == 64


def test_a_restart_keeps_the_identity_and_the_files(tmp_path):
    first = make_identity(tmp_path)
    key_bytes, cert_bytes = first.key_path.read_bytes(), first.cert_path.read_bytes()
    second = make_identity(tmp_path, now=NOW + datetime.timedelta(days=100))
    assert second.fingerprint == first.fingerprint
    assert first.key_path.read_bytes() == key_bytes and first.cert_path.read_bytes() == cert_bytes


@pytest.mark.parametrize(
    "change",
    [
        {"discover": ("10.0.0.5", "10.0.0.6")},  # a new interface address
        {"addresses": ["slaves-see-me.example"]},  # a new name given by the operator
        {"now": NOW + datetime.timedelta(days=810)},  # about to expire
    ],
)
def test_the_certificate_is_reissued_with_the_same_key(tmp_path, change):
    first = make_identity(tmp_path)
    second = make_identity(tmp_path, **change)
    assert second.fingerprint == first.fingerprint  # what slaves trust does not change
    assert second.certificate.serial_number != first.certificate.serial_number
    assert second.cert_path.read_bytes() == second.certificate.public_bytes(serialization.Encoding.PEM)
    if "discover" in change:
        assert "10.0.0.6" in sans(second.certificate)[1]


def ca_issued(subject, public_key):
    ca_key = ec.generate_private_key(ec.SECP256R1())
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Some CA")]))
        .public_key(public_key)
        .serial_number(7)
        .not_valid_before(NOW - datetime.timedelta(days=1))
        .not_valid_after(NOW + datetime.timedelta(days=2))
        .sign(ca_key, hashes.SHA256())
    )


def test_a_certificate_issued_by_a_ca_is_used_as_it_is(tmp_path):
    identity = make_identity(tmp_path)
    cert = ca_issued(identity.certificate.subject, identity.key.public_key())
    identity.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    again = make_identity(tmp_path, discover=("10.9.9.9",))  # would otherwise be reissued
    assert again.certificate.serial_number == 7


def test_a_certificate_issued_by_a_ca_for_another_key_is_an_error(tmp_path):
    identity = make_identity(tmp_path)
    cert = ca_issued(identity.certificate.subject, ec.generate_private_key(ec.SECP256R1()).public_key())
    identity.cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ValueError, match="master.crt: the certificate issued by CN=Some CA is not for this key"):
        make_identity(tmp_path)
    assert identity.cert_path.read_bytes() == cert.public_bytes(serialization.Encoding.PEM)


def test_a_key_readable_by_others_is_made_private(tmp_path):
    identity = make_identity(tmp_path)
    identity.key_path.chmod(0o644)
    make_identity(tmp_path)
    assert stat.S_IMODE(identity.key_path.stat().st_mode) == 0o600


def test_a_damaged_key_is_an_error_and_is_never_replaced(tmp_path):
    identity = make_identity(tmp_path)
    identity.key_path.write_bytes(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
    with pytest.raises(ValueError, match="master.key is not a readable private key.*new fingerprint"):
        make_identity(tmp_path)
    assert b"garbage" in identity.key_path.read_bytes()


def test_local_addresses_are_addresses_and_never_link_local():
    found = local_addresses()
    assert "127.0.0.1" in found
    for text in found:
        ip = ipaddress.ip_address(text)
        assert not ip.is_link_local and not ip.is_unspecified


# --- fingerprints and trust -----------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [FP, FP.upper(), format_fingerprint(FP), "sha256:" + FP, "  " + ":".join(FP[i : i + 2] for i in range(0, 64, 2)) + "\n"],
)
def test_fingerprints_are_accepted_as_operators_paste_them(text):
    assert parse_fingerprint(text) == FP


@pytest.mark.parametrize("text", ["", "ab" * 31, "zz" * 32, "ab" * 33, "md5:" + FP])
def test_malformed_fingerprints_are_refused(text):
    with pytest.raises(ValueError, match="not a SHA-256 fingerprint"):
        parse_fingerprint(text)


def test_format_fingerprint_matches_openssl_style():
    assert format_fingerprint("0a1b" + "00" * 30).startswith("SHA256:0A:1B:00:")


def test_trust_on_first_use_is_recorded_only_on_confirmation(tmp_path):
    trust = MasterTrust.for_state_dir(tmp_path)
    assert trust.check(FP) == "first-use"
    assert not trust.store_path.exists()
    assert trust.confirm(FP) is True
    assert stat.S_IMODE(trust.store_path.stat().st_mode) == 0o600
    assert trust.store_path.read_text() == format_fingerprint(FP) + "\n"
    assert MasterTrust.for_state_dir(tmp_path).check(FP) == "recorded"
    assert trust.confirm(FP) is False


def test_a_changed_master_key_is_refused_naming_both_keys_and_the_remedy(tmp_path):
    trust = MasterTrust.for_state_dir(tmp_path)
    trust.confirm(FP)
    other = "cd" * 32
    with pytest.raises(MasterIdentityMismatch) as excinfo:
        trust.check(other)
    message = str(excinfo.value)
    assert format_fingerprint(other) in message and format_fingerprint(FP) in message
    assert str(trust.store_path) in message
    with pytest.raises(MasterIdentityMismatch):
        trust.confirm(other)
    assert parse_fingerprint(trust.store_path.read_text()) == FP


def test_a_pin_wins_over_the_record(tmp_path):
    MasterTrust.for_state_dir(tmp_path).confirm(FP)
    pinned = MasterTrust.for_state_dir(tmp_path, pinned=format_fingerprint("cd" * 32))
    assert pinned.check("cd" * 32) == "pinned"
    with pytest.raises(MasterIdentityMismatch, match="update the pinned fingerprint"):
        pinned.check(FP)


def test_a_damaged_record_refuses_every_master(tmp_path):
    trust = MasterTrust.for_state_dir(tmp_path)
    trust.store_path.parent.mkdir(parents=True)
    trust.store_path.write_text("not a fingerprint")
    with pytest.raises(MasterIdentityMismatch, match="damaged"):
        trust.check(FP)


# --- real TLS, in memory ------------------------------------------------------------------------


@implementer(IHandshakeListener)
class Recorder(Protocol):
    def __init__(self):
        self.handshake_done = False
        self.lost = None

    def handshakeCompleted(self):
        self.handshake_done = True

    def connectionLost(self, reason):
        self.lost = reason


def tls_pair(server_options, client_creator):
    """Connect a TLS client and server in memory; returns (client Recorder, server Recorder)."""
    clock = MemoryReactorClock()
    recorders = {}

    def wrapped(side):
        return Factory.forProtocol(lambda: recorders.setdefault(side, Recorder()))

    server_factory = TLSMemoryBIOFactory(server_options, False, wrapped("server"), clock=clock)
    client_factory = TLSMemoryBIOFactory(client_creator, True, wrapped("client"), clock=clock)
    _client, _server, pump = iosim.connectedServerAndClient(
        lambda: server_factory.buildProtocol(None), lambda: client_factory.buildProtocol(None), clock=clock
    )
    pump.flush()
    return recorders["client"], recorders["server"]


@pytest.fixture
def identity(tmp_path):
    return make_identity(tmp_path / "master")


def test_a_slave_connects_on_first_use_and_both_ends_agree_on_the_binding(tmp_path, identity):
    trust = MasterTrust.for_state_dir(tmp_path / "slave")
    client, server = tls_pair(identity.server_options(), MasterClientCreator(trust))
    assert client.handshake_done and server.handshake_done
    assert client.transport.negotiatedProtocol == ALPN_CONTROL_PLANE
    assert master_fingerprint(client.transport, "slave") == identity.fingerprint
    assert master_fingerprint(server.transport, "master") == identity.fingerprint
    binding = channel_binding(client.transport, "slave")
    assert binding == channel_binding(server.transport, "master")
    assert len(binding) == 64 and binding.endswith(bytes.fromhex(identity.fingerprint))
    assert not trust.store_path.exists()  # recorded only after the master's key proof

    client2, server2 = tls_pair(identity.server_options(), MasterClientCreator(trust))
    assert channel_binding(client2.transport, "slave") != binding  # unique per connection


def test_a_slave_refuses_a_master_with_another_key_during_the_handshake(tmp_path, identity):
    impostor = make_identity(tmp_path / "impostor")
    trust = MasterTrust.for_state_dir(tmp_path / "slave")
    trust.confirm(identity.fingerprint)
    creator = MasterClientCreator(trust, "10.0.0.5:8888")
    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        client, server = tls_pair(impostor.server_options(), creator)
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert not client.handshake_done and not server.handshake_done
    assert client.lost is not None and client.lost.check(SSL.Error)
    assert isinstance(creator.last_mismatch, MasterIdentityMismatch)
    assert format_fingerprint(impostor.fingerprint) in str(creator.last_mismatch)
    critical = [e for e in events if e.get("log_level") is not None and e["log_level"].name == "critical"]
    assert critical and "MASTER IDENTITY CHANGED at {address}" in critical[0]["log_format"]
    assert critical[0]["address"] == "10.0.0.5:8888"


def test_a_pinned_fingerprint_is_enforced(tmp_path, identity):
    pinned = MasterTrust.for_state_dir(tmp_path / "slave", pinned=identity.fingerprint)
    client, _ = tls_pair(identity.server_options(), MasterClientCreator(pinned))
    assert client.handshake_done
    wrong = MasterTrust.for_state_dir(tmp_path / "slave", pinned="cd" * 32)
    client, _ = tls_pair(identity.server_options(), MasterClientCreator(wrong))
    assert not client.handshake_done


def test_the_slave_insists_on_tls_1_3(tmp_path, identity):
    old_server = CertificateOptions(
        privateKey=identity.key, certificate=identity.certificate, lowerMaximumSecurityTo=TLSVersion.TLSv1_2
    )
    client, server = tls_pair(old_server, MasterClientCreator(MasterTrust.for_state_dir(tmp_path / "slave")))
    assert not client.handshake_done and not server.handshake_done


def test_no_binding_over_tls_1_2_or_without_the_control_plane_protocol(tmp_path, identity):
    browser = CertificateOptions(acceptableProtocols=[b"http/1.1"])
    client, server = tls_pair(identity.server_options(), browser)
    assert server.transport.negotiatedProtocol == b"http/1.1"
    with pytest.raises(ChannelBindingUnavailable, match="did not agree on safesquid-cluster/1"):
        channel_binding(server.transport, "master")

    old_client = CertificateOptions(acceptableProtocols=[ALPN_CONTROL_PLANE], lowerMaximumSecurityTo=TLSVersion.TLSv1_2)
    client, server = tls_pair(identity.server_options(), old_client)
    assert server.transport.negotiatedProtocol == ALPN_CONTROL_PLANE
    with pytest.raises(ChannelBindingUnavailable, match="needs TLS 1.3, not TLSv1.2"):
        channel_binding(server.transport, "master")


def test_no_binding_without_tls():
    with pytest.raises(ChannelBindingUnavailable, match="not TLS"):
        channel_binding(StringTransport(), "master")


def test_constants_name_the_files():
    assert (tlsconfig.TLS_DIR, tlsconfig.KEY_FILE, tlsconfig.FINGERPRINT_FILE) == ("tls", "master.key", "master-fingerprint")
