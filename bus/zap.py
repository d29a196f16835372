"""The master's ZAP authenticator thread (pyzmq's ThreadAuthenticator, whose import pulls in
asyncio): apart from bus.security so that peers and the CLI, which never authenticate anyone,
do not import it."""

from __future__ import annotations

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from bus.security import _MAX_WARNED, AllowList, Peer, log


class Authenticator(ThreadAuthenticator):
    """pyzmq's ZAP thread with our allow-lists as its CURVE credentials provider and a User-Id
    that names the peer.

    pyzmq calls callback() and, if it admits the key, curve_user_id() next for the same request
    on the same thread; the peer found by the one is handed to the other, checked by key.
    """

    def __init__(self, ctx: zmq.Context, lists: dict[str, AllowList]) -> None:
        super().__init__(ctx)
        self.lists = lists
        self._admitted: tuple[bytes, Peer] | None = None
        self._warned: set[tuple[str, bytes]] = set()

    def callback(self, domain: str, key: bytes) -> bool:
        """Admit a Z85 public key on a ZAP domain (pyzmq credentials-provider protocol)."""
        self._admitted = None
        try:
            allow = self.lists.get(domain)
            peer = allow.lookup(key) if allow is not None else None
        except Exception:  # an exception here would end the ZAP thread: refuse instead
            log.exception("ZAP check failed on domain %s; refusing", domain)
            return False
        if peer is None:
            if len(self._warned) < _MAX_WARNED and (domain, key) not in self._warned:
                self._warned.add((domain, key))
                log.warning("refused CURVE key %s on domain %s: not in its allow-list",
                            key.decode(errors="replace"), domain)
            return False
        self._admitted = (key, peer)
        return True

    def curve_user_id(self, client_public_key: bytes) -> str:
        """The User-Id of the key callback() just admitted: "role:name"."""
        admitted, self._admitted = self._admitted, None
        if admitted is None or admitted[0] != z85.encode(client_public_key):
            return "unknown:"  # cannot happen; parse_user_id rejects it, so it fails closed
        return admitted[1].user_id
