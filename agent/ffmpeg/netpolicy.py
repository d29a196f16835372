"""Where an agent's ffmpeg may connect: the destination policy for URL inputs and RTMP outputs.

By default only public (globally routable unicast) addresses are allowed; loopback, private
(RFC 1918, ULA), link-local, CGNAT, unspecified, multicast, reserved and documentation ranges are
refused unless the operator allows them with `--allow-url` (CIDRs, addresses or host names).

A URL's host is checked as written (every IPv4 spelling `inet_aton` accepts, IPv6 with its
embedded IPv4 forms), or, for a name, by resolving it (bounded) and checking every address.
Against DNS rebinding, plain-text schemes (http, rtmp) are pinned to the checked address: ffmpeg
is given the IP literal, with the original name in the `Host` header (http) or the `tcUrl`
(rtmp). TLS schemes (https, rtmps) keep the name, which certificate checks and SNI need; the
residual window is documented in docs/INPUTS.md. Host names the operator allows are trusted:
given to ffmpeg unresolved and unpinned.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

RESOLVE_TIMEOUT_S = 5.0
PINNED_SCHEMES = ("http", "rtmp")  # plain text: ffmpeg connects to the checked IP literal
DEFAULT_PORTS = {"http": 80, "https": 443, "rtmp": 1935, "rtmps": 443}
# ffmpeg protocols each scheme needs (nested ones included); nothing else is whitelisted.
PROTOCOLS = {"http": "http,tcp", "https": "https,tls,tcp", "rtmp": "rtmp,tcp",
             "rtmps": "rtmps,tls,tcp"}

CGNAT = ipaddress.ip_network("100.64.0.0/10")
NAT64 = ipaddress.ip_network("64:ff9b::/96")
NAT64_LOCAL = ipaddress.ip_network("64:ff9b:1::/48")
HOST_NAME = re.compile(r"^(\*\.)?([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)*"
                       r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")
IPV4_ISH = re.compile(r"^[0-9a-fx.]+$")


class PolicyError(ValueError):
    """A malformed `--allow-url` entry."""


class DestinationRefused(ValueError):
    """A URL the policy does not allow (or that cannot be checked); the message says why."""


@dataclass(frozen=True)
class Destination:
    """A checked URL, as ffmpeg is to be given it."""

    url: str  # the URL for ffmpeg: pinned to the checked IP literal for http/rtmp names
    args: tuple[str, ...]  # ffmpeg protocol options to put before it (Host header, tcUrl, …)
    scheme: str
    host: str  # the host as written in the job (lowercase)
    addresses: tuple[str, ...]  # the checked addresses ((): a trusted, allowed host name)

    @property
    def protocols(self) -> str:
        """The `-protocol_whitelist` value for this destination."""
        return PROTOCOLS[self.scheme]


def refusal(ip: IPAddress) -> str | None:
    """Why an address is not public ('loopback', 'private', …), or None if it is."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            inner = refusal(ip.ipv4_mapped)
            return f"IPv4-mapped {inner}" if inner else None
        if ip in NAT64:
            inner = refusal(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
            return f"NAT64-embedded {inner}" if inner else None
        if ip in NAT64_LOCAL:
            return "local-use NAT64"
        if ip.sixtofour is not None:
            inner = refusal(ip.sixtofour)
            return f"6to4-embedded {inner}" if inner else None
        if ip.teredo is not None:
            inner = refusal(ip.teredo[1])
            return f"Teredo-embedded {inner}" if inner else None
        if ip.is_site_local:
            return "site-local"
    checks = (("unspecified", ip.is_unspecified), ("loopback", ip.is_loopback),
              ("link-local", ip.is_link_local), ("multicast", ip.is_multicast),
              ("shared address space (CGNAT)", ip in CGNAT if ip.version == 4 else False),
              ("private", ip.is_private), ("reserved", ip.is_reserved))
    for name, hit in checks:
        if hit:
            return name
    if not ip.is_global:
        return "not globally routable"
    return None


def parse_literal(host: str) -> IPAddress | None:
    """The address a URL host denotes if it is an IP literal in any spelling, else None.

    IPv4 in every form the C library's `inet_aton` (and so `getaddrinfo`, and so ffmpeg)
    accepts: `127.0.0.1`, `2130706433`, `0x7f.1`, `0177.0.0.1`, `127.1`; IPv6 with or without
    a zone (`fe80::1%eth0`); IPv4-mapped forms stay IPv6 (refusal() unwraps them).
    """
    host = host.strip("[]")
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host)
        except ValueError:
            raise DestinationRefused(f"bad IPv6 address {host!r}") from None
    if IPV4_ISH.match(host) and not host.endswith("."):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None  # a name made of hex letters ('deadbeef.cafe'): resolved as a name
    return None


def resolve(host: str, port: int, timeout_s: float) -> list[IPAddress]:
    """Every address `host` resolves to (getaddrinfo, TCP), within timeout_s."""
    infos: list[tuple[object, ...]] = []
    errors: list[BaseException] = []
    done = threading.Event()

    def work() -> None:
        try:
            infos.extend(socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM))
        except (OSError, UnicodeError) as e:
            errors.append(e)
        finally:
            done.set()

    # A daemon thread: a resolver stuck past the timeout never holds up the agent's exit.
    threading.Thread(target=work, name=f"resolve-{host}", daemon=True).start()
    if not done.wait(timeout_s):
        raise DestinationRefused(f"cannot resolve host {host!r} within {timeout_s:g} s")
    if errors:
        raise DestinationRefused(f"cannot resolve host {host!r}: {errors[0]}")
    out: list[IPAddress] = []
    for info in infos:
        sockaddr = info[4]
        assert isinstance(sockaddr, tuple)
        addr = str(sockaddr[0]).split("%", 1)[0]
        ip = ipaddress.ip_address(addr)
        if ip not in out:
            out.append(ip)
    if not out:
        raise DestinationRefused(f"host {host!r} has no address")
    return out


def _a(word: str) -> str:
    return f"an {word}" if word[:1].lower() in "aeiou" or word.startswith("IPv") else f"a {word}"


def _netloc(userinfo: str, host: str, port: int | None) -> str:
    text = f"[{host}]" if ":" in host else host
    if port is not None:
        text += f":{port}"
    return f"{userinfo}@{text}" if userinfo else text


def rtmp_app(path: str) -> str | None:
    """The application name ffmpeg's rtmp protocol takes from a URL path (what goes in its
    default tcUrl), or None where its rules are not the plain ones (`slist=` queries)."""
    qmark = path.find("?")
    if qmark >= 0 and "slist=" in path[qmark:]:
        return None
    if path.startswith("/ondemand/"):
        return "ondemand"
    nxt = path[1:] if path else path
    slash = nxt.find("/")
    if slash < 0:
        return nxt
    p = 1 + slash  # index of the '/' after the first component, in path
    colon = path.find(":", p + 1)
    fname = path.find("/", p + 1)
    if fname < 0 or (0 <= colon < fname):
        return path[1:p]
    return path[1:fname]


@dataclass(frozen=True)
class NetPolicy:
    """Which destinations ffmpeg may connect to: public addresses, plus what the operator allows.

    Build it from the agent's `--allow-url` values with `NetPolicy.parse([...])`; the default
    `NetPolicy()` allows public destinations only.
    """

    networks: tuple[IPNetwork, ...] = ()
    names: tuple[str, ...] = ()  # exact host names, or '*.suffix' for any name under suffix
    resolve_timeout_s: float = RESOLVE_TIMEOUT_S
    items: tuple[str, ...] = field(default=(), compare=False)  # as given, for logs

    @classmethod
    def parse(cls, items: Iterable[str], resolve_timeout_s: float = RESOLVE_TIMEOUT_S
              ) -> NetPolicy:
        """A policy from `--allow-url` values: each a CIDR (`10.0.0.0/8`, `fd00::/8`), an
        address (`127.0.0.1`, `::1`), a host name (`media.example.com`) or a wildcard
        (`*.example.com`: names under example.com, not example.com itself); several may share
        one value, separated by commas or spaces. Raises PolicyError naming a bad entry."""
        networks: list[IPNetwork] = []
        names: list[str] = []
        given: list[str] = []
        for value in items:
            if not isinstance(value, str):
                raise PolicyError(f"--allow-url: not a string: {value!r}")
            for item in filter(None, re.split(r"[\s,]+", value)):
                given.append(item)
                try:
                    networks.append(ipaddress.ip_network(item.strip("[]"), strict=False))
                    continue
                except ValueError:
                    pass
                name = item.lower().rstrip(".")
                if "/" in item or ":" in item or not HOST_NAME.match(name) or len(name) > 253:
                    raise PolicyError(f"--allow-url: {item!r} is not a CIDR, an address or a "
                                      "host name (e.g. 10.0.0.0/8, 127.0.0.1, "
                                      "media.example.com, *.example.com)")
                if "*" not in name and parse_literal(name) is not None:
                    raise PolicyError(f"--allow-url: {item!r} looks like an IPv4 address in a "
                                      "non-standard spelling; write it dotted (a.b.c.d)")
                names.append(name)
        if resolve_timeout_s <= 0:
            raise PolicyError("resolve timeout must be positive")
        return cls(tuple(networks), tuple(names), resolve_timeout_s, tuple(given))

    def allows_name(self, host: str) -> bool:
        """True if the operator allowed this host name (trusted: not resolved, not pinned)."""
        host = host.lower().rstrip(".")
        for name in self.names:
            if name.startswith("*."):
                if host.endswith(name[1:]) and len(host) > len(name) - 1:
                    return True
            elif host == name:
                return True
        return False

    def why_refused(self, ip: IPAddress) -> str | None:
        """None if ffmpeg may connect to `ip`, else why not (its kind of address)."""
        candidates: list[IPAddress] = [ip]
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.scope_id:
                candidates = [ipaddress.IPv6Address(str(ip).split("%", 1)[0])]
            if ip.ipv4_mapped is not None:
                candidates.append(ip.ipv4_mapped)
        for cand in candidates:
            if any(cand.version == net.version and cand in net for net in self.networks):
                return None
        return refusal(candidates[0])

    def check_url(self, url: str, what: str = "input") -> Destination:
        """Check a URL against the policy; the Destination to give ffmpeg, or
        DestinationRefused saying why (naming `what`, the spec field)."""
        try:
            parts = urlsplit(url)
            scheme, host, port = parts.scheme.lower(), parts.hostname, parts.port
        except ValueError as e:
            raise DestinationRefused(f"{what}: malformed URL: {e}") from e
        if scheme not in PROTOCOLS:
            raise DestinationRefused(f"{what}: scheme {scheme!r} not allowed")
        if not host:
            raise DestinationRefused(f"{what}: URL has no host")
        if any(ord(c) <= 32 or ord(c) == 127 for c in url) or not url.isascii():
            raise DestinationRefused(f"{what}: URL has spaces, control or non-ASCII characters")
        userinfo = parts.netloc.rpartition("@")[0] if "@" in parts.netloc else ""
        hint = "; the agent's --allow-url can allow it"
        try:
            literal = parse_literal(host)
        except DestinationRefused as e:
            raise DestinationRefused(f"{what}: {e}") from None
        if literal is not None:
            why = self.why_refused(literal)
            if why:
                raise DestinationRefused(f"{what}: {host} is {_a(why)} address, refused{hint}")
            if isinstance(literal, ipaddress.IPv6Address) and literal.ipv4_mapped is not None:
                literal = literal.ipv4_mapped  # connect over IPv4, as the address means
            canon = str(literal).replace("%", "%25")  # a zone id, percent-encoded in a URL
            url = urlunsplit((scheme, _netloc(userinfo, canon, port), parts.path, parts.query,
                              parts.fragment))
            return Destination(url, self._extra(scheme, host, port, parts.path, None), scheme,
                               host, (canon,))
        if not HOST_NAME.match(host.rstrip(".")) or "*" in host:
            raise DestinationRefused(f"{what}: bad host name {host!r}")
        # ffmpeg gets the URL rebuilt from what was checked, never a string it might parse
        # differently from Python.
        named = urlunsplit((scheme, _netloc(userinfo, host, port), parts.path, parts.query,
                            parts.fragment))
        if self.allows_name(host):
            return Destination(named, self._extra(scheme, host, port, parts.path, None), scheme,
                               host, ())
        addresses = resolve(host, port or DEFAULT_PORTS[scheme], self.resolve_timeout_s)
        for ip in addresses:
            why = self.why_refused(ip)
            if why:
                raise DestinationRefused(f"{what}: {host} resolves to {ip}, {_a(why)} "
                                         f"address, refused{hint}")
        checked = tuple(str(ip) for ip in addresses)
        if scheme not in PINNED_SCHEMES:  # TLS: keep the name for SNI and certificates
            return Destination(named, self._extra(scheme, host, port, parts.path, None), scheme,
                               host, checked)
        pin = checked[0]
        pinned = urlunsplit((scheme, _netloc(userinfo, pin, port), parts.path, parts.query,
                             parts.fragment))
        return Destination(pinned, self._extra(scheme, host, port, parts.path, host), scheme,
                           host, checked)

    @staticmethod
    def _extra(scheme: str, host: str, port: int | None, path: str,
               pinned_name: str | None) -> tuple[str, ...]:
        """ffmpeg options for a destination: no redirects (their targets are not checked),
        and for a pinned name what carries the name to the server."""
        args: list[str] = []
        if scheme in ("http", "https"):
            args += ["-max_redirects", "0"]
        if pinned_name is None:
            return tuple(args)
        if scheme == "http":
            hostport = pinned_name if port is None else f"{pinned_name}:{port}"
            args += ["-headers", f"Host: {hostport}\r\n"]
        elif scheme == "rtmp":
            app = rtmp_app(path)
            if app is not None:
                args += ["-rtmp_tcurl",
                         f"rtmp://{pinned_name}:{port or DEFAULT_PORTS['rtmp']}/{app}"]
        return tuple(args)


DEFAULT_POLICY = NetPolicy()
