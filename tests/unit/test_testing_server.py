"""The test and benchmark server wrapper's HTTP calls, against a loopback stand-in for SGLang."""

from __future__ import annotations

import http.server
import threading
import urllib.parse
from collections.abc import Iterator

import pytest
import requests

from sala_sglang.testing.server import Server, flush_cache


class _BusyScheduler(http.server.BaseHTTPRequestHandler):
    """SGLang's /flush_cache while the scheduler still holds a request it has already answered:
    refused (400) unless the call lets it wait (`timeout` in seconds), as SGLang 0.5.16 does."""

    calls: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802 (the name http.server dispatches to)
        path, _, query = self.path.partition("?")
        args = dict(urllib.parse.parse_qsl(query))
        self.calls.append({"path": path, **args})
        waits = float(args.get("timeout", 0)) > 0
        body = b"Cache flushed.\n" if waits else b"Cache not flushed: pending requests\n"
        self.send_response(200 if waits else 400)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def busy_url() -> Iterator[str]:
    _BusyScheduler.calls = []
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BusyScheduler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_flush_cache_waits_for_the_scheduler_to_go_idle(busy_url: str) -> None:
    flush_cache(busy_url)
    server = Server.__new__(Server)  # only its url: no process is started
    server.url = busy_url
    server.flush_cache()
    assert [c["path"] for c in _BusyScheduler.calls] == ["/flush_cache"] * 2
    assert all(float(c["timeout"]) >= 30 for c in _BusyScheduler.calls)


def test_a_refused_flush_is_an_error(busy_url: str) -> None:
    """The stand-in itself: without a timeout it refuses, as the failure this guards against."""
    with pytest.raises(requests.HTTPError, match="400"):
        requests.post(busy_url + "/flush_cache", timeout=10).raise_for_status()
