"""Socket factories with the options docs/protocol.md prescribes, and the loopback guard."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

import zmq

from bus.security import MasterSecurity, PeerKeys, apply_peer

DEFAULT_AGENTS = "tcp://127.0.0.1:5555"
DEFAULT_CLIENTS = "tcp://127.0.0.1:5556"
DEFAULT_EVENTS = "tcp://127.0.0.1:5557"
AGENT_MAX_MSG = 1024 * 1024
CLIENT_MAX_MSG = 8 * 1024 * 1024
HWM = 100_000


class BindError(Exception):
    """A bind that configuration forbids (non-loopback without --insecure) or that failed."""


def is_loopback(endpoint: str) -> bool:
    """True if a tcp:// endpoint's host is a loopback address (ipc/inproc count as local)."""
    if not endpoint.startswith("tcp://"):
        return endpoint.startswith(("ipc://", "inproc://"))
    host = urlsplit(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except OSError:
            return False


def _bind(sock: zmq.Socket, endpoint: str, insecure: bool,
          security: MasterSecurity | None = None, domain: str = "") -> None:
    if security is not None:
        security.serve(sock, domain)
    elif not insecure and not is_loopback(endpoint):
        sock.close(linger=0)
        raise BindError(
            f"refusing to bind {endpoint}: not loopback and no CURVE keys (pass --keys DIR, "
            "or --insecure to accept anyone who can reach it)"
        )
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as e:
        sock.close(linger=0)
        raise BindError(f"cannot bind {endpoint}: {e}") from e


def bind_router(
    ctx: zmq.Context, endpoint: str, max_msg: int, insecure: bool = False,
    security: MasterSecurity | None = None, domain: str = "",
) -> zmq.Socket:
    """A ROUTER for agents or clients: mandatory routing, bounded messages, high HWMs."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.MAXMSGSIZE, max_msg)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    _bind(sock, endpoint, insecure, security, domain)
    return sock


def bind_pub(ctx: zmq.Context, endpoint: str, insecure: bool = False,
             security: MasterSecurity | None = None, domain: str = "") -> zmq.Socket:
    """The events PUB socket."""
    sock = ctx.socket(zmq.PUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, HWM)
    _bind(sock, endpoint, insecure, security, domain)
    return sock


def connect_dealer(
    ctx: zmq.Context, endpoint: str, identity: bytes | None = None, max_msg: int = CLIENT_MAX_MSG,
    keys: PeerKeys | None = None,
) -> zmq.Socket:
    """A DEALER with reconnect backoff (100 ms doubling to 5 s) and no linger."""
    sock = ctx.socket(zmq.DEALER)
    apply_peer(sock, keys)
    if identity is not None:
        sock.setsockopt(zmq.ROUTING_ID, identity)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
    sock.setsockopt(zmq.MAXMSGSIZE, max_msg)
    sock.setsockopt(zmq.SNDHWM, HWM)
    sock.setsockopt(zmq.RCVHWM, HWM)
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    sock.connect(endpoint)
    return sock


def connect_sub(ctx: zmq.Context, endpoint: str, topics: list[str],
                keys: PeerKeys | None = None) -> zmq.Socket:
    """A SUB socket subscribed to each topic prefix (all topics if the list is empty)."""
    sock = ctx.socket(zmq.SUB)
    apply_peer(sock, keys)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, HWM)
    for topic in topics or [""]:
        sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
    sock.connect(endpoint)
    return sock
