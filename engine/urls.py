"""The one guarded way ember reaches a URL a client gave it (image inputs, webhooks).

A client's URL must not turn the server into a proxy into its own network, so every request:

- is http(s) only, to a host name resolved ONCE here; every address it resolves to must be public
  (not loopback, private, link-local — cloud metadata lives at 169.254.169.254 —, multicast,
  reserved, unspecified, nor an IPv6 form that embeds such an IPv4 address: `::ffff:a.b.c.d`,
  `::a.b.c.d`, NAT64 `64:ff9b::/96`, 6to4 `2002::/16`, Teredo);
- connects to exactly that checked address (the URL's host travels in the Host header and as
  the TLS server name), so a DNS answer that changes between check and connect gains nothing;
- checks every redirect hop the same way, and stops after MAX_REDIRECTS;
- is capped in bytes and in total time;
- fails with one message whatever went wrong on the network, so the error cannot be used to
  probe which hosts and ports exist.

`allow_private` (EMBER_ALLOW_PRIVATE_URLS, for trusted networks) lifts only the address rule.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

MAX_REDIRECTS = 5
NAT64 = ipaddress.ip_network("64:ff9b::/96")
IPV4_COMPATIBLE = ipaddress.ip_network("::/96")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class URLRefused(ValueError):
    """The URL may not be fetched; the message is safe to show the client."""


UNREACHABLE = "could not fetch the URL (it must be a reachable public http(s) address)"


def embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries, for the forms that route to it."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in NAT64 or (address in IPV4_COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_public(address: Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address):
        inner = embedded_ipv4(address)
        if inner is not None:
            return is_public(inner)
    return address.is_global and not (address.is_multicast or address.is_reserved or address.is_loopback
                                       or address.is_link_local or address.is_private
                                       or address.is_unspecified)


@dataclass
class Target:
    """A URL checked against the policy, pinned to the address to connect to."""

    url: str  # the URL with its host replaced by the checked address
    host_header: str
    server_name: str
    address: str

    def request_kwargs(self) -> dict:
        return {"headers": {"Host": self.host_header}, "extensions": {"sni_hostname": self.server_name}}


def check_url(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an absolute http(s) URL, or URLRefused."""
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise URLRefused("the URL is malformed") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise URLRefused("only absolute http(s) URLs can be fetched")
    if parts.username or parts.password:
        raise URLRefused("URLs with credentials are not fetched")
    return parts.scheme, parts.hostname, port


def resolve(host: str, port: int) -> list[Address]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError, ValueError):
        raise URLRefused(UNREACHABLE) from None
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]


def pin(url: str, allow_private: bool = False) -> Target:
    """Check `url` and resolve its host once (blocking: call it off the event loop)."""
    scheme, host, port = check_url(url)
    addresses = resolve(host, port)
    if not addresses:
        raise URLRefused(UNREACHABLE)
    if not allow_private and not all(is_public(a) for a in addresses):
        raise URLRefused("the URL's host is not a public address; this server only fetches public URLs")
    address = addresses[0]
    parts = urlsplit(url)
    literal = f"[{address}]" if address.version == 6 else str(address)
    default_port = (scheme == "https" and port == 443) or (scheme == "http" and port == 80)
    netloc = literal if default_port else f"{literal}:{port}"
    host_header = parts.netloc.rpartition("@")[2]
    return Target(url=parts._replace(netloc=netloc).geturl(), host_header=host_header, server_name=host,
                  address=str(address))


def fetch(url: str, *, max_bytes: int, timeout_s: float = 10.0, allow_private: bool = False,
          transport: httpx.BaseTransport | None = None) -> bytes:
    """GET a client's URL under the policy; the body, at most `max_bytes` (URLRefused otherwise).
    Blocking: call it off the event loop."""
    deadline = time.monotonic() + timeout_s
    with httpx.Client(follow_redirects=False, trust_env=False, transport=transport) as client:
        for _ in range(MAX_REDIRECTS + 1):
            target = pin(url, allow_private)
            left = deadline - time.monotonic()
            if left <= 0:
                raise URLRefused(UNREACHABLE)
            try:
                with client.stream("GET", target.url, timeout=left, **_with_agent(target)) as response:
                    if response.is_redirect and response.headers.get("location"):
                        url = urljoin(url, response.headers["location"])
                        continue
                    if response.status_code != 200:
                        raise URLRefused(UNREACHABLE)
                    return _read_capped(response, max_bytes, deadline)
            except httpx.HTTPError:
                raise URLRefused(UNREACHABLE) from None
        raise URLRefused("the URL redirects too many times")


def _with_agent(target: Target) -> dict:
    kwargs = target.request_kwargs()
    kwargs["headers"]["User-Agent"] = "ember"
    return kwargs


def _read_capped(response: httpx.Response, max_bytes: int, deadline: float) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise URLRefused(f"the URL's content is larger than the {max_bytes} byte limit")
    chunks, size = [], 0
    for chunk in response.iter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise URLRefused(f"the URL's content is larger than the {max_bytes} byte limit")
        if time.monotonic() > deadline:
            raise URLRefused(UNREACHABLE)
        chunks.append(chunk)
    return b"".join(chunks)
