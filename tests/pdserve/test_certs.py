"""The development CA: every tier's certificate chains to it and names the tier and the local hosts,
`ensure_certs` keeps good files and remakes bad ones, and a real gRPC server with those files lets in a peer
holding a tier certificate, and refuses plaintext, a certificate from another CA, and no certificate."""

import argparse
import ipaddress
import shutil
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from pdserve.certs import COMMAND, TIERS, ensure_certs, make_certs

_CALL_TIMEOUT_S = 5


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def contents(directory: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs") / "tls", hosts=("localhost", "127.0.0.1", "node-7.internal"))


def test_each_tier_certificate_chains_to_the_ca_and_names_its_hosts(certs):
    ca = load_cert(certs.ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert ca.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    for name in TIERS:
        cert_path, _ = certs.for_tier(name)
        cert = load_cert(cert_path)
        cert.verify_directly_issued_by(ca)
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert set(usages) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert names.get_values_for_type(x509.DNSName) == [name, "localhost", "node-7.internal"]
        assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
        assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_keys_are_private(certs):
    assert certs.ca.parent.stat().st_mode & 0o777 == 0o700
    for path in [certs.ca_key, *(certs.for_tier(name)[1] for name in TIERS)]:
        assert path.stat().st_mode & 0o777 == 0o600, path
    with pytest.raises(KeyError, match="no certificate for 'router'"):
        certs.for_tier("router")


def test_ensure_keeps_good_files_byte_for_byte(tmp_path):
    make_certs(tmp_path)
    before = contents(tmp_path)
    ensure_certs(tmp_path)
    assert contents(tmp_path) == before


def test_ensure_reissues_only_a_missing_certificate(tmp_path):
    files = make_certs(tmp_path)
    before = contents(tmp_path)
    files.for_tier("decode")[1].unlink()
    ensure_certs(tmp_path)
    after = contents(tmp_path)
    assert after["decode-key.pem"] != before["decode-key.pem"] and after["decode.pem"] != before["decode.pem"]
    assert {k: v for k, v in after.items() if "decode" not in k} == {k: v for k, v in before.items() if "decode" not in k}
    load_cert(files.for_tier("decode")[0]).verify_directly_issued_by(load_cert(files.ca))


def test_ensure_reissues_every_certificate_the_ca_did_not_sign(tmp_path):
    files = make_certs(tmp_path / "a")
    other = make_certs(tmp_path / "b")
    shutil.copy(other.ca, files.ca)
    shutil.copy(other.ca_key, files.ca_key)
    before = contents(tmp_path / "a")
    ensure_certs(tmp_path / "a")
    after = contents(tmp_path / "a")
    assert after["ca.pem"] == before["ca.pem"]
    for name in TIERS:
        assert after[f"{name}.pem"] != before[f"{name}.pem"]
        load_cert(files.for_tier(name)[0]).verify_directly_issued_by(load_cert(files.ca))


def test_ensure_makes_a_new_ca_when_its_key_does_not_match(tmp_path):
    files = make_certs(tmp_path / "a")
    shutil.copy(make_certs(tmp_path / "b").ca_key, files.ca_key)
    before = contents(tmp_path / "a")
    ensure_certs(tmp_path / "a")
    assert contents(tmp_path / "a")["ca.pem"] != before["ca.pem"]
    load_cert(files.for_tier("gateway")[0]).verify_directly_issued_by(load_cert(files.ca))


def test_ensure_renews_a_certificate_about_to_expire_or_missing_a_host(tmp_path):
    make_certs(tmp_path, days=3)
    before = contents(tmp_path)
    ensure_certs(tmp_path)
    assert contents(tmp_path)["ca.pem"] != before["ca.pem"]
    files = ensure_certs(tmp_path, hosts=("localhost", "127.0.0.1", "decode.prod.svc"))
    names = load_cert(files.for_tier("decode")[0]).extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert "decode.prod.svc" in names.value.get_values_for_type(x509.DNSName)


def test_the_command_prints_the_flags_of_each_tier(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    COMMAND.add_arguments(parser, tmp_path)
    assert COMMAND.run(parser.parse_args([str(tmp_path / "tls"), "--host", "10.0.0.5", "--days", "30"]), tmp_path) == 0
    out = capsys.readouterr().out
    tls = tmp_path / "tls"
    assert f"pdserve prefill --tls-cert {tls}/prefill.pem --tls-key {tls}/prefill-key.pem --tls-ca {tls}/ca.pem" in out
    names = load_cert(tls / "gateway.pem").extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert ipaddress.ip_address("10.0.0.5") in names.value.get_values_for_type(x509.IPAddress)


@pytest.fixture(scope="module")
def prefill_port(certs):
    """A server holding prefill's certificate that requires a client certificate from the CA."""
    cert, key = (path.read_bytes() for path in certs.for_tier("prefill"))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    credentials = grpc.ssl_server_credentials([(key, cert)], root_certificates=certs.ca.read_bytes(),
                                              require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    yield port
    server.stop(grace=None)


def check(channel: grpc.Channel) -> health_pb2.HealthCheckResponse.ServingStatus:
    with channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=_CALL_TIMEOUT_S)
    return reply.status


def client_credentials(ca: Path, cert: Path | None = None, key: Path | None = None) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=ca.read_bytes(),
                                        private_key=None if key is None else key.read_bytes(),
                                        certificate_chain=None if cert is None else cert.read_bytes())


@pytest.mark.parametrize("target, options", [
    ("127.0.0.1", []),  # the address a local peer dials: matched by the IP SAN
    ("localhost", []),
    ("127.0.0.1", [("grpc.ssl_target_name_override", "prefill")]),  # as a compose service name resolves
])
def test_a_tier_with_a_certificate_from_the_ca_gets_in(certs, prefill_port, target, options):
    credentials = client_credentials(certs.ca, *certs.for_tier("gateway"))
    channel = grpc.secure_channel(f"{target}:{prefill_port}", credentials, options=options)
    assert check(channel) == health_pb2.HealthCheckResponse.SERVING


def test_plaintext_is_refused(prefill_port):
    with pytest.raises(grpc.RpcError) as caught:
        check(grpc.insecure_channel(f"127.0.0.1:{prefill_port}"))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_certificate_from_another_ca_or_none_is_refused_at_the_handshake(certs, prefill_port, tmp_path):
    stranger = make_certs(tmp_path / "stranger")
    for credentials in (client_credentials(certs.ca, *stranger.for_tier("gateway")), client_credentials(certs.ca),
                        client_credentials(stranger.ca, *stranger.for_tier("gateway"))):
        with pytest.raises(grpc.RpcError) as caught:
            check(grpc.secure_channel(f"127.0.0.1:{prefill_port}", credentials))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
