"""Allow-list hosts: addresses, networks, localhost, '*', and names resolved up front."""

from __future__ import annotations

from gateway.security.allowlist import peer_address, peer_in, resolve_hosts


def test_addresses_networks_localhost_and_star() -> None:
    networks, unresolved = resolve_hosts(["10.1.0.0/16", "192.0.2.7", "localhost"])
    assert unresolved == []
    assert peer_in("10.1.200.3", networks)
    assert peer_in("192.0.2.7", networks)
    assert peer_in("127.0.0.5", networks) and peer_in("::1", networks)
    assert not peer_in("192.0.2.8", networks)
    assert peer_in("203.0.113.9", resolve_hosts(["*"])[0])


def test_a_host_name_is_resolved_once_and_then_matches_its_addresses() -> None:
    import socket

    this_host = socket.gethostname()  # in /etc/hosts: no DNS needed
    expected = socket.getaddrinfo(this_host, None, type=socket.SOCK_STREAM)[0][4][0]
    networks, unresolved = resolve_hosts([this_host, "no-such-host.invalid"])
    assert unresolved == ["no-such-host.invalid"]
    assert peer_in(str(expected), networks)


def test_ipv4_mapped_and_zoned_peers_are_compared_as_plain_addresses() -> None:
    assert str(peer_address("::ffff:127.0.0.1")) == "127.0.0.1"
    assert str(peer_address("fe80::1%eth0")) == "fe80::1"
    assert peer_address("not-an-address") is None
    assert not peer_in("not-an-address", resolve_hosts(["*"])[0])
