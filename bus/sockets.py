"""Socket factories with the options docs/protocol.md prescribes, and the loopback guard."""

from __future__ import annotations

import bisect
import ipaddress
from urllib.parse import urlsplit

import zmq

from bus.security import MasterSecurity, PeerKeys, apply_peer

DEFAULT_AGENTS = "tcp://127.0.0.1:5555"
DEFAULT_CLIENTS = "tcp://127.0.0.1:5556"
DEFAULT_EVENTS = "tcp://127.0.0.1:5557"
AGENT_MAX_MSG = 1024 * 1024  # agents: the master's cap and libzmq MAXMSGSIZE (over it: dropped)
CLIENT_MAX_MSG = 8 * 1024 * 1024  # clients: the master's whole-message cap (over it: too_large)
# libzmq MAXMSGSIZE of the master's clients socket (per frame): a frame up to this size is read
# (and dropped) so that the master's own cap answers ERROR too_large; a larger frame is a silent
# disconnect. It bounds what one message can make the master hold while it arrives.
CLIENT_HARD_MAX = 64 * 1024 * 1024
HWM = 100_000
PEER_RCVHWM = 10_000  # messages one peer may have waiting at the master's ROUTERs


class BindError(Exception):
    """A bind that configuration forbids (non-loopback without --insecure) or that failed."""


class EndpointError(ValueError):
    """An endpoint that is not tcp://HOST:PORT, HOST:PORT, ipc://PATH or inproc://NAME."""


def endpoint(text: str, flag: str = "endpoint") -> str:
    """The ZeroMQ endpoint for what a user typed: `HOST:PORT` means `tcp://HOST:PORT`
    (`[v6]:PORT` too); EndpointError, naming the flag, for anything else."""
    text = (text or "").strip()
    if text.startswith(("ipc://", "inproc://")) and len(text.split("://", 1)[1]) > 0:
        return text
    url = text if text.startswith("tcp://") else f"tcp://{text}"
    if "://" in text and not text.startswith("tcp://"):
        url = ""
    try:
        parts = urlsplit(url)
        port = parts.port
        ok = bool(url) and bool(parts.hostname) and port is not None and 0 < port < 65536 \
            and parts.path in ("", "/") and not parts.query and not parts.username
    except ValueError:
        ok = False
    if not ok and url:
        # A bind may use the wildcard host: tcp://*:PORT
        host, _, port_text = url[len("tcp://"):].rpartition(":")
        ok = host == "*" and port_text.isdigit() and 0 < int(port_text) < 65536
    if not ok:
        raise EndpointError(f"{flag} {text!r}: expected tcp://HOST:PORT (or HOST:PORT)")
    return url.rstrip("/")


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
        import socket  # a host name to resolve: rare, and the module is slow to import

        try:
            return ipaddress.ip_address(socket.gethostbyname(host)).is_loopback
        except OSError:
            return False


def check_http_bind(hostport: str, insecure: bool, secured: bool) -> None:
    """Refuse (BindError) an HTTP HOST:PORT whose host is not loopback unless insecure or
    secured (CURVE keys configured): the rule of the bus endpoints. An empty host is 127.0.0.1;
    an IPv6 host may be bracketed ("[::1]:9471")."""
    host = hostport.rpartition(":")[0].strip("[]") or "127.0.0.1"
    endpoint = f"tcp://[{host}]:1" if ":" in host else f"tcp://{host}:1"  # IPv6 needs brackets
    if insecure or secured or is_loopback(endpoint):
        return
    raise BindError(
        f"refusing to bind {hostport}: not loopback and no CURVE keys (the HTTP endpoint is "
        "unauthenticated; bind 127.0.0.1, or configure keys or --insecure to expose it)")


def _bind(sock: zmq.Socket, endpoint_text: str, insecure: bool,
          security: MasterSecurity | None = None, domain: str = "") -> None:
    try:
        endpoint_ = endpoint(endpoint_text)
    except EndpointError as e:
        sock.close(linger=0)
        raise BindError(str(e)) from e
    if security is not None:
        security.serve(sock, domain)
    elif not insecure and not is_loopback(endpoint_):
        sock.close(linger=0)
        raise BindError(
            f"refusing to bind {endpoint_}: not loopback and no CURVE keys (pass --keys DIR, "
            "or --insecure to accept anyone who can reach it)"
        )
    try:
        sock.bind(endpoint_)
    except zmq.ZMQError as e:
        sock.close(linger=0)
        raise BindError(f"cannot bind {endpoint_}: {e}") from e


def bind_router(
    ctx: zmq.Context, endpoint: str, max_msg: int, insecure: bool = False,
    security: MasterSecurity | None = None, domain: str = "", sndhwm: int = HWM,
) -> zmq.Socket:
    """A ROUTER for agents or clients: mandatory routing, bounded frames, per-peer send HWM."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.MAXMSGSIZE, max_msg)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, sndhwm)
    sock.setsockopt(zmq.RCVHWM, PEER_RCVHWM)  # per peer: what one peer may have waiting
    sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
    _bind(sock, endpoint, insecure, security, domain)
    return sock


def bind_pub(ctx: zmq.Context, endpoint: str, insecure: bool = False,
             security: MasterSecurity | None = None, domain: str = "",
             sndhwm: int = HWM) -> zmq.Socket:
    """The events socket: an XPUB, so the master learns which topic prefixes anyone subscribes
    to (see Subscriptions) and publishes nothing else; a subscriber that does not read loses
    events past `sndhwm`."""
    sock = ctx.socket(zmq.XPUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, 1024)  # subscriptions are short topic prefixes
    sock.setsockopt(zmq.SNDHWM, sndhwm)
    _bind(sock, endpoint, insecure, security, domain)
    return sock


class Subscriptions:
    """The topic prefixes someone subscribes to, as an XPUB reports them.

    libzmq (non-verbose XPUB) reports a prefix when its first subscriber takes it and its
    unsubscription when its last subscriber drops it or disconnects, so a set mirrors its
    subscription tree exactly. Every update costs O(1) (plus a sorted insert when a new prefix
    length appears; lengths are at most the socket's 1,024-byte message cap); `wants(topic)` one
    set lookup per distinct prefix length up to the topic's; `touches(family)` for a family
    given at construction is a counter. Past `most` distinct prefixes (a subscriber flooding
    the table) it stops keeping count and wants everything from then on, as a plain PUB would:
    publishing too much is safe, too little is not.
    """

    def __init__(self, most: int = 10_000, families: tuple[bytes, ...] = (b"job.",)) -> None:
        self.most = most
        self._prefixes: set[bytes] = set()
        self._lengths: dict[int, int] = {}  # prefix length -> how many prefixes have it
        self._sorted: list[int] = []  # those lengths, ascending
        # family -> how many prefixes could match one of its topics (touches())
        self._touching: dict[bytes, int] = dict.fromkeys(families, 0)
        self.overflow = False

    def __len__(self) -> int:
        return len(self._prefixes)

    def update(self, message: bytes) -> None:
        """One XPUB message: b"\\x01" + prefix subscribes, b"\\x00" + prefix unsubscribes;
        anything else (a subscriber may send what it likes) is ignored."""
        if not message or message[0] > 1:
            return
        prefix, n = message[1:], len(message) - 1
        if message[0] == 1:
            if prefix in self._prefixes:
                return
            if len(self._prefixes) >= self.most:
                self.overflow = True
                return
            self._prefixes.add(prefix)
            if self._lengths.get(n, 0) == 0:
                bisect.insort(self._sorted, n)
            self._lengths[n] = self._lengths.get(n, 0) + 1
            step = 1
        elif prefix in self._prefixes:
            self._prefixes.discard(prefix)
            self._lengths[n] -= 1
            if self._lengths[n] == 0:
                del self._lengths[n]
                self._sorted.remove(n)
            step = -1
        else:
            return
        for family in self._touching:
            if family.startswith(prefix) or prefix.startswith(family):
                self._touching[family] += step

    def wants(self, topic: bytes) -> bool:
        """Does any subscription's prefix match this topic?"""
        if self.overflow:
            return True
        prefixes = self._prefixes
        for n in self._sorted:
            if n > len(topic):
                return False
            if topic[:n] in prefixes:
                return True
        return False

    def touches(self, family: bytes) -> bool:
        """Could any subscription match some topic that starts with `family`? (False: no
        topic of it is wanted, and none needs to be looked at one by one.) O(1) for the
        families given at construction, a walk over the prefixes for any other."""
        if self.overflow:
            return True
        count = self._touching.get(family)
        if count is not None:
            return count > 0
        return any(family.startswith(p) or p.startswith(family) for p in self._prefixes)


def connect_dealer(
    ctx: zmq.Context, target: str, identity: bytes | None = None, max_msg: int = CLIENT_MAX_MSG,
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
    _connect(sock, target)
    return sock


def connect_sub(ctx: zmq.Context, target: str, topics: list[str],
                keys: PeerKeys | None = None) -> zmq.Socket:
    """A SUB socket subscribed to each topic prefix (all topics if the list is empty)."""
    sock = ctx.socket(zmq.SUB)
    apply_peer(sock, keys)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, HWM)
    for topic in topics or [""]:
        sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
    _connect(sock, target)
    return sock


def _connect(sock: zmq.Socket, target: str) -> None:
    """Connect, or close the socket and raise EndpointError: a socket left open would make
    its context's term() wait forever (the CLI once hung for good on `--master HOST:PORT`)."""
    try:
        sock.connect(endpoint(target))
    except EndpointError:
        sock.close(linger=0)
        raise
    except zmq.ZMQError as e:
        sock.close(linger=0)
        raise EndpointError(f"cannot connect to {target!r}: {e.strerror}") from e
