"""The guarded URL fetcher (engine/urls.py) and the state-folder lock (server/statelock.py).

The address policy is tested with name resolution stubbed, and the fetcher with a mock transport
or a server on loopback, so no traffic leaves the machine."""

from __future__ import annotations

import http.server
import ipaddress
import io
import os
import socket
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from engine import urls
from engine.urls import UNREACHABLE, URLRefused

REFUSED = ["127.0.0.1", "127.8.9.10", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
           "0.0.0.0", "224.0.0.1", "240.0.0.1", "255.255.255.255", "192.0.2.1", "198.18.0.1",
           "::1", "::", "fe80::1", "fc00::1", "ff02::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254",
           "::ffff:10.0.0.1", "64:ff9b::127.0.0.1", "64:ff9b::a9fe:a9fe", "2002:7f00:1::1", "2002:a9fe:a9fe::",
           "::127.0.0.1", "::10.0.0.1", "2001:0:4136:e378:8000:63bf:80ff:fffe"]
ALLOWED = ["93.184.216.34", "8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]


def stub_dns(monkeypatch, address: str) -> None:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET

    def getaddrinfo(host, port, *args, **kwargs):
        return [(family, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(urls.socket, "getaddrinfo", getaddrinfo)


@pytest.fixture()
def no_connections(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the policy let a connection through")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("address", REFUSED)
def test_non_public_addresses_are_refused_before_connecting(monkeypatch, no_connections, address):
    stub_dns(monkeypatch, address)
    with pytest.raises(URLRefused):
        urls.pin("https://images.example/cat.png")
    with pytest.raises(URLRefused):
        urls.fetch("https://images.example/cat.png", max_bytes=1000)


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_are_pinned(monkeypatch, address):
    stub_dns(monkeypatch, address)
    target = urls.pin("https://images.example:8443/cat.png?x=1")
    assert ipaddress.ip_address(target.address) == ipaddress.ip_address(address)
    assert target.host_header == "images.example:8443"
    assert target.server_name == "images.example"
    assert target.url.endswith(":8443/cat.png?x=1") and "images.example" not in target.url


@pytest.mark.parametrize("url", ["ftp://images.example/a", "file:///etc/passwd", "gopher://x/", "//x/y",
                                 "http://user:pw@images.example/", "http://[::1/"])
def test_only_plain_http_urls(url):
    with pytest.raises(URLRefused):
        urls.pin(url)


def test_a_mixed_answer_is_refused(monkeypatch):
    """A host that resolves to a public and a private address is refused (no picking)."""
    def getaddrinfo(host, port, *args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", port)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr(urls.socket, "getaddrinfo", getaddrinfo)
    with pytest.raises(URLRefused):
        urls.pin("http://rebind.example/")


def test_connects_to_the_checked_address_and_checks_every_redirect(monkeypatch):
    """The request goes to the address that was checked (Host and TLS name carry the name), so
    a second DNS answer cannot redirect it; a redirect to metadata is refused at its hop."""
    stub_dns(monkeypatch, "93.184.216.34")
    seen = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.path == "/start":
            return httpx.Response(302, headers={"Location": "http://169.254.169.254/latest/meta-data"})
        return httpx.Response(200, content=b"ok")

    transport = httpx.MockTransport(handler)
    assert urls.fetch("https://images.example/ok", max_bytes=10, transport=transport) == b"ok"
    first = seen[0]
    assert first.url.host == "93.184.216.34" and first.headers["host"] == "images.example"
    assert first.extensions["sni_hostname"] == "images.example"

    def rebinding(host, port, *args, **kwargs):
        address = "93.184.216.34" if host == "images.example" else "169.254.169.254"
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(urls.socket, "getaddrinfo", rebinding)
    with pytest.raises(URLRefused, match="not a public address"):
        urls.fetch("https://images.example/start", max_bytes=10, transport=transport)
    assert all(r.url.host == "93.184.216.34" for r in seen)


def test_size_cap_and_redirect_limit(monkeypatch):
    stub_dns(monkeypatch, "93.184.216.34")
    big = httpx.MockTransport(lambda request: httpx.Response(200, content=b"x" * 1000))
    with pytest.raises(URLRefused, match="larger than"):
        urls.fetch("https://images.example/big", max_bytes=999, transport=big)
    loop = httpx.MockTransport(lambda request: httpx.Response(302, headers={"Location": "/again"}))
    with pytest.raises(URLRefused, match="redirects too many times"):
        urls.fetch("https://images.example/loop", max_bytes=10, transport=loop)


class Pages(http.server.BaseHTTPRequestHandler):
    png = b""

    def do_GET(self):  # noqa: N802 - the handler's name is fixed by http.server
        if self.path == "/a":
            self.send_response(302)
            self.send_header("Location", "/b")
            self.end_headers()
        elif self.path == "/b":
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_port}/image.png")
            self.end_headers()
        elif self.path == "/image.png":
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.png)))
            self.end_headers()
            self.wfile.write(self.png)
        else:
            self.send_response(404)
            self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def page_server():
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 20, 20)).save(buffer, "PNG")
    Pages.png = buffer.getvalue()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Pages)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_redirect_chain_on_a_trusted_network(page_server):
    """With private addresses allowed (a trusted network), a redirect chain is followed hop by
    hop; without, the first hop is refused."""
    assert urls.fetch(f"{page_server}/a", max_bytes=10_000, allow_private=True) == Pages.png
    with pytest.raises(URLRefused, match="not a public address"):
        urls.fetch(f"{page_server}/a", max_bytes=10_000)


def test_network_errors_read_alike(page_server):
    """A closed port, a 404 and a refused address give no hint of which is which."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    messages = set()
    for url in (f"http://127.0.0.1:{closed}/x", f"{page_server}/missing"):
        with pytest.raises(URLRefused) as info:
            urls.fetch(url, max_bytes=100, allow_private=True, timeout_s=5)
        messages.add(str(info.value))
    assert messages == {UNREACHABLE}


# ------------------------------------------------------------------ one server per state folder

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from server.statelock import lock_state_folder
    lock = lock_state_folder(Path(sys.argv[1]))
    print("locked", flush=True)
    time.sleep(120)
""")


def test_second_server_on_one_state_folder_fails_and_touches_nothing(tmp_path, models_file):
    """A process holding the folder (as a running `ember serve` does) makes a second `ember
    serve` fail at once, naming the holder's pid, before restart recovery could rewrite the
    first server's live predictions."""
    home = tmp_path / "home"
    home.mkdir()
    db = sqlite3.connect(home / "ember.db")
    db.executescript("CREATE TABLE predictions (id TEXT PRIMARY KEY, owner TEXT, created_at TEXT NOT NULL, "
                     "status TEXT NOT NULL, model TEXT, version TEXT, source TEXT, doc TEXT NOT NULL);")
    db.execute("INSERT INTO predictions VALUES ('p1', NULL, '2026-01-01T00:00:00Z', 'processing', 'm', 'v', "
               "'replicate', '{\"id\": \"p1\", \"status\": \"processing\", \"created_at\": \"2026-01-01T00:00:00Z\"}')")
    db.commit()
    db.close()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent), "EMBER_HOME": str(home),
           "EMBER_MODELS": str(models_file)}
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(home)], env=env, stdout=subprocess.PIPE, text=True)
    busy = socket.socket()  # the first server's port: a second server could not bind it either
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        assert holder.stdout.readline().strip() == "locked"
        started = time.monotonic()
        second = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--port", str(busy.getsockname()[1])], env=env,
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 4, second.stdout + second.stderr
        assert f"pid {holder.pid}" in " ".join(second.stdout.split())
        assert time.monotonic() - started < 60
        status = sqlite3.connect(home / "ember.db").execute("SELECT status FROM predictions").fetchone()[0]
        assert status == "processing"
    finally:
        busy.close()
        holder.kill()
        holder.wait()
    from server.statelock import lock_state_folder

    lock_state_folder(home).release()  # the holder's death freed the folder
