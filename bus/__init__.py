"""ffrtmp wire protocol: codec, message schemas, sockets and the client library."""

from bus.codec import HEADER, PROTOCOL_VERSION, Message, decode, encode
from bus.errors import ClientError, ProtocolError

__all__ = [
    "HEADER",
    "PROTOCOL_VERSION",
    "ClientError",
    "Message",
    "ProtocolError",
    "decode",
    "encode",
]
