"""A 3-master Redis Cluster on free ports of 127.0.0.1, for the tests that check sightstream
on Redis Cluster. Built without redis-cli: each node gets a third of the slots, then they meet."""

from __future__ import annotations

import random
import socket
import time

import redis

from sightstream.daemon.embedded_redis import EmbeddedRedis
from sightstream.errors import SightstreamError

SLOTS = 16384


def free_cluster_port() -> int:
    """A free port whose cluster bus port (10000 above) is free too, so below 55536."""
    for _ in range(200):
        port = random.randint(20000, 50000)
        try:
            for p in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise SightstreamError("no free port pair for a Redis Cluster node")


class LocalCluster:
    def __init__(self, masters: int = 3, binary: str | None = None) -> None:
        self.nodes = [
            EmbeddedRedis(port=free_cluster_port(), binary=binary, extra_args=["--cluster-enabled", "yes", "--cluster-config-file",
                                                     "nodes.conf", "--cluster-node-timeout", "2000"])
            for _ in range(masters)
        ]

    @property
    def url(self) -> str:
        """Any node's URL: a cluster client finds the others from it."""
        return self.nodes[0].url

    def start(self, timeout_s: float = 20) -> LocalCluster:
        for node in self.nodes:
            node.start()
        clients = [redis.Redis(port=node.port) for node in self.nodes]
        try:
            per = SLOTS // len(self.nodes)
            for i, client in enumerate(clients):
                last = SLOTS - 1 if i == len(clients) - 1 else (i + 1) * per - 1
                client.execute_command("CLUSTER", "ADDSLOTSRANGE", i * per, last)
            for node in self.nodes[1:]:
                clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)
            deadline = time.monotonic() + timeout_s
            while not all(c.cluster("info").get("cluster_state") == "ok" and
                          int(c.cluster("info").get("cluster_known_nodes", 0)) == len(clients)
                          for c in clients):
                if time.monotonic() > deadline:
                    raise SightstreamError("the local Redis Cluster did not converge")
                time.sleep(0.1)
        finally:
            for client in clients:
                client.close()
        return self

    def flushall(self) -> None:
        for node in self.nodes:
            client = redis.Redis(port=node.port)
            client.flushall()
            client.close()

    def close(self) -> None:
        for node in self.nodes:
            node.close()

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
