"""A real S3 endpoint for tests and benchmarks: moto in server mode on 127.0.0.1, plus a fault-injecting
reverse proxy (503 SlowDown, reset connections, truncated bodies, stalled responses) to put in front of it."""

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


@contextlib.contextmanager
def _moto_process() -> Iterator[tuple[str, int]]:
    """moto's server in its own process: benchmarks use it so that the server does not share the GIL with
    the client being measured."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto server did not start on 127.0.0.1:{port}") from None
                time.sleep(0.1)
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
    stall_seconds: float = 30.0
    only_get: bool = True      # inject only into GET requests (reads)
    always: str | None = None  # inject this fault into every request ('slowdown', 'reset', ...)
    seen: list[str] = field(default_factory=list)  # 'METHOD path Range' of every request

    def take(self, method: str) -> str | None:
        if self.only_get and method != "GET":
            return None
        if self.always:
            return self.always
        for name in ("slowdown", "reset", "truncate", "stall"):
            n = getattr(self, name)
            if n > 0:
                setattr(self, name, n - 1)
                return name
        return None


class FaultProxy:
    """A reverse proxy on 127.0.0.1 in front of an HTTP endpoint, injecting `faults`."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.faults = Faults()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

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
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                        self.send_header(k, v)
                # HEAD answers carry the object's length with no body: pass it through
                n = resp.getheader("Content-Length") if method == "HEAD" else str(len(data))
                self.send_header("Content-Length", n or "0")
                self.end_headers()
                if fault == "truncate" and len(data) > 1:
                    self.wfile.write(data[: len(data) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if method != "HEAD":
                    self.wfile.write(data)

            def _safe(self) -> None:
                try:
                    self._handle()
                except (BrokenPipeError, ConnectionResetError, TimeoutError):
                    self.close_connection = True  # the client gave up (a stall it timed out on); nothing to do

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _safe

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="fault-proxy", daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
