"""The download's network guard: refuse loopback, private and link-local addresses (SSRF).

A metadata row is a URL somebody else wrote. Checking the URL's text before the download
cannot be the guard: names (``localhost``, a DNS name that resolves to 10.0.0.1), numeric
forms (``127.1``, ``2130706433``, ``0x7f000001``, ``0177.0.0.1``), URL parsers that disagree
about the host (``http://127.0.0.1:80?@example.com``) and redirects all get past it. So the
check is made where the connection is made, on the address the socket is about to connect
to, for every hop of a redirect:

- :class:`GuardedHTTPConnection` (and its HTTPS twin) resolves the host once, refuses every
  address the :class:`NetPolicy` does not allow and connects to the exact address it checked
  (no second lookup, so DNS rebinding cannot swap it), then checks the connected peer again.
- :func:`build_opener` puts these connections in a urllib opener with only the http and https
  handlers (no ``ftp:``, ``file:`` or ``data:``; a redirect to another scheme is refused) and
  the standard redirect handler, whose every hop goes back through the guarded connections.
- :func:`install_guard` makes that opener urllib's global one, which ``urllib.request.urlopen``
  uses: img2dataset's ``download_image`` calls exactly that.
- img2dataset's ``download()`` has no hook, and its workers are separate processes
  (multiprocessing with the *spawn* start method, pyspark or ray), so installing the opener in
  this process would not reach them. What every distributor does ship to each worker is the
  ``Downloader`` object ``download()`` builds through the module global
  ``img2dataset.main.Downloader``. :func:`guard_img2dataset` swaps that global, for the length
  of one ``download()`` call, for a factory that wraps the real ``Downloader`` in a
  :class:`GuardedDownloader` (picklable, importable from here), whose ``__call__`` installs the
  guard in the worker before each shard is downloaded. Both assumptions are checked before
  anything is fetched (``download()`` reads that global; ``download_image`` calls
  ``urllib.request.urlopen``), so an img2dataset release that changes them stops the download
  with a clear error instead of running unguarded.

A refused URL raises :class:`AddressRefused` inside ``urlopen``; img2dataset records its
message (``refused: host 'localhost' resolves to loopback address 127.0.0.1
(download.allow_loopback is false)``) as that sample's ``error_message`` in the shard's
parquet and counts it in ``_stats.json``.

Proxies from the environment (``http_proxy``, ``https_proxy``) are the operator's own
configuration: the connection to the proxy is not checked, and the target host is resolved
here and every one of its addresses checked before the request is sent (the proxy resolves it
again; where this machine cannot resolve it at all, only its literal form is checked).

:func:`literal_host_kind` is the cheap text check the metadata pre-filter counts with; it
parses hosts the way urllib does (numeric IPv4 forms with ``inet_aton``), but it is only a
counter, not the guard.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import importlib
import ipaddress
import socket
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

LOOPBACK = "loopback"
PRIVATE = "private"

_LOOPBACK_KEY = "download.allow_loopback"
_PRIVATE_KEY = "download.allow_private_networks"


class AddressRefused(Exception):  # noqa: N818 - reads as the error message's first word
    """A URL the network guard refused; the message starts with ``refused:`` and says why.

    Not an ``OSError`` on purpose: urllib would wrap one in ``URLError("<urlopen error ...>")``.
    """


@dataclass(frozen=True)
class NetPolicy:
    """Which non-public addresses downloads may connect to (``download.allow_*``)."""

    allow_loopback: bool = False
    allow_private_networks: bool = False


# -- classifying addresses ---------------------------------------------------------------


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1 on the wire
    return ip


def address_kind(address: str) -> tuple[str, str] | None:
    """``None`` for a public address, else (``LOOPBACK`` or ``PRIVATE``, a description)."""
    ip = _ip(address)
    if ip.is_loopback:
        return LOOPBACK, f"loopback address {ip}"
    if ip.is_unspecified:  # connecting to 0.0.0.0 or :: reaches this machine
        return LOOPBACK, f"unspecified address {ip}"
    if ip.is_global and not ip.is_multicast and not ip.is_reserved:
        return None
    if ip.is_link_local:
        return PRIVATE, f"link-local address {ip}"
    if ip.is_private:
        return PRIVATE, f"private address {ip}"
    return PRIVATE, f"non-public address {ip}"


def address_refusal(address: str, policy: NetPolicy) -> str | None:
    """Why ``policy`` refuses to connect to ``address``, or ``None`` when it may."""
    kind = address_kind(address)
    if kind is None:
        return None
    group, description = kind
    if group == LOOPBACK:
        return None if policy.allow_loopback else f"{description} ({_LOOPBACK_KEY} is false)"
    return None if policy.allow_private_networks else f"{description} ({_PRIVATE_KEY} is false)"


def _refused(host: str, reason: str) -> AddressRefused:
    return AddressRefused(f"refused: host {host!r} resolves to {reason}")


def guarded_create_connection(
    policy: NetPolicy,
    address: tuple[str, int],
    timeout: Any = None,
    source_address: tuple[str, int] | None = None,
) -> socket.socket:
    """``socket.create_connection`` that only connects to addresses ``policy`` allows.

    The host is resolved once; each address is checked and the socket connects to that same
    address, so the name cannot resolve to something else in between.
    """
    host, port = address
    refusals: list[str] = []
    error: OSError | None = None
    for family, socktype, proto, _, sockaddr in socket.getaddrinfo(
        host, port, 0, socket.SOCK_STREAM
    ):
        reason = address_refusal(sockaddr[0], policy)
        if reason is not None:
            refusals.append(reason)
            continue
        sock = socket.socket(family, socktype, proto)
        try:
            if isinstance(timeout, int | float):  # else the module default (a sentinel)
                sock.settimeout(timeout)
            if source_address:
                sock.bind(source_address)
            sock.connect(sockaddr)
            reason = address_refusal(sock.getpeername()[0], policy)
            if reason is not None:  # cannot happen; checked again because it is cheap
                sock.close()
                raise _refused(host, reason)
            return sock
        except OSError as exc:
            sock.close()
            error = exc
    if error is not None:
        raise error
    if refusals:
        raise _refused(host, refusals[0])
    raise OSError(f"getaddrinfo returned no address for {host!r}")


def check_host(host: str, port: int, policy: NetPolicy) -> None:
    """Resolve ``host`` here and refuse it when any of its addresses is not allowed.

    For requests through a proxy, which resolves the name itself. Where this machine cannot
    resolve the name, only its literal form is checked.
    """
    try:
        infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    except OSError:
        addresses = [host] if _literal_ip(host) is not None else []
    else:
        addresses = [info[4][0] for info in infos]
    for address in addresses:
        reason = address_refusal(_literal_ip(address) or address, policy)
        if reason is not None:
            raise _refused(host, reason)


# -- urllib's opener ---------------------------------------------------------------------


class GuardedHTTPConnection(http.client.HTTPConnection):
    """An ``HTTPConnection`` whose ``connect()`` checks every address it connects to.

    Made by :func:`_connection_factory`; the class defaults are the strictest policy.
    """

    netguard: NetPolicy = NetPolicy()
    proxied: bool = False  # to the operator's proxy: the handler checked the target instead

    def connect(self) -> None:
        if self.proxied:
            super().connect()
            return
        sys.audit("http.client.connect", self, self.host, self.port)
        self.sock = guarded_create_connection(
            self.netguard, (self.host, self.port), self.timeout, self.source_address
        )
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class GuardedHTTPSConnection(http.client.HTTPSConnection, GuardedHTTPConnection):
    """``HTTPSConnection.connect`` calls ``super().connect()``: the guarded one, before TLS."""


def _connection_factory(
    cls: type[GuardedHTTPConnection], netguard: NetPolicy, proxied: bool, *args: Any, **kwargs: Any
) -> GuardedHTTPConnection:
    conn = cls(*args, **kwargs)
    conn.netguard = netguard
    conn.proxied = proxied
    return conn


def _proxied(req: urllib.request.Request) -> bool:
    return req.has_proxy() or bool(getattr(req, "_tunnel_host", None))


class _GuardedHandlerMixin:
    netguard: NetPolicy

    def _connection(self, cls: type, req: urllib.request.Request) -> Any:
        proxied = _proxied(req)
        if proxied:
            target = urllib.parse.urlsplit(req.full_url)
            default = 443 if target.scheme == "https" else 80
            check_host(target.hostname or "", target.port or default, self.netguard)
        return functools.partial(_connection_factory, cls, self.netguard, proxied)


class GuardedHTTPHandler(_GuardedHandlerMixin, urllib.request.HTTPHandler):
    def __init__(self, policy: NetPolicy) -> None:
        super().__init__()
        self.netguard = policy

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._connection(GuardedHTTPConnection, req), req)


class GuardedHTTPSHandler(_GuardedHandlerMixin, urllib.request.HTTPSHandler):
    """Python's default TLS context and certificate checks, as plain ``urlopen`` has."""

    def __init__(self, policy: NetPolicy) -> None:
        super().__init__()
        self.netguard = policy

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._connection(GuardedHTTPSConnection, req), req)


class GuardedRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Follows http(s) redirects only (urllib also follows ``ftp:``); each hop is guarded."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        scheme = urllib.parse.urlsplit(newurl).scheme.lower()
        if scheme not in ("http", "https"):
            fp.close()
            raise AddressRefused(
                f"refused: redirect to {newurl!r} (only http and https redirects are followed)"
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def build_opener(policy: NetPolicy) -> urllib.request.OpenerDirector:
    """A urllib opener for http(s) only whose every connection, redirects included, is guarded."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.UnknownHandler(),
        GuardedHTTPHandler(policy),
        GuardedHTTPSHandler(policy),
        urllib.request.HTTPDefaultErrorHandler(),
        GuardedRedirectHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


def install_guard(policy: NetPolicy) -> None:
    """Make the guarded opener the one ``urllib.request.urlopen`` uses in this process."""
    urllib.request.install_opener(build_opener(policy))


# -- img2dataset's workers ---------------------------------------------------------------


def _check_download_image() -> None:
    from img2dataset.downloader import download_image

    names = download_image.__code__.co_names
    if "urlopen" not in names or "Request" not in names:
        raise RuntimeError(
            "img2dataset's download_image no longer calls urllib.request.urlopen, so "
            "recaption's network guard cannot be installed; use the img2dataset version "
            "this guard was tested with (1.47)"
        )


class GuardedDownloader:
    """img2dataset's ``Downloader``, with the guard installed in the worker before each shard.

    The distributors pickle this object to their workers (spawned processes, pyspark or ray
    executors); its class is importable from here, so unpickling it needs nothing else.
    """

    def __init__(self, downloader: Any, policy: NetPolicy) -> None:
        self.downloader = downloader
        self.policy = policy

    def __call__(self, row: Any) -> Any:
        _check_download_image()
        install_guard(self.policy)
        return self.downloader(row)


@contextlib.contextmanager
def guard_img2dataset(policy: NetPolicy) -> Iterator[list[GuardedDownloader]]:
    """Within the block, img2dataset's ``download()`` hands workers a :class:`GuardedDownloader`.

    Yields the list of the downloaders made; after ``download()`` it must not be empty.
    """
    from img2dataset.downloader import Downloader

    # Not ``import img2dataset.main``: the package's ``main`` attribute is its main() function.
    i2d_main = importlib.import_module("img2dataset.main")

    if (
        i2d_main.Downloader is not Downloader
        or "Downloader" not in i2d_main.download.__code__.co_names
    ):
        raise RuntimeError(
            "img2dataset.main.download no longer builds its Downloader through the module "
            "global img2dataset.main.Downloader (or it is already replaced), so recaption's "
            "network guard cannot reach its workers; use the img2dataset version this "
            "guard was tested with (1.47)"
        )
    _check_download_image()
    made: list[GuardedDownloader] = []

    def factory(*args: Any, **kwargs: Any) -> GuardedDownloader:
        guarded = GuardedDownloader(Downloader(*args, **kwargs), policy)
        made.append(guarded)
        return guarded

    i2d_main.Downloader = factory  # type: ignore[assignment,misc]
    try:
        yield made
    finally:
        i2d_main.Downloader = Downloader  # type: ignore[misc]


# -- the literal pre-check (counting only) -------------------------------------------------


def _literal_ip(host: str) -> str | None:
    """The address a numeric host means to ``getaddrinfo`` (``inet_aton`` forms), or None."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if ":" in host:
        return None
    try:
        return socket.inet_ntoa(socket.inet_aton(host))
    except OSError:
        return None


def url_host(netloc: str) -> str:
    """The host urllib connects to for a URL's netloc (the part between ``//`` and ``/?#``).

    As ``urllib.request`` does: percent-decoded, port split at the last ``:`` after any
    ``]``. A ``user@`` part (which urllib does not support for http) is dropped.
    """
    host = urllib.parse.unquote(netloc).rpartition("@")[2]
    colon, bracket = host.rfind(":"), host.rfind("]")
    if colon > bracket:
        host = host[:colon]
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host


def literal_host_kind(netloc: str) -> str | None:
    """``LOOPBACK`` or ``PRIVATE`` when the netloc's host is one without any DNS lookup.

    Numeric addresses in every form ``getaddrinfo`` accepts, and ``localhost`` names. A name
    that resolves to a private address is only caught at connect time.
    """
    host = url_host(netloc).rstrip(".").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return LOOPBACK
    address = _literal_ip(host)
    if address is None:
        return None
    kind = address_kind(address)
    return None if kind is None else kind[0]
