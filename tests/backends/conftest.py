"""Real servers for the shared-tier tests: redis-server (plain, cluster, TLS) and moto S3.

Every server listens on a free loopback port and is started once per session; tests that need
to kill or restart a server start their own with :func:`start_redis`. Tests skip with a clear
reason when ``redis-server`` or moto is missing.
"""

from __future__ import annotations

import http.client
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")
_WAIT_S = 20.0


def free_port(bus_offset: int = 0) -> int:
    """A free loopback TCP port (and ``port + bus_offset`` free too, for cluster buses)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if not bus_offset:
            return port
        if port + bus_offset < 65536:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + bus_offset))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free loopback port pair found")


def require_redis() -> str:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    return REDIS_SERVER


@dataclass
class RedisProcess:
    """One redis-server process we started; ``kill``/``restart`` keep its port and files."""

    port: int
    workdir: Path
    args: list[str] = field(default_factory=list)
    client_kwargs: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "rediss" if self.client_kwargs.get("ssl") else "redis"
        return f"{scheme}://127.0.0.1:{self.port}/0"

    def start(self) -> RedisProcess:
        cmd = [require_redis(), "--bind", "127.0.0.1", "--dir", str(self.workdir),
               "--save", "", "--protected-mode", "no", "--daemonize", "no",
               "--logfile", str(self.workdir / "redis.log"), *self.args]
        if "--tls-port" not in self.args:
            cmd += ["--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.wait_ready()
        return self

    def wait_ready(self) -> None:
        import redis

        deadline = time.monotonic() + _WAIT_S
        while True:
            try:
                client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1, **self.client_kwargs)
                client.ping()
                client.close()
                return
            except redis.AuthenticationError:
                return  # up, and refusing anonymous clients as configured
            except (redis.RedisError, OSError):
                if self.proc is not None and self.proc.poll() is not None:
                    log = (self.workdir / "redis.log").read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"redis-server exited: {log}") from None
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no save, connections cut mid-command."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self) -> None:
        self.kill()
        self.start()


def start_redis(workdir: Path, *args: str, port: int | None = None, **client_kwargs: Any) -> RedisProcess:
    """Start a redis-server of our own on ``port`` or a free one (the caller stops it)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    if "--tls-port" in args:
        args = tuple(a if a != "{port}" else str(port) for a in args)
    return RedisProcess(port, workdir, list(args), dict(client_kwargs)).start()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server
    server.stop()


@pytest.fixture
def make_redis(tmp_path: Path) -> Iterator[Callable[..., RedisProcess]]:
    """Start private redis-servers (``make_redis(*server_args, **client_kwargs)``); stopped after."""
    started: list[RedisProcess] = []

    def make(*args: str, port: int | None = None, **client_kwargs: Any) -> RedisProcess:
        server = start_redis(tmp_path / f"redis{len(started)}", *args, port=port, **client_kwargs)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def unused_port() -> int:
    return free_port()


@pytest.fixture
def key_prefix() -> str:
    """A fresh key prefix per test: tests share servers but never each other's keys."""
    return f"t{uuid.uuid4().hex[:12]}:"


# -- Redis Cluster ------------------------------------------------------------------------------


@dataclass
class RedisCluster:
    nodes: list[RedisProcess]

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]


def _cluster_ok(port: int) -> bool:
    import redis

    try:
        info = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1).execute_command("CLUSTER INFO")
    except (redis.RedisError, OSError):
        return False
    if isinstance(info, dict):  # redis-py parses CLUSTER INFO into a dict
        return str(info.get("cluster_state")) == "ok"
    text = info.decode() if isinstance(info, bytes) else str(info)
    return "cluster_state:ok" in text


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    require_redis()
    if REDIS_CLI is None:
        pytest.skip("redis-cli is not installed (needed to create the cluster)")
    base = tmp_path_factory.mktemp("redis-cluster")
    nodes = []
    for i in range(3):
        port = free_port(bus_offset=10000)
        workdir = base / f"node{i}"
        workdir.mkdir()
        args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "3000", "--appendonly", "no"]
        nodes.append(RedisProcess(port, workdir, args).start())
    try:
        subprocess.run([REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{n.port}" for n in nodes),
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + _WAIT_S
        while not all(_cluster_ok(n.port) for n in nodes):
            if time.monotonic() > deadline:
                raise RuntimeError("redis cluster did not reach cluster_state:ok")
            time.sleep(0.1)
        yield RedisCluster(nodes)
    finally:
        for n in nodes:
            n.stop()


# -- TLS ----------------------------------------------------------------------------------------


@dataclass
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _make_tls_files(directory: Path) -> TlsFiles:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> Path:
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        return path

    def build(subject: str, key: Any, issuer: str, issuer_key: Any, *, ca: bool,
              usage: Any = None, san: Any = None) -> x509.Certificate:
        b = (x509.CertificateBuilder().subject_name(name(subject)).issuer_name(name(issuer))
             .public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=2))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if usage is not None:
            b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        if san is not None:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    def write_cert(cert: x509.Certificate, path: Path) -> Path:
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return path

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = build("kvortex-test-ca", ca_key, "kvortex-test-ca", ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = build("localhost", server_key, "kvortex-test-ca", ca_key, ca=False,
                   usage=ExtendedKeyUsageOID.SERVER_AUTH,
                   san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = build("kvortex-client", client_key, "kvortex-test-ca", ca_key, ca=False,
                   usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    return TlsFiles(
        ca=write_cert(ca, directory / "ca.crt"),
        server_cert=write_cert(server, directory / "server.crt"),
        server_key=write_key(server_key, directory / "server.key"),
        client_cert=write_cert(client, directory / "client.crt"),
        client_key=write_key(client_key, directory / "client.key"),
    )


@dataclass
class TlsRedis:
    server: RedisProcess
    files: TlsFiles
    username: str
    password: str

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.server.port}/0"


@pytest.fixture(scope="session")
def redis_tls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:
    """redis-server speaking only TLS, requiring client certificates and an ACL user."""
    require_redis()
    pytest.importorskip("cryptography", reason="cryptography makes the test CA")
    base = tmp_path_factory.mktemp("redis-tls")
    files = _make_tls_files(base)
    user, password = "kvuser", f"pw-{uuid.uuid4().hex}"
    args = ["--port", "0", "--tls-port", "{port}", "--tls-cert-file", str(files.server_cert),
            "--tls-key-file", str(files.server_key), "--tls-ca-cert-file", str(files.ca),
            "--tls-auth-clients", "yes",
            "--user", user, "on", f">{password}", "~*", "&*", "+@all",
            "--user", "default", "off"]
    client = {"ssl": True, "ssl_ca_certs": str(files.ca), "ssl_certfile": str(files.client_cert),
              "ssl_keyfile": str(files.client_key), "username": user, "password": password}
    try:
        server = start_redis(base / "data", *args, **client)
    except RuntimeError as exc:
        if "TLS" in str(exc) or "tls" in str(exc):
            pytest.skip(f"this redis-server has no TLS support: {exc}")
        raise
    yield TlsRedis(server, files, user, password)
    server.stop()


# -- S3 (moto server) ---------------------------------------------------------------------------


@dataclass
class MotoS3:
    endpoint_url: str

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name="us-east-1")

    def new_bucket(self) -> str:
        name = f"kvortex-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3]:
    pytest.importorskip("moto.server", reason="moto[server] runs the S3 endpoint")
    pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    # Credentials moto accepts; boto3 reads them through its standard chain.
    for var, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        os.environ.setdefault(var, value)
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield MotoS3(f"http://127.0.0.1:{port}")
    server.stop()


@pytest.fixture
def s3_bucket(moto_s3: MotoS3) -> str:
    return moto_s3.new_bucket()


# -- S3 faults: a proxy in front of moto ---------------------------------------------------------


class FaultProxy:
    """An HTTP proxy to the moto endpoint that can pass, fail (HTTP 500) or stall requests.

    ``rule(method, headers)``, when set, picks per request: None (``mode`` decides),
    ``("error", status)``, or ``("slowbody", seconds)``: the upstream's answer, its body
    sent in 20 pieces over ``seconds``.
    """

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.mode = "pass"
        self.rule: Callable[[str, Any], Any] | None = None
        self.stall_s = 3.0
        self.requests = 0
        self.log: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _any(self) -> None:
                proxy.requests += 1
                proxy.log.append(f"{proxy.mode} {self.command} {self.path}")
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                action = proxy.rule(self.command, self.headers) if proxy.rule is not None else None
                if action is not None and action[0] == "error":
                    self._reply(action[1], b"<Error><Code>InternalError</Code><Message>injected</Message></Error>",
                                {"Content-Type": "application/xml"})
                    return
                if proxy.mode == "stall":
                    time.sleep(proxy.stall_s)
                    self.close_connection = True
                    return
                if proxy.mode == "error":
                    self._reply(500, b"<Error><Code>InternalError</Code><Message>injected</Message></Error>",
                                {"Content-Type": "application/xml"})
                    return
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                conn.request(self.command, self.path, body=body, headers=dict(self.headers))
                resp = conn.getresponse()
                data = resp.read()
                headers = {k: v for k, v in resp.getheaders() if k.lower() not in ("transfer-encoding", "content-length", "connection")}
                self._reply(resp.status, data, headers, action[1] if action is not None else 0.0)
                conn.close()

            def _reply(self, status: int, data: bytes, headers: dict[str, str], slow_s: float = 0.0) -> None:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)) if self.command != "HEAD" else headers.get("Content-Length", "0"))
                self.end_headers()
                if self.command == "HEAD":
                    return
                step = max(1, len(data) // 20) if slow_s else len(data) or 1
                try:
                    for i in range(0, len(data), step):
                        self.wfile.write(data[i:i + step])
                        if slow_s:
                            self.wfile.flush()
                            time.sleep(slow_s / 20)
                except OSError:  # the client hung up (a read cut at its deadline)
                    self.close_connection = True

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fault_proxy(moto_s3: MotoS3) -> Iterator[FaultProxy]:
    proxy = FaultProxy(moto_s3.endpoint_url)
    yield proxy
    proxy.close()
