"""Keep-alive `http.client` connections for a segmented download's threads (segments.py), and which URLs they may
take at all.

They follow redirects as libcurl does for the loop (Authorization only to the first host), check the address
actually connected to on every hop (addresses.py), and leave to libcurl any URL the environment sends through a proxy.
Plain Python.
"""

from __future__ import annotations

import os
from http.client import HTTPConnection, HTTPResponse, HTTPSConnection
from urllib.parse import SplitResult, urljoin, urlsplit
from urllib.request import proxy_bypass_environment

from mvdata_assets.datasets.addresses import CATALOG, AddressPolicy
from mvdata_assets.datasets.transport import MAX_REDIRECTS, PermanentError

REDIRECTS = {301, 302, 303, 307, 308}


def proxied(url: str) -> bool:
    """Whether libcurl would reach `url` through a proxy named in the environment.

    Segments connect directly, so such a file goes as one libcurl stream instead. The variables as libcurl reads
    them: `<scheme>_proxy` (also upper case, except HTTP_PROXY, which libcurl ignores), then `all_proxy`/`ALL_PROXY`;
    `no_proxy`/`NO_PROXY` lists hosts (and their subdomains) to reach directly, or is `*`.
    """
    parts, env = urlsplit(url), os.environ
    name = f"{parts.scheme}_proxy"
    upper = env.get(name.upper()) if parts.scheme != "http" else None
    if not (env.get(name) or upper or env.get("all_proxy") or env.get("ALL_PROXY")):
        return False
    return not proxy_bypass_environment(parts.hostname or "", {"no": env.get("no_proxy") or env.get("NO_PROXY") or ""})


_Origin = tuple[str, str, "int | None"]  # scheme, host, port as the URL gives them


class Connections:
    """One thread's keep-alive connections, one per origin: its segments after the first pay no new TCP (or TLS)
    handshake, which on a distant HTTPS server would cost several round trips per segment."""

    def __init__(self, timeout_s: float, addresses: AddressPolicy = CATALOG) -> None:
        self.timeout_s = timeout_s
        self.addresses = addresses
        self._idle: dict[_Origin, HTTPConnection] = {}
        self._origins: dict[HTTPConnection, _Origin] = {}  # of each connection open

    def get(
        self, url: str, headers: dict[str, str], first: str | None = None
    ) -> tuple[HTTPConnection, HTTPResponse, str]:
        """A GET following redirects as libcurl does for the loop: Authorization goes only to the host of `first` (by
        default `url`'s). Also returns the URL that answered."""
        origin = urlsplit(first or url)[:2]
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise PermanentError(f"unsupported URL {url}")
            if parts[:2] != origin:
                headers = {name: value for name, value in headers.items() if name.lower() != "authorization"}
            connection, response = self._request(parts, headers)
            location = response.getheader("location")
            if response.status not in REDIRECTS or not location:
                return connection, response, url
            response.read()  # a redirect's short body: the connection stays usable
            self.put_back(connection, response)
            url = urljoin(url, location)
        raise PermanentError(f"more than {MAX_REDIRECTS} redirects for {url}")

    def _request(self, parts: SplitResult, headers: dict[str, str]) -> tuple[HTTPConnection, HTTPResponse]:
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        origin: _Origin = (parts.scheme, parts.hostname or "", parts.port)
        kept = self._idle.pop(origin, None)
        if kept is not None:
            try:
                kept.request("GET", target, headers=headers)
                return kept, kept.getresponse()
            except ConnectionError:  # the server closed it while it waited (RemoteDisconnected, a reset): a new one
                self.discard(kept)
        kind = HTTPSConnection if parts.scheme == "https" else HTTPConnection
        connection = kind(origin[1], parts.port, timeout=self.timeout_s)
        self._origins[connection] = origin
        try:
            connection.connect()
            refused = self.addresses.refusal(connection.sock.getpeername()[0])  # the address DNS gave, on every hop
            if refused:
                raise PermanentError(f"refused to connect for {parts.geturl()}: {refused}")
            connection.request("GET", target, headers=headers)
            return connection, connection.getresponse()
        except BaseException:
            self.discard(connection)
            raise

    def put_back(self, connection: HTTPConnection, response: HTTPResponse) -> None:
        """A connection whose answer was read whole (and closed) is kept for the next request to its origin; any
        other is closed."""
        if response.isclosed() and not response.will_close:
            self._idle[self._origins[connection]] = connection
        else:
            self.discard(connection)

    def discard(self, connection: HTTPConnection) -> None:
        connection.close()
        self._origins.pop(connection, None)

    def close(self) -> None:
        for connection in list(self._origins):
            self.discard(connection)
        self._idle.clear()
