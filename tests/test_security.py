"""Security: TLS and mutual TLS, bearer tokens, limits with safe defaults, a repository that stays shut.

Certificates are made here (a CA, a server and a client certificate, and a rogue CA with its
own client), so the tests need no files and no network.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import pickle
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from serving.config import ServerConfig, load_config
from serving.proto.cifar10.classifier.v1 import classifier_pb2 as pb
from serving.proto.cifar10.classifier.v1 import classifier_pb2_grpc as pb_grpc
from tests.conftest import REPO_ROOT, ServerProcess, encode, raw_image

PIXELS = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
TOKEN = "s3cret-token-0123456789abcdef"
OTHER_TOKEN = "another-token-fedcba9876543210"


def classify_request() -> pb.ClassifyRequest:
    return pb.ClassifyRequest(image=raw_image(PIXELS))


# ---- certificates ------------------------------------------------------------------------

@dataclass(frozen=True)
class Identity:
    cert: Path
    key: Path

    def pem(self) -> tuple[bytes, bytes]:
        return self.cert.read_bytes(), self.key.read_bytes()


@dataclass(frozen=True)
class Pki:
    ca: Path
    server: Identity
    client: Identity
    rogue_client: Identity  # signed by a CA the server does not trust


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(directory: Path, stem: str, subject: str, issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey] | None,
           *, is_ca: bool = False, usage=None, hosts: bool = False) -> tuple[Identity, x509.Name, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    issuer_name, issuer_key = issuer if issuer is not None else (_name(subject), key)
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer_name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    cert = builder.sign(issuer_key, hashes.SHA256())
    identity = Identity(directory / f"{stem}.crt", directory / f"{stem}.key")
    identity.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    identity.key.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return identity, _name(subject), key


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Pki:
    directory = tmp_path_factory.mktemp("pki")
    ca, ca_name, ca_key = _issue(directory, "ca", "test CA", None, is_ca=True)
    server, _, _ = _issue(directory, "server", "localhost", (ca_name, ca_key),
                          usage=ExtendedKeyUsageOID.SERVER_AUTH, hosts=True)
    client, _, _ = _issue(directory, "client", "client", (ca_name, ca_key), usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    _, rogue_name, rogue_key = _issue(directory, "rogue-ca", "rogue CA", None, is_ca=True)
    rogue_client, _, _ = _issue(directory, "rogue-client", "client", (rogue_name, rogue_key),
                                usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    return Pki(ca.cert, server, client, rogue_client)


def tls_flags(pki: Pki, mutual: bool = False) -> list[str]:
    flags = ["--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key)]
    return [*flags, "--tls-client-ca", str(pki.ca)] if mutual else flags


def credentials(pki: Pki, client: Identity | None = None) -> grpc.ChannelCredentials:
    cert, key = client.pem() if client is not None else (None, None)
    return grpc.ssl_channel_credentials(root_certificates=pki.ca.read_bytes(), private_key=key, certificate_chain=cert)


def private_channel(target: str, creds: grpc.ChannelCredentials | None = None) -> grpc.Channel:
    """A channel with its own TCP connection (channels to one target otherwise share one)."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    return grpc.secure_channel(target, creds, options) if creds else grpc.insecure_channel(target, options)


def refusal(target: str, creds: grpc.ChannelCredentials | None) -> grpc.RpcError:
    with private_channel(target, creds) as channel:
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.ClassifierStub(channel).Classify(classify_request(), timeout=5)
    return err.value


# ---- TLS and mutual TLS ------------------------------------------------------------------

def test_tls_server_answers_a_client_that_trusts_its_ca(start_server, pki):
    srv = start_server(*tls_flags(pki), credentials=credentials(pki))
    assert len(srv.stub.Classify(classify_request(), timeout=10).predictions) == 5
    assert "TLS on the gRPC port (server-only)" in srv.log()


def test_plaintext_client_cannot_talk_to_a_tls_server(start_server, pki):
    srv = start_server(*tls_flags(pki), credentials=credentials(pki))
    assert refusal(srv.target, None).code() == grpc.StatusCode.UNAVAILABLE
    assert srv.process.poll() is None


def test_mutual_tls_accepts_a_client_certificate_signed_by_the_client_ca(start_server, pki):
    srv = start_server(*tls_flags(pki, mutual=True), credentials=credentials(pki, pki.client))
    assert len(srv.stub.Classify(classify_request(), timeout=10).predictions) == 5
    assert "mutual: client certificates required" in srv.log()


@pytest.mark.parametrize("who", ["no certificate", "certificate of another CA", "plaintext"])
def test_mutual_tls_refuses_a_client_without_a_valid_certificate(start_server, pki, who):
    srv = start_server(*tls_flags(pki, mutual=True), credentials=credentials(pki, pki.client))
    creds = {"no certificate": credentials(pki), "certificate of another CA": credentials(pki, pki.rogue_client),
             "plaintext": None}[who]
    assert refusal(srv.target, creds).code() == grpc.StatusCode.UNAVAILABLE
    assert srv.stub.Classify(classify_request(), timeout=10).predictions  # the valid client still gets in


def run_healthcheck(target: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serving.healthcheck", "--target", target],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, env={**os.environ, **env})


def test_healthcheck_probes_a_mutual_tls_server_with_its_probe_settings_from_the_environment(start_server, pki):
    srv = start_server(*tls_flags(pki, mutual=True), credentials=credentials(pki, pki.client))
    probe_env = {"CIFAR10_PROBE_TLS_CA": str(pki.ca), "CIFAR10_PROBE_TLS_CERT": str(pki.client.cert),
                 "CIFAR10_PROBE_TLS_KEY": str(pki.client.key)}
    healthy = run_healthcheck(f"localhost:{srv.port}", probe_env)
    assert healthy.returncode == 0 and "SERVING" in healthy.stdout, healthy.stdout + healthy.stderr
    plaintext = run_healthcheck(f"localhost:{srv.port}", {})
    assert plaintext.returncode == 1 and "UNAVAILABLE" in plaintext.stdout


def test_healthcheck_sends_its_probe_token_when_health_needs_one(start_server):
    srv = server_with_closed_health(start_server)
    assert run_healthcheck(srv.target, {"CIFAR10_PROBE_TOKEN": TOKEN}).returncode == 0
    refused = run_healthcheck(srv.target, {})
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stdout


def run_client_cli(port: int, image: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "serving.client", str(image), "--target", f"localhost:{port}", "--top-k", "2", *flags],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )


def test_client_cli_classifies_over_mutual_tls_with_a_token(start_server, pki, tmp_path):
    srv = start_server(*tls_flags(pki, mutual=True), credentials=credentials(pki, pki.client),
                       env={"CIFAR10_AUTH_TOKENS": TOKEN})
    image = tmp_path / "cat.png"
    image.write_bytes(encode(PIXELS))
    tls = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client.cert), "--tls-key", str(pki.client.key)]
    answered = run_client_cli(srv.port, image, *tls, "--token", TOKEN)
    assert answered.returncode == 0, answered.stdout + answered.stderr
    assert "[cifar10 v" in answered.stdout
    refused = run_client_cli(srv.port, image, *tls)  # right certificate, no token
    assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stdout


@pytest.mark.parametrize("argv,problem", [
    (["--tls-cert", "server.crt"], "--tls-cert and --tls-key go together"),
    (["--tls-key", "server.key"], "--tls-cert and --tls-key go together"),
    (["--tls-client-ca", "ca.crt"], "needs --tls-cert"),
])
def test_incomplete_tls_settings_are_refused_at_startup(argv, problem, capsys):
    with pytest.raises(SystemExit) as exit_:
        load_config(argv, environ={})
    assert exit_.value.code == 2 and problem in capsys.readouterr().err


# ---- bearer tokens -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def authed(tmp_path_factory):
    """Tokens from both sources at once: one in the file, one in the env var."""
    tokens_file = tmp_path_factory.mktemp("auth") / "tokens"
    tokens_file.write_text(f"# serving tokens\n\n{TOKEN}\n")
    proc = ServerProcess("--auth-tokens-file", str(tokens_file), env={"CIFAR10_AUTH_TOKENS": OTHER_TOKEN})
    yield proc
    proc.stop()


def bearer(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def unauthenticated(call, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(timeout=10, **kwargs)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    return err.value


@pytest.mark.parametrize("token", [TOKEN, OTHER_TOKEN], ids=["from the file", "from the env var"])
def test_a_configured_token_is_accepted(authed, token):
    assert authed.stub.Classify(classify_request(), timeout=10, metadata=bearer(token)).predictions


@pytest.mark.parametrize("metadata,message", [
    ((), "missing credentials"),
    (bearer("wrong-token"), "invalid bearer token"),
    (bearer(TOKEN + "x"), "invalid bearer token"),
    ((("authorization", f"Basic {TOKEN}"),), "malformed credentials"),
    ((("authorization", "Bearer "),), "malformed credentials"),
], ids=["missing", "wrong", "token plus a character", "other scheme", "empty token"])
def test_a_call_without_a_valid_token_is_unauthenticated_with_a_clear_message(authed, metadata, message):
    error = unauthenticated(lambda **kw: authed.stub.Classify(classify_request(), **kw), metadata=metadata)
    assert message in error.details()


def test_a_stream_without_a_token_is_unauthenticated(authed):
    unauthenticated(lambda **kw: list(authed.stub.ClassifyStream(iter([classify_request()] * 3), **kw)))


def test_health_is_open_to_probes_without_a_token(authed):
    reply = authed.health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def list_services(channel: grpc.Channel, **kwargs) -> list[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), **kwargs)
    return [s.name for reply in replies for s in reply.list_services_response.service]


def test_reflection_follows_the_api_and_needs_a_token(authed):
    unauthenticated(lambda **kw: list_services(authed.channel, **kw))
    assert "cifar10.classifier.v1.Classifier" in list_services(authed.channel, timeout=10, metadata=bearer(TOKEN))


def test_unauthenticated_calls_are_counted_by_reason(start_server):
    srv = start_server(env={"CIFAR10_AUTH_TOKENS": TOKEN})
    for _ in range(3):
        unauthenticated(lambda **kw: srv.stub.Classify(classify_request(), **kw))
    unauthenticated(lambda **kw: srv.stub.ListModels(pb.ListModelsRequest(), **kw))
    assert srv.metric("classifier_rejected_requests_total", reason="unauthenticated", protocol="native") == 4
    assert srv.metric("classifier_images_classified_total") == 0  # refused before any work


def server_with_closed_health(start_server) -> ServerProcess:
    """A server started with --auth-health, once a probe with the token sees it SERVING."""
    srv = start_server("--auth-health", env={"CIFAR10_AUTH_TOKENS": TOKEN}, wait_ready=False)
    check = health_pb2.HealthCheckRequest(service="")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if srv.health.Check(check, timeout=1, metadata=bearer(TOKEN)).status == health_pb2.HealthCheckResponse.SERVING:
                return srv
        except grpc.RpcError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"not SERVING after 60 s:\n{srv.log()}")


def test_auth_health_flag_closes_health_too(start_server):
    srv = server_with_closed_health(start_server)
    unauthenticated(lambda **kw: srv.health.Check(health_pb2.HealthCheckRequest(service=""), **kw))


@pytest.mark.parametrize("content", ["", "# only a comment\n\n"], ids=["empty", "comments only"])
def test_a_tokens_file_without_tokens_refuses_to_start(start_server, tmp_path, content):
    tokens_file = tmp_path / "tokens"
    tokens_file.write_text(content)
    srv = start_server("--auth-tokens-file", str(tokens_file), wait_ready=False)
    assert srv.process.wait(60) != 0
    assert "holds no token" in srv.log() and "Traceback" not in srv.log()


@pytest.mark.parametrize("flag", ["--tls-cert", "--tls-key", "--tls-client-ca", "--auth-tokens-file"])
def test_a_missing_certificate_or_tokens_file_refuses_to_start_with_one_clear_line(start_server, pki, tmp_path, flag):
    settings = {"--tls-cert": str(pki.server.cert), "--tls-key": str(pki.server.key), "--tls-client-ca": str(pki.ca),
                "--auth-tokens-file": None}
    settings[flag] = str(tmp_path / "missing.pem")
    srv = start_server(*[part for item in settings.items() if item[1] for part in item], wait_ready=False)
    assert srv.process.wait(60) == 2
    assert f"error: {flag} {tmp_path / 'missing.pem'}: No such file or directory" in srv.log()
    assert "Traceback" not in srv.log()


def test_without_tokens_auth_is_off(server):
    assert server.stub.Classify(classify_request(), timeout=10).predictions
    assert "bearer-token auth on" not in server.log()


# ---- limits with safe defaults ------------------------------------------------------------

@pytest.fixture(scope="module")
def limited():
    proc = ServerProcess("--max-image-pixels", "1024", "--max-images-per-request", "4",
                         "--max-concurrent-streams", "2", "--max-batch-size", "4", "--max-queue-size", "16")
    yield proc
    proc.stop()


def rejection(stub_call, request) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        stub_call(request, timeout=10)
    return err.value


@pytest.mark.parametrize("image", [
    pb.Image(encoded=encode(np.zeros((33, 32, 3), np.uint8))),
    raw_image(np.zeros((64, 64, 3), np.uint8)),
    pb.Image(tensor=pb.FloatTensor(data=[0.0] * 33 * 32 * 3, shape=[33, 32, 3])),
], ids=["encoded", "raw", "tensor"])
def test_an_image_over_max_image_pixels_is_refused(limited, image):
    error = rejection(limited.stub.Classify, pb.ClassifyRequest(image=image))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "1024" in error.details()
    assert limited.stub.Classify(classify_request(), timeout=10).predictions  # 32x32 = 1024: at the limit


def test_max_images_per_request_bounds_a_batch(limited):
    error = rejection(limited.stub.ClassifyBatch, pb.ClassifyBatchRequest(images=[raw_image(PIXELS)] * 5))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "over the limit of 4" in error.details()
    assert len(limited.stub.ClassifyBatch(pb.ClassifyBatchRequest(images=[raw_image(PIXELS)] * 4), timeout=10).results) == 4


def test_max_concurrent_streams_bounds_the_streams_of_one_connection(limited):
    release = threading.Event()

    def held_open():
        yield classify_request()
        release.wait(20)

    with private_channel(limited.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        streams = [stub.ClassifyStream(held_open(), timeout=30) for _ in range(2)]
        for stream in streams:
            next(stream)  # both streams are open and answered
        with pytest.raises(grpc.RpcError) as err:
            stub.Classify(classify_request(), timeout=1.5)  # a third stream waits for a free one
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert limited.stub.Classify(classify_request(), timeout=10).predictions  # another connection is not blocked
        release.set()
        for stream in streams:
            list(stream)
        assert stub.Classify(classify_request(), timeout=10).predictions


def test_grpc_and_metrics_listen_on_loopback_only_by_default(server):
    defaults = ServerConfig()
    assert (defaults.host, defaults.metrics_host) == ("127.0.0.1", "127.0.0.1")
    assert not (defaults.tls_cert or defaults.auth_tokens or defaults.auth_tokens_file)
    listening = {c.laddr.port: ipaddress.ip_address(c.laddr.ip)
                 for c in psutil.Process(server.process.pid).net_connections("inet") if c.status == psutil.CONN_LISTEN}
    for port in (server.metrics_port, server.port):
        address = listening[port]
        address = getattr(address, "ipv4_mapped", None) or address  # gRPC listens on ::ffff:127.0.0.1
        assert address.is_loopback, (port, address)


# ---- the model repository stays shut ------------------------------------------------------

class _CreatesAFileWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def list_models(srv: ServerProcess) -> dict[str, pb.ModelVersionStatus]:
    return {m.name: m for m in srv.stub.ListModels(pb.ListModelsRequest(), timeout=10).models}


def test_a_pickle_posing_as_a_model_is_never_unpickled(start_server, model_repo, tmp_path):
    marker = tmp_path / "unpickled"
    version = model_repo / "trojan" / "1"
    version.mkdir(parents=True)
    (version / "model.onnx").write_bytes(pickle.dumps(_CreatesAFileWhenUnpickled(marker)))
    shutil.copy(model_repo / "cifar10" / "1" / "model_card.json", version)
    srv = start_server(repository=model_repo)
    assert list_models(srv)["trojan"].state == pb.FAILED
    assert not marker.exists()


@pytest.mark.parametrize("link", ["version directory", "model directory"])
def test_a_symlink_pointing_outside_the_repository_is_not_served(start_server, model_repo, tmp_path, link):
    outside = tmp_path / "outside"
    shutil.copytree(model_repo / "cifar10", outside / "escaped")  # a valid model, outside the repository
    if link == "version directory":
        (model_repo / "escaped").mkdir()
        os.symlink(outside / "escaped" / "1", model_repo / "escaped" / "1")
    else:
        os.symlink(outside / "escaped", model_repo / "escaped")
    srv = start_server(repository=model_repo)
    assert "escaped" not in list_models(srv)
    assert "points outside the repository" in srv.log()
    error = rejection(srv.stub.Classify, pb.ClassifyRequest(image=raw_image(PIXELS), model_name="escaped"))
    assert error.code() == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("name", ["../x", "..", "../../etc/passwd", "cifar10/../cifar10", "/etc", ".hidden",
                                  "x\\..\\y", "cifar10\0", "a" * 65])
def test_model_names_that_could_escape_the_repository_are_invalid(server, name):
    for call, request in ((server.stub.Classify, pb.ClassifyRequest(image=raw_image(PIXELS), model_name=name)),
                          (server.stub.GetModelMetadata, pb.GetModelMetadataRequest(model_name=name))):
        error = rejection(call, request)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "is not valid" in error.details()
