"""CURVE keys and ZAP authentication: separate allow-lists for agents and for clients.

Key directory layout (made by `ffrtmp keys generate DIR`):

    DIR/master.key, DIR/master.key_secret     the master's keypair (give master.key to peers)
    DIR/agents/<name>.key                     public keys allowed to act as agents
    DIR/clients/<name>.key                    public keys allowed to act as clients
    DIR/private/<name>.key_secret             peers' secret keys, to copy to their hosts

The master authenticates the agents socket in ZAP domain `agents` against DIR/agents and the
clients and events sockets in domain `clients` against DIR/clients, so a client key cannot act as
an agent and vice versa.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

AGENTS_DOMAIN = "agents"
CLIENTS_DOMAIN = "clients"


class KeyMaterialError(Exception):
    """Missing or unreadable key material (a configuration error, reported at start)."""


@dataclass(frozen=True)
class PeerKeys:
    """What a peer (agent or client) needs: its own keypair and the master's public key."""

    public: bytes
    secret: bytes
    server_public: bytes

    def __repr__(self) -> str:  # secrets never appear in a repr or a log
        return f"PeerKeys(public={self.public.decode()!r}, secret=***)"


def generate(directory: Path, agents: list[str], clients: list[str]) -> list[Path]:
    """Create the master keypair and one keypair per named agent and client; returns new files."""
    directory.mkdir(parents=True, exist_ok=True)
    private = directory / "private"
    made: list[Path] = []
    if not (directory / "master.key_secret").exists():
        zmq.auth.create_certificates(directory, "master")
        made += [directory / "master.key", directory / "master.key_secret"]
    for kind, names in (("agents", agents), ("clients", clients)):
        (directory / kind).mkdir(exist_ok=True)
        private.mkdir(exist_ok=True)
        os.chmod(private, 0o700)
        for name in names:
            if (private / f"{name}.key_secret").exists():
                raise KeyMaterialError(f"a key named {name!r} exists already in {private}")
            pub, sec = zmq.auth.create_certificates(private, name)
            shutil.move(pub, directory / kind / f"{name}.key")
            os.chmod(sec, 0o600)
            made += [directory / kind / f"{name}.key", Path(sec)]
    os.chmod(directory / "master.key_secret", 0o600)
    return made


def load_peer(secret_file: str, master_public_file: str) -> PeerKeys:
    """A peer's keys from its secret certificate and the master's public certificate."""
    try:
        public, secret = zmq.auth.load_certificate(secret_file)
        server_public, _ = zmq.auth.load_certificate(master_public_file)
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


class MasterSecurity:
    """The master's CURVE server keys and its ZAP authenticator thread."""

    def __init__(self, ctx: zmq.Context, directory: str) -> None:
        root = Path(directory)
        try:
            self.public, secret = zmq.auth.load_certificate(root / "master.key_secret")
        except (OSError, ValueError) as e:
            raise KeyMaterialError(f"cannot load master keys from {root}: {e}") from e
        if secret is None:
            raise KeyMaterialError(f"{root / 'master.key_secret'} holds no secret key")
        self._secret = secret
        for kind in (AGENTS_DOMAIN, CLIENTS_DOMAIN):
            if not (root / kind).is_dir():
                raise KeyMaterialError(f"{root / kind} missing: no allow-list for {kind}")
        self.auth = ThreadAuthenticator(ctx)
        self.auth.start()
        self.auth.configure_curve(domain=AGENTS_DOMAIN, location=str(root / AGENTS_DOMAIN))
        self.auth.configure_curve(domain=CLIENTS_DOMAIN, location=str(root / CLIENTS_DOMAIN))

    def serve(self, sock: zmq.Socket, domain: str) -> None:
        """Make a binding socket a CURVE server in a ZAP domain (before bind)."""
        sock.zap_domain = domain.encode()
        sock.curve_server = True
        sock.curve_secretkey = self._secret

    def stop(self) -> None:
        """Stop the authenticator thread."""
        self.auth.stop()
