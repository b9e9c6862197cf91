"""The HTTP endpoint: bound when created (so a bad address or a port in use is one
line before any daemon forks), serving from a thread once started."""

from __future__ import annotations

import socket
import threading
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from memlend.errors import UserError


def parse_metrics_address(text: str) -> tuple[str, int]:
    """'ADDR:PORT' or '[V6]:PORT' -> (addr, port); UserError if malformed."""
    from memlend.remote.client import parse_address

    try:
        host, port = parse_address(text)
    except ValueError:
        raise UserError(f"--metrics {text!r}: expected ADDR:PORT, e.g. 127.0.0.1:9400") from None
    return host, port


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass  # one line per scrape would flood the daemon's log


class MetricsEndpoint:
    """Serves /metrics (any path) in Prometheus text format for the collectors given."""

    def __init__(self, address: str) -> None:
        host, port = parse_metrics_address(address)
        try:
            family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        except socket.gaierror as e:
            raise UserError(f"--metrics {address}: cannot resolve {host!r}: {e.strerror}") from None
        # Process CPU seconds, resident memory and open fds come from /proc at scrape time.
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)

        class Server(ThreadingWSGIServer):
            address_family = family

        try:
            self._httpd = make_server(
                host, port, make_wsgi_app(self.registry), Server, handler_class=_Quiet
            )
        except OSError as e:
            raise UserError(f"--metrics {address}: {e.strerror or e}") from None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        """ADDR:PORT as bound (the port chosen by the kernel if 0 was asked)."""
        host, port = self._httpd.server_address[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def start(self, *collectors: Collector) -> None:
        for c in collectors:
            self.registry.register(c)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, name="memlend-metrics", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join(5)
        self._httpd.server_close()
