"""The entries of a tier list, parsed (no I/O: common/edge/discovery.py resolves them): a static `host:port`,
or a DNS name whose records are the tier's instances, as gRPC names them:

  dns:///NAME:PORT            the system resolver
  dns://SERVER[:PORT]/NAME:PORT that DNS server, asked directly
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """One entry of a tier list."""

    text: str  # as given
    host: str
    port: int
    dns_server: str | None = None  # dns://SERVER/...: ask it directly
    dns_port: int = 53
    resolved: bool = False  # a dns: name (its records are the instances) rather than one static address


def parse_target(text: str) -> Target:
    """Raises ValueError saying what is wrong."""
    if text.startswith("dns:"):
        rest = text[len("dns:"):]
        if not rest.startswith("//"):
            raise ValueError(f"{text!r}: write dns:///NAME:PORT (system resolver) or dns://SERVER/NAME:PORT")
        authority, _, name = rest[2:].partition("/")
        host, port = _host_port(name, text)
        server, server_port = None, 53
        if authority:
            server_host, _, server_port_text = authority.rpartition(":") if ":" in authority else (authority, "", "53")
            server, server_port = server_host, _port(server_port_text or "53", text)
        return Target(text, host, port, server, server_port, resolved=True)
    host, port = _host_port(text, text)
    return Target(text, host, port)


def _host_port(text: str, whole: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{whole!r}: expected HOST:PORT (or dns:///NAME:PORT)")
    return host.strip("[]"), _port(port, whole)


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{whole!r}: the port must be a number in [1, 65535]")
    return int(text)


