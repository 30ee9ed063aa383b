"""Which addresses a request may reach, checked on the address actually connected to (after DNS, on every hop).

Catalog URLs are the user's own and may point at a private mirror, but no request ever reaches a link-local address:
169.254.169.254 is where clouds serve a machine's credentials. URL-list images are third-party URLs (millions of
them, and their redirects), so they reach only public addresses, unless a network is allowed by the setting
`MVDATA_IMAGE_ALLOWED_NETWORKS` (the demo and the tests allow loopback). Plain Python.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network


@dataclass(frozen=True)
class AddressPolicy:
    public_only: bool  # refuse private, loopback, multicast and reserved addresses too, not only link-local
    allowed: tuple[IPv4Network | IPv6Network, ...] = ()  # networks reachable all the same

    @classmethod
    def third_party(cls, allowed: Iterable[str] = ()) -> AddressPolicy:
        """For URLs nobody of the project chose: public addresses only, and the networks `allowed`."""
        return cls(True, tuple(ip_network(network, strict=False) for network in allowed))

    @functools.lru_cache(maxsize=4096)  # noqa: B019 - a few policies, each living as long as the process
    def refusal(self, ip: str) -> str | None:
        """Why a connection to `ip` is refused (None: it is not)."""
        try:
            address: IPv4Address | IPv6Address = ip_address(ip.strip("[]").split("%")[0])
        except ValueError:
            return f"{ip!r} is not an IP address"
        if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if any(address in network for network in self.allowed):
            return None
        if address.is_link_local:
            return f"{address} is link-local (where clouds serve credentials)"
        if not self.public_only:
            return None
        for kind in ("loopback", "private", "multicast", "reserved", "unspecified"):
            if getattr(address, f"is_{kind}"):
                return f"{address} is a {kind} address"
        return None


CATALOG = AddressPolicy(public_only=False)


def check_network(network: str) -> str:
    """A network of `MVDATA_IMAGE_ALLOWED_NETWORKS`, as given; ValueError naming it when it is not one."""
    try:
        ip_network(network, strict=False)
    except ValueError as exc:
        raise ValueError(f"MVDATA_IMAGE_ALLOWED_NETWORKS: {network!r} is not a network ({exc})") from None
    return network
