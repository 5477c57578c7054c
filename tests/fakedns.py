"""A name server on loopback that tests script, standing in for the internet's DNS
(webhook and LoRA URL hosts; the server is pointed at it by ``ZIMAGE_WEBHOOK_DNS_SERVERS``)."""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset


class FakeDns:
    """A UDP name server on 127.0.0.1. ``records[name]`` is a list of answers, one per
    query of each type (the last one repeats); ``delays[name]`` holds the answer back.
    Each query is answered on a thread of its own, so a slow name delays only itself."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.records: dict[str, list[list[str]]] = {}
        self.delays: dict[str, float] = {}
        self.queries: Counter[tuple[str, str]] = Counter()
        self.pending = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            threading.Thread(target=self._answer, args=(data, peer), daemon=True).start()

    def _answer(self, data: bytes, peer: tuple[str, int]) -> None:
        query = dns.message.from_wire(data)
        question = query.question[0]
        name = question.name.to_text().rstrip(".").lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        with self._lock:
            count = self.queries[(name, rdtype)]
            self.queries[(name, rdtype)] += 1
            self.pending += 1
        try:
            time.sleep(self.delays.get(name, 0))
            reply = dns.message.make_response(query)
            answers = self.records.get(name)
            if answers is None:
                reply.set_rcode(dns.rcode.NXDOMAIN)
            else:
                wanted = [
                    a
                    for a in answers[min(count, len(answers) - 1)]
                    if (":" in a) == (rdtype == "AAAA")
                ]
                if wanted:
                    reply.answer.append(
                        dns.rrset.from_text(question.name, 0, "IN", rdtype, *wanted)
                    )
            self.sock.sendto(reply.to_wire(), peer)
        finally:
            with self._lock:
                self.pending -= 1
