"""A DNS server on loopback whose A records a test sets (dnspython builds and parses the messages; the socket
is a real UDP one): what a gateway given dns://SERVER/NAME:PORT asks, as it would ask a cluster's DNS."""

import socket
import threading

import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


class DnsServer:
    def __init__(self) -> None:
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._socket.bind(("127.0.0.1", 0))
        self._socket.settimeout(0.2)
        self.port = self._socket.getsockname()[1]
        self.records: dict[str, list[str]] = {}  # name -> IPv4 addresses
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="test dns", daemon=True)

    def authority(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set(self, name: str, addresses: list[str]) -> None:
        with self._lock:
            self.records[name] = list(addresses)

    def start(self) -> "DnsServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._socket.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._socket.recvfrom(4096)
            except TimeoutError:
                continue
            query = dns.message.from_wire(data)
            reply = dns.message.make_response(query)
            reply.flags |= dns.flags.AA
            for question in query.question:
                name = question.name.to_text().rstrip(".")
                with self._lock:
                    addresses = self.records.get(name)
                if addresses is None:
                    reply.set_rcode(dns.rcode.NXDOMAIN)
                elif question.rdtype == dns.rdatatype.A and addresses:
                    reply.answer.append(dns.rrset.from_text(question.name, 0, "IN", "A", *addresses))
            self._socket.sendto(reply.to_wire(), peer)
