"""Where the podiam servers are: ``--server-address`` parsed, and each name resolved to every
replica it lists now (a headless Service's name has one address per server pod)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from dataclasses import dataclass

log = logging.getLogger(__name__)


def parse_addresses(text: str) -> list[tuple[str, int]]:
    """``host:port[,host:port...]`` as (host, port) pairs; ValueError says what is wrong."""
    addresses = []
    for part in text.split(","):
        host, sep, port = part.strip().rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{part.strip()!r} is not host:port")
        addresses.append((host, int(port)))
    return addresses


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One server replica: the name its certificate is checked against, and one address."""

    name: str
    ip: str
    port: int

    @property
    def target(self) -> str:
        if ipaddress.ip_address(self.ip).version == 6:
            return f"ipv6:[{self.ip}]:{self.port}"
        return f"ipv4:{self.ip}:{self.port}"

    def __str__(self) -> str:
        if self.name == self.ip:
            return f"{self.ip}:{self.port}"
        return f"{self.name}:{self.port} ({self.ip})"


async def resolve(addresses: list[tuple[str, int]]) -> list[Endpoint]:
    """Every replica the addresses name now (a headless Service's name lists each server pod);
    names that do not resolve are skipped, so the others still count."""
    loop = asyncio.get_running_loop()
    found: list[Endpoint] = []
    for host, port in addresses:
        try:
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as error:
            log.warning("cannot resolve podiam server %s: %s", host, error)
            continue
        for info in infos:
            endpoint = Endpoint(host, str(info[4][0]), port)
            if endpoint not in found:
                found.append(endpoint)
    return found
