"""Peer allow-lists: the hosts of ``dicom.allowed_callers`` and ``hl7.allowed_senders``.

A host entry is an IP address, a network (``10.1.0.0/16``), ``localhost`` (any loopback
address), ``*`` (anyone) or a host name.  Names are resolved once, when the listener
starts or the config is reloaded, never in the accept path; the check per connection is
then a membership test on addresses.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

LOOPBACK: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)
ANY: tuple[IPNetwork, ...] = (ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0"))


def peer_address(host: str) -> IPAddress | None:
    """The peer's address as given by the socket (zone index dropped, IPv4-mapped IPv6
    unmapped), or None when *host* is not an address."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def resolve_hosts(hosts: Iterable[str]) -> tuple[tuple[IPNetwork, ...], list[str]]:
    """The networks *hosts* stand for, and the host names that did not resolve."""
    networks: list[IPNetwork] = []
    unresolved: list[str] = []
    for host in hosts:
        if host == "*":
            networks.extend(ANY)
        elif host == "localhost":
            networks.extend(LOOPBACK)
        else:
            try:
                networks.append(ipaddress.ip_network(host, strict=False))
            except ValueError:
                try:
                    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
                except OSError:
                    unresolved.append(host)
                    continue
                for info in infos:
                    addr = peer_address(str(info[4][0]))
                    if addr is not None:
                        networks.append(ipaddress.ip_network(addr))
    return tuple(networks), unresolved


def peer_in(peer: str, networks: Iterable[IPNetwork]) -> bool:
    addr = peer_address(peer)
    return addr is not None and any(addr in net for net in networks)
