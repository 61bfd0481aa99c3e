"""The one interface every framework worker implements.

A worker adapter is a class whose ``op_<name>`` methods are the ops it serves;
``handlers()`` turns them into the ``op -> handler`` table that ``protocol.worker.serve``
dispatches on. Each op takes the request body (a dict of plain data and numpy arrays)
and returns the reply body. Replies are encoded before the worker runs anything else, so a
reply may hold views of framework tensors that nothing changes before the handler returns;
a tensor the adapter keeps and later modifies in place must be returned as an owned copy
(docs/extending.md, "Copies").
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable

from .worker import RequestContext, serve


class Adapter:
    framework: str = "?"
    after_op: Callable[[], None] | None = None   # run after each op's reply is sent (off its clock)

    def hello(self) -> dict[str, Any]:
        """Versions and device, sent once in the HELLO handshake."""
        raise NotImplementedError

    def handlers(self) -> dict[str, Callable[[Any, RequestContext], Any]]:
        table = {}
        for attr in dir(self):
            if attr.startswith("op_"):
                table[attr[3:]] = getattr(self, attr)
        return table


def main(adapter_factory: Callable[[], Adapter], name: str) -> int:
    """Shared ``python -m <worker>`` entry point: parse args, build the adapter, serve."""
    parser = argparse.ArgumentParser(prog=f"{name}_worker")
    parser.add_argument("--connect", required=True, help="coordinator endpoint (ipc://... or tcp://...)")
    parser.add_argument("--name", default=name)
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="exit when this process (the local coordinator) is gone")
    parser.add_argument("--curve-keys", default=None,
                        help="file (0600) with this worker's public/secret key and the server's public key")
    parser.add_argument("--insecure", action="store_true",
                        help="allow tcp:// without --curve-keys (anyone who can reach or bind the port commands "
                             "this worker)")
    args = parser.parse_args()
    if args.connect.startswith("tcp://") and not args.curve_keys and not args.insecure:
        parser.error(f"--connect {args.connect} without --curve-keys: whoever listens on that port could command "
                     f"this worker; pass --curve-keys FILE, or --insecure on a host and network only you use")
    curve = _read_curve_file(args.curve_keys) if args.curve_keys else None
    adapter = adapter_factory()
    return serve(args.name, args.connect, adapter.handlers(), adapter.hello(), curve=curve,
                 parent_pid=args.parent_pid, after_op=adapter.after_op)


def _read_curve_file(path: str) -> dict[str, bytes]:
    """Read ``public=…``, ``secret=…``, ``server=…`` lines (z85). '-' reads stdin."""
    def refuse(msg: str) -> None:
        print(f"error: {msg}", file=sys.stderr)
        raise SystemExit(2)   # a usage problem, as `coordinator worker` reports it
    try:
        text = sys.stdin.read() if path == "-" else open(path).read()
    except OSError as exc:
        refuse(f"cannot read key file {path}: {exc.strerror}")
    if path != "-" and os.stat(path).st_mode & 0o077:
        refuse(f"key file {path} must not be readable by group/others (chmod 600)")
    keys: dict[str, bytes] = {}
    for line in text.splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            k, v = line.split("=", 1)
            keys[k.strip()] = v.strip().encode()
    missing = {"public", "secret", "server"} - set(keys)
    if missing:
        refuse(f"key file {path} lacks {', '.join(sorted(missing))}")
    return keys
