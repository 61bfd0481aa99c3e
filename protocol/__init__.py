"""Wire protocol shared by the coordinator and every worker.

Imports only the standard library, numpy, msgpack and pyzmq, so it can be
installed into every worker environment without pulling a framework along.
"""

PROTOCOL_VERSION = 1

from .errors import ProtocolError, RemoteError  # noqa: E402
from .codec import BFloat16, decode, encode  # noqa: E402

__all__ = ["PROTOCOL_VERSION", "ProtocolError", "RemoteError", "BFloat16", "decode", "encode"]
