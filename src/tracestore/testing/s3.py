"""A real S3 endpoint for tests and benchmarks: moto in server mode on 127.0.0.1, plus a recording,
fault-injecting reverse proxy (503 SlowDown, reset connections, truncated bodies, stalled responses, a flipped
byte) to put in front of it, which can also delay each answer's first byte and cap each connection's
bandwidth, like a real object store (`Faults.latency`, `Faults.bandwidth`; in its own process for benchmarks:
`proxy_process`)."""

from __future__ import annotations

import contextlib
import http.client
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class S3Endpoint:
    endpoint: str
    bucket: str

    def storage_options(self, **extra: Any) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "access_key_id": "testing", "secret_access_key": "testing",
                "region": "us-east-1", "allow_http": True, **extra}

    def url(self, path: str) -> str:
        return f"s3://{self.bucket}/{path}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(proc: subprocess.Popen[bytes], port: int, what: str, timeout: float = 30.0) -> None:
    """Wait until a server process listens on 127.0.0.1:port; RuntimeError if it dies or takes too long."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start on 127.0.0.1:{port}") from None
            time.sleep(0.05)


@contextlib.contextmanager
def _moto_process() -> Iterator[tuple[str, int]]:
    """moto's server in its own process: benchmarks use it so that the server does not share the GIL with
    the client being measured."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(proc, port, "moto server")
        yield "127.0.0.1", port
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.contextmanager
def _moto_thread() -> Iterator[tuple[str, int]]:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        yield server.get_host_and_port()
    finally:
        server.stop()


@contextlib.contextmanager
def moto_s3(bucket: str = "tracestore-test", *, process: bool = False) -> Iterator[S3Endpoint]:
    """Start moto's S3 server on 127.0.0.1 (a free port; in a thread, or in its own process), create
    `bucket`, yield, stop."""
    with (_moto_process() if process else _moto_thread()) as (host, port):
        ep = f"http://{host}:{port}"
        conn = http.client.HTTPConnection(host, port, timeout=10)
        # an anonymous CreateBucket works against moto; avoids a boto3 dependency here
        conn.request("PUT", f"/{bucket}")
        resp = conn.getresponse()
        resp.read()
        conn.close()
        if resp.status not in (200, 409):
            raise RuntimeError(f"moto refused CreateBucket {bucket}: HTTP {resp.status}")
        yield S3Endpoint(ep, bucket)


@dataclass
class Faults:
    """What the proxy does to the next requests. Counters count down; `stall_seconds` applies to `stall`."""

    slowdown: int = 0          # answer 503 SlowDown
    reset: int = 0             # close the connection without an answer
    truncate: int = 0          # send the headers and half the body, then close
    stall: int = 0             # wait stall_seconds before answering
    flip: int = 0              # flip one byte in the middle of the body (a checksum must catch it)
    stall_seconds: float = 30.0
    only_get: bool = True      # inject only into GET requests (reads)
    always: str | None = None  # inject this fault into every request ('slowdown', 'reset', ...)
    latency: float = 0.0       # seconds before the first byte of every answer (30 ms: S3 in the same region)
    bandwidth: float | None = None  # bytes per second per connection (None: as fast as the proxy goes)
    seen: list[str] = field(default_factory=list)  # 'METHOD path Range' of every request
    sent: list[tuple[str, str, int]] = field(default_factory=list)  # (method, path, body bytes sent) per answer

    def bytes_sent(self, method: str = "GET", contains: str = "") -> int:
        """Body bytes answered to `method` requests whose path contains `contains`."""
        return sum(n for m, p, n in self.sent if m == method and contains in p)

    def requests(self, method: str = "GET", contains: str = "") -> int:
        """Answers to `method` requests whose path contains `contains`."""
        return sum(1 for m, p, _ in self.sent if m == method and contains in p)

    def take(self, method: str) -> str | None:
        if self.only_get and method != "GET":
            return None
        if self.always:
            return self.always
        for name in ("slowdown", "reset", "truncate", "stall", "flip"):
            n = getattr(self, name)
            if n > 0:
                setattr(self, name, n - 1)
                return name
        return None


class FaultProxy:
    """A reverse proxy on 127.0.0.1 in front of an HTTP endpoint, injecting `faults`."""

    def __init__(self, upstream: str, *, port: int = 0) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.faults = Faults()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                # headers and body go out in separate writes: without this, Nagle's algorithm holds the body
                # until the client's delayed ACK (40 ms on Linux), a latency that no object store has
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def _handle(self) -> None:
                method = self.command
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                proxy.faults.seen.append(f"{method} {self.path} {self.headers.get('Range', '')}")
                fault = proxy.faults.take(method)
                if fault == "reset":
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault == "slowdown":
                    msg = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                if fault == "stall":
                    time.sleep(proxy.faults.stall_seconds)
                host, _, port = proxy.upstream.partition(":")
                conn = http.client.HTTPConnection(host, int(port or 80), timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection",)}
                conn.request(method, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                conn.close()
                if fault == "flip" and data:
                    mid = len(data) // 2
                    data = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1:]
                t0 = time.monotonic()
                if proxy.faults.latency:
                    time.sleep(proxy.faults.latency)
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(k, v)
                # HEAD answers carry the object's length with no body: pass it through
                n = resp.getheader("Content-Length") if method == "HEAD" else str(len(data))
                self.send_header("Content-Length", n or "0")
                self.end_headers()
                if fault == "truncate" and len(data) > 1:
                    proxy.faults.sent.append((method, self.path, len(data) // 2))
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if method != "HEAD":
                    # recorded before the body goes out: once the client has it, the count must be there
                    proxy.faults.sent.append((method, self.path, len(data)))
                    self._send_paced(data, t0)

            def _send_paced(self, data: bytes, t0: float) -> None:
                bw = proxy.faults.bandwidth
                if not bw:
                    self.wfile.write(data)
                    return
                t0 += proxy.faults.latency
                view = memoryview(data)
                for a in range(0, len(data), 1 << 16):
                    # the wait first: a piece goes out when the capped link would have carried it, so that a
                    # client never has the bytes before the time they cost has passed
                    ahead = t0 + (a + len(view[a:a + (1 << 16)])) / bw - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
                    self.wfile.write(view[a:a + (1 << 16)])

            def _safe(self) -> None:
                try:
                    self._handle()
                except (BrokenPipeError, ConnectionResetError, TimeoutError):
                    self.close_connection = True  # the client gave up (a stall it timed out on); nothing to do

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _safe

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="fault-proxy", daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def proxy_process(upstream: str, *, latency: float = 0.0, bandwidth: float | None = None) -> Iterator[str]:
    """A FaultProxy with `latency` and `bandwidth` (no faults) in its own process, so that its Python does not
    share the GIL with the client being measured; yields its endpoint."""
    port = _free_port()
    cmd = [sys.executable, "-m", "tracestore.testing.s3", upstream, "--port", str(port), "--latency", str(latency)]
    if bandwidth:
        cmd += ["--bandwidth", str(bandwidth)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_port(proc, port, "proxy")
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def _main(argv: list[str] | None = None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description="a latency / bandwidth proxy in front of an HTTP endpoint")
    ap.add_argument("upstream")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--bandwidth", type=float, default=None)
    args = ap.parse_args(argv)
    proxy = FaultProxy(args.upstream, port=args.port)
    proxy.faults.latency, proxy.faults.bandwidth = args.latency, args.bandwidth
    proxy.faults.only_get = True
    with proxy:
        proxy._thread.join()


if __name__ == "__main__":
    _main()
