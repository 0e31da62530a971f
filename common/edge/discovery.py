"""Where the instances of a tier are: each entry of a tier list is a static `host:port`, or a DNS name whose
records are its instances (compose replicas, a Kubernetes headless Service), re-resolved periodically:

  dns:///NAME:PORT            the system resolver (/etc/hosts, the search domains of /etc/resolv.conf)
  dns://SERVER[:53]/NAME:PORT that DNS server, asked directly (A and AAAA records)

as gRPC names them. Every address a name resolves to is one instance, `ip:port`. Its certificate is checked
against NAME (every instance behind a name holds a certificate for it), not against the address.
"""

import ipaddress
import socket
from dataclasses import dataclass

import dns.exception
import dns.resolver

from common.basics.targets import Target, parse_target

__all__ = ["Instance", "Target", "parse_target", "resolve"]

_DNS_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Instance:
    address: str  # host:port (ip:port for a resolved name), what calls dial
    tls_name: str | None = None  # the name its certificate is checked against; None: the address's host


def resolve(target: Target) -> list[Instance] | None:
    """The target's instances now, sorted by address; None when its name cannot be resolved (keep what was
    known: a DNS hiccup must not empty a tier). A static target is itself."""
    if not target.resolved:
        return [Instance(target.text)]
    try:
        ips = _ask(target) if target.dns_server else _system(target)
    except (OSError, dns.exception.DNSException):
        return None
    return [Instance(_address(ip, target.port), target.host) for ip in sorted(set(ips))]


def _system(target: Target) -> list[str]:
    return [info[4][0] for info in socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)]


def _ask(target: Target) -> list[str]:
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers, resolver.port, resolver.lifetime = [target.dns_server], target.dns_port, _DNS_TIMEOUT_S
    ips = []
    for kind in ("A", "AAAA"):
        try:
            ips += [record.address for record in resolver.resolve(target.host, kind, search=False)]
        except (dns.resolver.NoAnswer, dns.resolver.NXDOMAIN):
            continue
    return ips


def _address(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ipaddress.ip_address(ip).version == 6 else f"{ip}:{port}"
