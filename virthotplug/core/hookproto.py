"""The libvirt hook's protocol: what ``hooks/qemu`` sends and ``daemon.hookserver`` accepts.

One JSON object per unix datagram, protocol version 1, at most ``MAX_MESSAGE_BYTES`` bytes,
UTF-8 (the sender escapes every non-ASCII character), exactly these keys and types::

    {"v": 1, "op": "started", "subop": "begin", "name": "web1",
     "uuid": "3b3c0e4f-8a6e-4d9a-9f0e-1d4a5c6b7e01",
     "vcpus": {"current": 1, "maximum": 4, "hotpluggable": 3}, "agent_channel": true}

``op`` is a libvirt QEMU hook operation, ``subop`` its sub-operation, ``vcpus`` null when
the domain XML's counts are unreadable. Any change to the keys or their meaning gets a new
``v``. Socket: ``[watch] hook_socket``, by default ``DEFAULT_SOCKET``; the hook also takes
``$VIRTHOTPLUG_HOOK_SOCKET`` (``SOCKET_ENV``, for tests: libvirtd passes no environment).

Both ends import this module, the hook with the system's python3 inside libvirtd's wait: so
it imports nothing at all at import time (``decode`` imports ``json`` when called, which
only the daemon does) and defines no classes beyond one exception.
"""

from __future__ import annotations

PROTOCOL_VERSION = 1
DEFAULT_SOCKET = "/run/virthotplug/hook.sock"
SOCKET_ENV = "VIRTHOTPLUG_HOOK_SOCKET"
MAX_MESSAGE_BYTES = 4096
MAX_NAME_CHARS = 1024
MAX_VCPUS = 65535
OPERATIONS = (
    "prepare",
    "start",
    "started",
    "stopped",
    "release",
    "migrate",
    "restore",
    "reconnect",
    "attach",
)
SUB_OPERATIONS = ("begin", "end", "-")
KEYS = ("v", "op", "subop", "name", "uuid", "vcpus", "agent_channel")
VCPU_KEYS = ("current", "maximum", "hotpluggable")
_HEX = frozenset("0123456789abcdefABCDEF")

# (current, maximum, hotpluggable)
Vcpus = tuple[int, int, int]
# What a message says: operation, sub-operation, name, UUID (lower case), vCPUs, channel.
Fields = tuple[str, str, str, str, "Vcpus | None", bool]


class MessageError(ValueError):
    """A datagram that is not a valid hook message."""


def valid_uuid(text: str) -> bool:
    """Whether ``text`` is a UUID in its canonical 8-4-4-4-12 form (either case)."""
    return (
        len(text) == 36
        and all(text[i] == "-" for i in (8, 13, 18, 23))
        and all(c in _HEX for c in text.replace("-", ""))
    )


def has_control(text: str) -> bool:
    """Whether ``text`` holds a C0 control character or DEL."""
    return any(c < " " or c == "\x7f" for c in text)


# --- the sender ---------------------------------------------------------------------------


def json_string(text: str) -> str:
    """``text`` as a JSON string of ASCII characters only (json.dumps, without json)."""
    out = ['"']
    for char in text:
        code = ord(char)
        if char in '"\\':
            out.append("\\" + char)
        elif 0x20 <= code < 0x7F:
            out.append(char)
        elif code > 0xFFFF:
            code -= 0x10000
            out.append(f"\\u{0xD800 | (code >> 10):04x}\\u{0xDC00 | (code & 0x3FF):04x}")
        else:
            out.append(f"\\u{code:04x}")
    out.append('"')
    return "".join(out)


def encode(
    operation: str,
    sub_operation: str,
    name: str,
    uuid: str,
    vcpus: Vcpus | None,
    agent_channel: bool,
) -> bytes:
    """One message, compact; the caller checks its size against ``MAX_MESSAGE_BYTES``."""
    counts = "null"
    if vcpus is not None:
        current, maximum, hotpluggable = vcpus
        counts = f'{{"current":{current},"maximum":{maximum},"hotpluggable":{hotpluggable}}}'
    fields = (
        f'"v":{PROTOCOL_VERSION}',
        f'"op":{json_string(operation)}',
        f'"subop":{json_string(sub_operation)}',
        f'"name":{json_string(name)}',
        f'"uuid":{json_string(uuid)}',
        f'"vcpus":{counts}',
        f'"agent_channel":{"true" if agent_channel else "false"}',
    )
    return ("{" + ",".join(fields) + "}").encode("ascii")


# --- the receiver -------------------------------------------------------------------------


def decode(data: bytes) -> Fields:
    """Validate one datagram; raises ``MessageError`` saying what is wrong."""
    import json

    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageError(f"larger than {MAX_MESSAGE_BYTES} bytes")
    try:
        doc = json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constant,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MessageError(f"not JSON: {short(str(exc))}") from None
    if not isinstance(doc, dict):
        raise MessageError("not a JSON object")
    if set(doc) != set(KEYS):
        missing, extra = sorted(set(KEYS) - set(doc)), sorted(set(doc) - set(KEYS))
        raise MessageError(f"wrong keys (missing {missing}, unknown {short(str(extra))})")
    if type(doc["v"]) is not int or doc["v"] != PROTOCOL_VERSION:
        raise MessageError(f"protocol version {short(repr(doc['v']))}, expected 1")
    op, subop, name, uuid = doc["op"], doc["subop"], doc["name"], doc["uuid"]
    if not isinstance(op, str) or op not in OPERATIONS:
        raise MessageError(f"unknown operation {short(repr(op))}")
    if not isinstance(subop, str) or subop not in SUB_OPERATIONS:
        raise MessageError(f"unknown sub-operation {short(repr(subop))}")
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS or has_control(name):
        raise MessageError("invalid domain name")
    if not isinstance(uuid, str) or not valid_uuid(uuid):
        raise MessageError(f"invalid UUID {short(repr(uuid))}")
    if type(doc["agent_channel"]) is not bool:
        raise MessageError("agent_channel is not true or false")
    return op, subop, name, uuid.lower(), _vcpus(doc["vcpus"]), doc["agent_channel"]


def _vcpus(value: object) -> Vcpus | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != set(VCPU_KEYS):
        raise MessageError("vcpus is not an object with current, maximum and hotpluggable")
    numbers = [value[key] for key in VCPU_KEYS]
    if not all(type(n) is int and 0 <= n <= MAX_VCPUS for n in numbers):
        raise MessageError(f"vcpus counts must be integers from 0 to {MAX_VCPUS}")
    current, maximum, hotpluggable = numbers
    if current > maximum or hotpluggable > maximum:
        raise MessageError("vcpus counts exceed the maximum")
    return current, maximum, hotpluggable


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate key")
    return result


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not allowed")


def short(text: str, limit: int = 60) -> str:
    """``text`` for a log line: control characters as "?", at most ``limit`` characters."""
    text = "".join("?" if c < " " or c == "\x7f" else c for c in text)
    return text if len(text) <= limit else text[:limit] + "..."
