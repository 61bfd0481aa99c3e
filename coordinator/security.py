"""CURVE keys for remote workers, and the authenticator that admits exactly the two expected ones.

CURVE alone only encrypts: without a ZAP handler libzmq lets *any* client that knows
the server's public key in. So the coordinator always starts a ``Gatekeeper`` (a
pyzmq ``ThreadAuthenticator``) before it binds; it admits the torch and paddle
workers' public keys and nothing else, tags every admitted message with the worker
the key belongs to (the ZMTP ``User-Id``), and keeps a record of every refused
connection so that a run which times out waiting for a HELLO can say *why* (wrong
server key, no keys at all, an unknown client key) instead of just "timed out".

Keys live in files created by ``coordinator keys DIR`` (mode 0600; a file readable
by group or others is refused) or arrive on stdin (``-``). Key material is never
put on a command line, in a log, or in ``summary.json``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import stat
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, TextIO

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from .errors import UsageError

WORKER_NAMES = ("torch", "paddle")
KEY_FILES = {"server": "server.key", "torch": "torch.key", "paddle": "paddle.key"}
WORKER_FIELDS = ("public", "secret", "server")        # what a worker needs (protocol.adapter reads these)
SERVER_FIELDS = ("public", "secret") + WORKER_NAMES   # the coordinator's pair + the two admitted publics

log = logging.getLogger("lockstep.auth")


class KeyFileError(UsageError):
    """A key file that is missing, malformed, or readable by others (exit 2)."""


# -- keys and key files --------------------------------------------------------------------
def generate_keypair() -> tuple[bytes, bytes]:
    """A new CURVE (public, secret) pair, z85 text as bytes (40 characters each)."""
    if not zmq.has("curve"):
        raise UsageError("this libzmq was built without CURVE support; remote workers need it")
    return zmq.curve_keypair()


def write_key_file(path: Path, fields: Mapping[str, bytes], comment: str, force: bool = False) -> None:
    """Write ``name=value`` lines to a new file created 0600 (never briefly world-readable)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if force else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{path} already exists; pass --force to replace the keys") from None
    with os.fdopen(fd, "w") as f:
        os.fchmod(f.fileno(), 0o600)  # O_TRUNC on an existing file keeps its old mode
        f.write(f"# {comment}\n# Keep this file private (chmod 600); never paste it on a command line.\n")
        for k, v in fields.items():
            f.write(f"{k}={v.decode('ascii')}\n")


def write_key_set(directory: Path, force: bool = False) -> dict[str, Path]:
    """Create ``server.key``, ``torch.key`` and ``paddle.key`` in ``directory`` (0700).

    The server file holds its own pair and the two admitted worker publics; each worker
    file holds its own pair and the server's public key: each party gets what it needs.
    """
    directory = Path(directory)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    server_pub, server_sec = generate_keypair()
    pairs = {name: generate_keypair() for name in WORKER_NAMES}
    paths = {name: directory / fname for name, fname in KEY_FILES.items()}
    if not force:
        existing = [str(p) for p in paths.values() if p.exists()]
        if existing:
            raise KeyFileError(f"{', '.join(existing)} already exist; pass --force to replace the keys")
    server_fields = {"public": server_pub, "secret": server_sec, **{n: pairs[n][0] for n in WORKER_NAMES}}
    write_key_file(paths["server"], server_fields, "lockstep coordinator CURVE keys (coordinator run --listen "
                   "... --curve-keys server.key)", force=True)
    for name in WORKER_NAMES:
        pub, sec = pairs[name]
        write_key_file(paths[name], {"public": pub, "secret": sec, "server": server_pub},
                       f"lockstep {name} worker CURVE keys (coordinator worker {name} --connect ... "
                       f"--curve-keys {KEY_FILES[name]})", force=True)
    return paths


def read_key_file(path: str, required: Iterable[str], stdin: TextIO | None = None) -> dict[str, bytes]:
    """Read ``name=value`` lines from a 0600 file (or stdin for ``-``); validate every key.

    The mode is checked on the opened file (no race between check and read). Errors
    name the file and the field, never a value.
    """
    if path == "-":
        text, where = (stdin or sys.stdin).read(), "stdin"
    else:
        where = path
        try:
            f = open(path)
        except OSError as exc:
            raise KeyFileError(f"cannot read key file {path}: {exc.strerror}") from None
        with f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise KeyFileError(f"key file {path} is not a regular file")
            if st.st_mode & 0o077:
                raise KeyFileError(f"key file {path} is readable by group/others (mode "
                                   f"{stat.S_IMODE(st.st_mode):03o}); run: chmod 600 {path}")
            text = f.read()
    keys: dict[str, bytes] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not sep:
            raise KeyFileError(f"key file {where} line {n}: expected NAME=KEY")
        keys[name.strip()] = value.strip().encode("ascii", "replace")
    missing = [k for k in required if k not in keys]
    if missing:
        raise KeyFileError(f"key file {where} lacks {', '.join(missing)} (has: {', '.join(sorted(keys)) or 'nothing'})")
    for name in required:
        _validate_key(keys[name], where, name)
    if "public" in required and "secret" in required and zmq.curve_public(keys["secret"]) != keys["public"]:
        raise KeyFileError(f"key file {where}: its public key is not the one of its secret key (edited or mixed "
                           f"from two files?); write a new set with `coordinator keys DIR --force`")
    return keys


def _validate_key(value: bytes, where: str, name: str) -> None:
    try:
        ok = len(value) == 40 and len(z85.decode(value)) == 32
    except Exception:
        ok = False
    if not ok:
        raise KeyFileError(f"key file {where}: {name} is not a 40-character z85 CURVE key")


def load_server_keys(path: str, stdin: TextIO | None = None) -> dict[str, Any]:
    """The coordinator's side: ``{"public", "secret", "allowed": {"torch": pub, "paddle": pub}}``."""
    keys = read_key_file(path, SERVER_FIELDS, stdin)
    if keys["torch"] == keys["paddle"]:
        raise KeyFileError(f"key file {path}: torch and paddle must have different keys")
    return {"public": keys["public"], "secret": keys["secret"],
            "allowed": {n: keys[n] for n in WORKER_NAMES}}


def fingerprint(public: bytes) -> str:
    """A short, non-secret handle for a public key in messages (the first 8 z85 characters)."""
    return public[:8].decode("ascii", "replace") + "…"


# -- transport policy ------------------------------------------------------------------------
def endpoint_host(endpoint: str) -> str | None:
    """The host part of ``tcp://HOST:PORT`` (brackets stripped), None for other transports."""
    if not endpoint.startswith("tcp://"):
        return None
    rest = endpoint[len("tcp://"):]
    rest = rest.split(";")[-1]          # tcp://src;dst: the destination decides
    host = rest.rsplit(":", 1)[0] if ":" in rest else rest
    return host.strip("[]")


def is_loopback(endpoint: str) -> bool:
    """True for ipc/inproc and for TCP on 127.0.0.0/8, ::1 or localhost (nothing leaves the host)."""
    host = endpoint_host(endpoint)
    if host is None:
        return endpoint.startswith(("ipc://", "inproc://"))
    if host == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False  # '*', a name, an interface: reachable from elsewhere
    mapped = getattr(ip, "ipv4_mapped", None)   # ::ffff:127.0.0.1, as a bound tcp://127.0.0.1:0 reports itself
    return (mapped or ip).is_loopback


def check_transport(endpoint: str, have_keys: bool, insecure: bool, role: str) -> str | None:
    """Refuse plaintext TCP unless ``--insecure``; return a warning or None.

    Loopback TCP too: any local user can connect to the port, or bind it before the coordinator
    and command a worker that connects there (a worker imports and runs the factory the
    coordinator names). ``ipc://`` paths are guarded by their directory's permissions.
    ``role`` is the flag the user typed (``--listen`` or ``--connect``) so the error names it.
    """
    if not endpoint.startswith(("tcp://", "ipc://", "inproc://")):
        raise UsageError(f"{role} {endpoint!r}: use tcp://HOST:PORT (or ipc://PATH)")
    if endpoint.startswith("tcp://") and ":" not in endpoint[len("tcp://"):]:
        raise UsageError(f"{role} {endpoint!r}: the port is missing (tcp://HOST:PORT)")
    if have_keys or not endpoint.startswith("tcp://"):
        return None
    if not insecure and is_loopback(endpoint):
        who = ("any local user could connect to it as a worker" if role == "--listen" else
               "any local user who binds that port first could command this worker (it imports and runs "
               "the model code it is told to)")
        raise UsageError(f"{role} {endpoint} without --curve-keys: {who}. Create keys with `coordinator keys DIR` "
                         f"and pass --curve-keys, use ipc://PATH in a directory only you can enter, or pass "
                         f"--insecure on a host only you use")
    if not insecure:
        who = "any client could join" if role == "--listen" else "anyone on the way could read or impersonate them"
        raise UsageError(f"{role} {endpoint} is reachable from other hosts and no --curve-keys were given: "
                         f"tensors and weights would cross the network unencrypted and {who}. "
                         f"Create keys with `coordinator keys DIR` and pass --curve-keys, or pass --insecure "
                         f"on a network you trust")
    return (f"WARNING: {role} {endpoint} without CURVE keys (--insecure): traffic is unencrypted and "
            f"unauthenticated")


# -- the authenticator --------------------------------------------------------------------------
_FAILURES = {
    zmq.PROTOCOL_ERROR_ZMTP_CRYPTOGRAPHIC: "a client used the wrong server public key (its key file does not "
                                           "match this coordinator's server.key)",
    zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH: "a client connected without CURVE keys (start it with "
                                                "--curve-keys)",
}


class _AllowedKeys:
    """ZAP credentials callback: a key is admitted only when it is one of the expected workers'."""

    def __init__(self, gate: "Gatekeeper"):
        self.gate = gate

    def callback(self, domain: str, key: bytes) -> bool:
        return bytes(key) in self.gate.owners


class Gatekeeper(ThreadAuthenticator):
    """Admits exactly the allowed public keys and remembers every refusal, for the error message."""

    def __init__(self, ctx: zmq.Context, allowed: Mapping[str, bytes] | Iterable[bytes]):
        super().__init__(ctx, log=log)
        if isinstance(allowed, Mapping):
            self.owners = {bytes(k): name for name, k in allowed.items()}
        else:
            self.owners = {bytes(k): f"client-{i}" for i, k in enumerate(allowed)}
        self._lock = threading.Lock()
        self.attempts: list[dict[str, Any]] = []
        self.failures: dict[str, int] = {}
        self._monitor: threading.Thread | None = None
        self._monitored: zmq.Socket | None = None
        self._stop_monitor = threading.Event()

    # ZAP: called on the authenticator's thread for every connection that gets as far as CURVE.
    def handle_zap_message(self, msg: list[bytes]) -> Any:
        try:
            self._note_zap(msg)
        except Exception:  # never let bookkeeping break authentication
            pass
        return super().handle_zap_message(msg)

    def _note_zap(self, msg: list[bytes]) -> None:
        address = bytes(msg[3]).decode("utf-8", "replace") if len(msg) > 3 else "?"
        mechanism = bytes(msg[5]).decode("ascii", "replace") if len(msg) > 5 else "?"
        key = z85.encode(bytes(msg[6])) if mechanism == "CURVE" and len(msg) > 6 else None
        owner = self.owners.get(key) if key else None
        entry = {"t": round(time.time(), 3), "address": address, "mechanism": mechanism,
                 "key": fingerprint(key) if key else None, "worker": owner,
                 "outcome": "admitted" if owner else "denied: client key is not one of the allowed worker keys"}
        with self._lock:
            self.attempts.append(entry)
        if owner:
            log.info("admitted %s worker key %s from %s", owner, entry["key"], address)
        else:
            self._count("an unknown client key was refused (not the torch or paddle key in server.key)")
            log.info("denied unknown client key %s from %s", entry["key"], address)

    def curve_user_id(self, client_public_key: bytes) -> str:
        """Admitted messages carry the worker's name as ZMTP User-Id (checked against the identity)."""
        return self.owners.get(z85.encode(client_public_key), "?")

    def owns(self, identity: str, frame: Any) -> bool:
        """Did this message come from the key that belongs to ``identity``? (no key swapping)."""
        try:
            user = frame.get("User-Id")
        except Exception:
            user = None
        if user == identity:
            return True
        self._count(f"a client authenticated as {user!r} claimed to be the {identity} worker (message dropped)")
        return False

    def _count(self, what: str) -> None:
        """Count a refusal; say it on stderr the first time (a client retrying says it again and again)."""
        with self._lock:
            n = self.failures[what] = self.failures.get(what, 0) + 1
        (log.warning if n == 1 else log.debug)("lockstep authenticator refused a connection: %s%s", what,
                                               " (repeats are counted, not shown)" if n == 1 else "")

    # Handshake failures that never reach ZAP (wrong server key, no keys) show up only here.
    def watch(self, sock: zmq.Socket) -> None:
        """Follow ``sock``'s handshake events on a thread; call before ``bind``."""
        events = zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_AUTH | \
            zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
        mon = sock.get_monitor_socket(events)
        self._monitored = sock
        self._monitor = threading.Thread(target=self._follow, args=(mon,), name="lockstep-handshake-monitor",
                                         daemon=True)
        self._monitor.start()

    def _follow(self, mon: zmq.Socket) -> None:
        from zmq.utils.monitor import recv_monitor_message
        try:
            while not self._stop_monitor.is_set():
                if not mon.poll(100):
                    continue
                ev = recv_monitor_message(mon)
                if ev["event"] == zmq.EVENT_MONITOR_STOPPED:
                    break
                self._note_event(int(ev["event"]), int(ev["value"]))
        except zmq.ZMQError:
            pass
        finally:
            mon.close(0)

    def _note_event(self, event: int, value: int) -> None:
        if event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            what = _FAILURES.get(value, f"a client failed the CURVE handshake (ZMTP protocol error {value:#x})")
        elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            return  # counted with its address in _note_zap
        else:
            # libzmq reports this when the client hung up mid-greeting; a client started without
            # CURVE keys does that under load instead of reaching the mechanism mismatch
            what = ("a client's handshake failed with no detail from libzmq (usually a client connected "
                    "without CURVE keys, or one that hung up mid-handshake)")
        self._count(what)

    def explain(self) -> str:
        """Why nothing (or not everything) got in: one line per kind of refusal, with counts."""
        with self._lock:
            failures = dict(self.failures)
            admitted = sorted({a["worker"] for a in self.attempts if a["worker"]})
            denied = [a for a in self.attempts if not a["worker"]]
        lines = []
        if admitted:
            lines.append(f"admitted keys: {', '.join(admitted)}")
        for what, n in failures.items():
            lines.append(f"refused {n}x: {what}")
        for a in denied[-3:]:
            lines.append(f"  denied key {a['key']} from {a['address']}")
        if not lines:
            lines.append("no client attempted a connection (check the address, port, firewall, and that the "
                         "workers were started with `coordinator worker NAME --connect ...`)")
        return "authenticator: " + "\n  ".join(lines)

    def record(self) -> dict[str, Any]:
        """What goes into summary.json: outcomes and fingerprints, never key material."""
        with self._lock:
            return {"attempts": list(self.attempts), "refusals": dict(self.failures)}

    def stop(self) -> None:
        """Stop the handshake monitor and the ZAP thread (before the context terminates)."""
        self._stop_monitor.set()
        if self._monitored is not None:
            try:
                self._monitored.disable_monitor()
            except zmq.ZMQError:
                pass
            self._monitored = None
        if self._monitor is not None:
            self._monitor.join(2)
            self._monitor = None
        super().stop()


def start_authenticator(ctx: zmq.Context, allowed_public_keys: Mapping[str, bytes] | Iterable[bytes]
                        ) -> Gatekeeper:
    """Start the ZAP handler on ``ctx`` admitting exactly ``allowed_public_keys`` (z85).

    Must run before the CURVE server socket binds: a connection handshaking while no
    ZAP handler exists would be let in unchecked.
    """
    gate = Gatekeeper(ctx, allowed_public_keys)
    if not gate.owners:
        raise UsageError("no worker public keys to admit: the server key file must list torch= and paddle=")
    gate.start()
    gate.configure_curve_callback("*", _AllowedKeys(gate))
    return gate
