"""CURVE keys and ZAP authentication: an allow-list per role, and a User-Id that names the peer.

Key directory layout (made by `ffrtmp keys generate DIR`):

    DIR/master.key, DIR/master.key_secret     the master's keypair (give master.key to peers)
    DIR/agents/<name>.key                     an agent that must be named <name>
    DIR/clients/<name>.key                    a client with role "submit"
    DIR/operators/<name>.key                  a client with role "operate"
    DIR/private/<name>.key_secret             peers' secret keys, to copy to their hosts

The master authenticates the agents socket in ZAP domain `agents` against DIR/agents and the
clients and events sockets in domain `clients` against DIR/clients and DIR/operators, so a client
key cannot act as an agent and vice versa. An authenticated connection's ZAP User-Id (frame
property "User-Id") is "agent:<name>", "submit:<name>" or "operate:<name>"; parse_user_id() reads
it back. The allow-lists are re-read when a folder changes, so deleting a key file refuses that key
on every new connection at once (connections already made are not cut).
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import zmq

from bus.vocab import ROLE_OPERATE, ROLE_SUBMIT

AGENTS_DOMAIN = "agents"
CLIENTS_DOMAIN = "clients"
AGENT = "agent"  # the role of every key in DIR/agents
PEER_ROLES = (AGENT, ROLE_SUBMIT, ROLE_OPERATE)
# Allow-list folders under DIR: (folder, role), per ZAP domain.
FOLDERS = {
    AGENTS_DOMAIN: (("agents", AGENT),),
    CLIENTS_DOMAIN: (("clients", ROLE_SUBMIT), ("operators", ROLE_OPERATE)),
}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# A folder whose mtime is this recent may change again within the same timestamp tick (coarse
# mtimes on some file systems), so it is re-read on every request until it is older.
_SETTLE_NS = 2_000_000_000
_MAX_WARNED = 1000

log = logging.getLogger("ffrtmp.security")


class KeyMaterialError(Exception):
    """Missing or unreadable key material (a configuration error, reported at start)."""


def check_name(name: str) -> str:
    """Return name if it is a safe peer name (and file name); KeyMaterialError if not.

    1-64 characters of A-Z a-z 0-9 _ . -, starting with a letter or digit (so also a valid
    agent name in HELLO): no path separators, no hidden files, nothing an option parser or a
    log line could misread.
    """
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise KeyMaterialError(
            f"bad peer name {name!r}: use 1-64 of A-Z a-z 0-9 _ . -, starting with a letter "
            "or digit")
    return name


@dataclass(frozen=True)
class Peer:
    """An authenticated peer: role "agent", "submit" or "operate", and its key file's name."""

    role: str
    name: str

    @property
    def user_id(self) -> str:
        """The ZAP User-Id the master sees on this peer's messages: "role:name"."""
        return f"{self.role}:{self.name}"


def parse_user_id(user_id: str | None) -> Peer | None:
    """The peer a ZAP User-Id names, or None if it names none (no keys, or not one of ours)."""
    if not user_id:
        return None
    role, sep, name = user_id.partition(":")
    if not sep or role not in PEER_ROLES or not _NAME.fullmatch(name):
        return None
    return Peer(role, name)


@dataclass(frozen=True)
class PeerKeys:
    """What a peer (agent or client) needs: its own keypair and the master's public key."""

    public: bytes
    secret: bytes
    server_public: bytes

    def __repr__(self) -> str:  # secrets never appear in a repr or a log
        return f"PeerKeys(public={self.public.decode()!r}, secret=***)"


# ---------------------------------------------------------------------------- key files


def _cert_text(public: bytes, secret: bytes | None) -> str:
    """A ZeroMQ certificate (ZPL), readable by zmq.auth.load_certificate."""
    kind = "Secret" if secret else "Public"
    lines = [f"#   ZeroMQ CURVE {kind} Certificate (ffrtmp keys generate)"]
    if secret:
        lines.append("#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.")
    lines += ["", "metadata", "curve", f'    public-key = "{public.decode()}"']
    if secret:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


def _write_atomic(path: Path, text: str, mode: int) -> None:
    """Write path all at once: a temp file made 0600 in the same folder, then os.replace.

    The file is never visible with a wider mode than `mode`, and a failure leaves no temp file.
    """
    import tempfile  # `ffrtmp keys generate` only: a client never writes keys

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
            if mode != 0o600:
                os.fchmod(f.fileno(), mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _write_keypair(secret_file: Path, public_file: Path) -> None:
    public, secret = zmq.curve_keypair()
    # Secret first: a public key in an allow-list is only ever there with its secret made.
    _write_atomic(secret_file, _cert_text(public, secret), 0o600)
    _write_atomic(public_file, _cert_text(public, None), 0o644)


def generate(directory: Path, agents: Sequence[str], clients: Sequence[str], *,
             operators: Sequence[str] = ()) -> list[Path]:
    """Create the master keypair (unless present) and one keypair per named agent, client
    ("submit") and operator ("operate"); returns the new files.

    Every name is checked before anything is written: a bad name, a name given twice (in one
    kind or across kinds) or one that exists already raises KeyMaterialError. Secret files are
    written 0600 atomically, public ones 0644.
    """
    directory = Path(directory)
    private = directory / "private"
    wanted: list[tuple[str, str]] = []
    kinds: dict[str, str] = {}
    for folder, names in (("agents", agents), ("clients", clients), ("operators", operators)):
        for name in names:
            check_name(name)
            if name in kinds:
                raise KeyMaterialError(
                    f"name {name!r} given twice (--{kinds[name][:-1]} and --{folder[:-1]}): "
                    "each peer needs a name of its own")
            kinds[name] = folder
            wanted.append((folder, name))
    for _, name in wanted:
        for path in (private / f"{name}.key_secret",
                     *(directory / f / f"{name}.key" for f in ("agents", "clients", "operators"))):
            if path.exists():
                raise KeyMaterialError(f"a key named {name!r} exists already: {path}")
    directory.mkdir(parents=True, exist_ok=True)
    private.mkdir(mode=0o700, exist_ok=True)
    os.chmod(private, 0o700)
    for folder in ("agents", "clients", "operators"):
        (directory / folder).mkdir(exist_ok=True)
    made: list[Path] = []
    master_secret = directory / "master.key_secret"
    if master_secret.exists():
        os.chmod(master_secret, 0o600)  # tighten one made by an older version
    else:
        _write_keypair(master_secret, directory / "master.key")
        made += [directory / "master.key", master_secret]
    for folder, name in wanted:
        _write_keypair(private / f"{name}.key_secret", directory / folder / f"{name}.key")
        made += [directory / folder / f"{name}.key", private / f"{name}.key_secret"]
    return made


def load_peer(secret_file: str, master_public_file: str) -> PeerKeys:
    """A peer's keys from its secret certificate and the master's public certificate."""
    from zmq.auth import load_certificate  # only with keys: a keyless client never reads one

    try:
        public, secret = load_certificate(secret_file)
        server_public, _ = load_certificate(master_public_file)
    except (OSError, ValueError) as e:
        raise KeyMaterialError(f"cannot load keys: {e}") from e
    if secret is None:
        raise KeyMaterialError(f"{secret_file} holds no secret key")
    return PeerKeys(public, secret, server_public)


def apply_peer(sock: zmq.Socket, keys: PeerKeys | None) -> None:
    """Make a connecting socket a CURVE client (before connect)."""
    if keys is None:
        return
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret
    sock.curve_serverkey = keys.server_public


# ---------------------------------------------------------------------------- allow-lists


class AllowList:
    """The public keys (Z85) admitted in one ZAP domain, each naming a Peer.

    Re-read when one of its folders' mtime (or inode) changes: one stat per folder per lookup.
    A bad key file is skipped with a warning; a key listed twice in the domain is refused (it
    would be ambiguous which peer it is); a missing folder admits nobody.
    """

    def __init__(self, root: Path, domain: str) -> None:
        self.domain = domain
        self.folders = tuple((root / folder, role) for folder, role in FOLDERS[domain])
        self._stamp: tuple[tuple[int, int] | None, ...] | None = None
        self._settled = False
        self._peers: dict[bytes, Peer] = {}

    def _stat(self) -> tuple[tuple[int, int] | None, ...]:
        stamps: list[tuple[int, int] | None] = []
        for folder, _ in self.folders:
            try:
                st = os.stat(folder)
            except OSError:
                stamps.append(None)
            else:
                stamps.append((st.st_mtime_ns, st.st_ino))
        return tuple(stamps)

    def refresh(self) -> None:
        """Re-read the folders if they changed since the last read (or may have)."""
        stamp = self._stat()
        if stamp == self._stamp and self._settled:
            return
        from zmq.auth import load_certificate  # not with the module: clients never read lists

        now_ns = time.time_ns()  # compared with file mtimes, so wall-clock time
        self._settled = all(s is None or now_ns - s[0] > _SETTLE_NS for s in stamp)
        changed = stamp != self._stamp
        self._stamp = stamp
        peers: dict[bytes, Peer] = {}
        ambiguous: set[bytes] = set()
        for (folder, role), present in zip(self.folders, stamp, strict=True):
            if present is None:
                if changed and role != ROLE_OPERATE:  # operators/ is optional
                    log.warning("%s missing: no %s key is admitted", folder, role)
                continue
            for path in sorted(folder.glob("*.key")):
                try:
                    peer = Peer(role, check_name(path.stem))
                    public, _ = load_certificate(path)
                except (KeyMaterialError, OSError, ValueError) as e:
                    if changed:
                        log.warning("ignoring key file %s: %s", path, e)
                    continue
                if public in peers and peers[public] != peer:
                    ambiguous.add(public)
                peers[public] = peer
        for public in ambiguous:
            if changed:
                log.warning("key %s is listed more than once in domain %s (%s and more): "
                            "refused until one file is removed", public.decode(), self.domain,
                            peers[public].user_id)
            del peers[public]
        if changed:
            counts = {role: sum(p.role == role for p in peers.values()) for _, role in self.folders}
            log.info("allow-list %s: %s", self.domain,
                     ", ".join(f"{n} {role}" for role, n in counts.items()))
        self._peers = peers

    def lookup(self, z85_key: bytes) -> Peer | None:
        """The peer a Z85 public key names in this domain now, or None if it is not admitted."""
        self.refresh()
        return self._peers.get(z85_key)


class MasterSecurity:
    """The master's CURVE server keys and its ZAP authenticator thread."""

    def __init__(self, ctx: zmq.Context, directory: str) -> None:
        from zmq.auth import load_certificate

        root = Path(directory)
        try:
            self.public, secret = load_certificate(root / "master.key_secret")
        except (OSError, ValueError) as e:
            raise KeyMaterialError(f"cannot load master keys from {root}: {e}") from e
        if secret is None:
            raise KeyMaterialError(f"{root / 'master.key_secret'} holds no secret key")
        self._secret = secret
        for kind in (AGENTS_DOMAIN, CLIENTS_DOMAIN):
            if not (root / kind).is_dir():
                raise KeyMaterialError(f"{root / kind} missing: no allow-list for {kind}")
        self.lists = {domain: AllowList(root, domain) for domain in FOLDERS}
        for allow in self.lists.values():
            allow.refresh()  # bad files are reported at start, not at the first connection
        from bus.zap import Authenticator  # the ZAP thread imports asyncio: only a master needs it

        self.auth = Authenticator(ctx, self.lists)
        self.auth.start()
        for domain in self.lists:
            self.auth.configure_curve_callback(domain, credentials_provider=self.auth)

    def serve(self, sock: zmq.Socket, domain: str) -> None:
        """Make a binding socket a CURVE server in a ZAP domain (before bind)."""
        if domain not in self.lists:
            raise ValueError(f"unknown ZAP domain {domain!r}")
        sock.zap_domain = domain.encode()
        sock.curve_server = True
        sock.curve_secretkey = self._secret

    def stop(self) -> None:
        """Stop the authenticator thread."""
        self.auth.stop()
