"""Decode ACPI _OST reports and QEMU's ACPI_DEVICE_OST / DEVICE_DELETED event details.

When the guest evaluates ``_OST(source, status)`` QEMU emits::

    {"event": "ACPI_DEVICE_OST", "data": {"info": {"device": "vcpu1", "source": 1,
     "status": 0, "slot": "1", "slot-type": "CPU"}}}

and ``libvirt_qemu.qemuMonitorEventRegister`` hands its callback the ``data`` part as a JSON
*string* (the lab's bindings pass a string; a dict is accepted too). The guest chooses
source and status, so everything here is untrusted input: sizes are
bounded before ``json.loads``, types are exact, and every failure is an ``EventDataError``
with a one-line message. An OST event is only a hint: ``device check: success`` means the
guest *detected* the CPU, never that it is online.

Codes follow ACPI 6.x §6.3.5 (_OST, OSPM Status Indication).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Union

from virthotplug.core.cpulist import MAX_CPU_ID

MAX_EVENT_JSON = 8192
"""Largest event detail accepted, in characters (str) or bytes (bytes)."""

MAX_EVENT_JSON_DEPTH = 16
"""Deepest nesting of arrays/objects accepted; QEMU's event data is two levels deep."""

MAX_OST_CODE = 0xFFFFFFFF
"""_OST source and status are ACPI DWORDs."""

_MAX_ID_CHARS = 128  # device ids and QOM path components are short; libvirt's are "vcpuN"
_MAX_PATH_CHARS = 512
_MAX_SLOT_CHARS = 32
_MAX_SLOT_TYPE_CHARS = 32
_MAX_INT_DIGITS = 20  # enough for any DWORD; refuses 4000-digit numbers before int()
_QUOTE_CHARS = 40

# --- source (notify) codes -------------------------------------------------------------

SOURCE_DEVICE_CHECK = 0x01
SOURCE_EJECT_REQUEST = 0x03
SOURCE_OSPM_SHUTDOWN = 0x100
SOURCE_OSPM_EJECT = 0x103
SOURCE_OSPM_INSERTION = 0x200

SOURCE_NAMES: dict[int, str] = {
    0x00: "bus check",
    0x01: "device check",
    0x02: "device wake",
    0x03: "eject request",
    0x04: "device check light",
    0x05: "frequency mismatch",
    0x06: "bus mode mismatch",
    0x07: "power fault",
    0x08: "capabilities check",
    0x09: "device PLD check",
    0x0B: "system locality update",
    0x0C: "graceful shutdown request",
    0x0D: "system resource affinity update",
    0x0E: "heterogeneous memory attributes update",
    0x0F: "error disconnect recover",
    0x100: "OSPM shutdown processing",
    0x103: "OSPM ejection processing",
    0x200: "OSPM insertion processing",
}
_DEVICE_SPECIFIC_SOURCES = range(0x80, 0x100)

# --- status codes ----------------------------------------------------------------------

STATUS_SUCCESS = 0x00

GENERAL_STATUS_NAMES: dict[int, str] = {
    0x00: "success",
    0x01: "non-specific failure",
    0x02: "unrecognized notify code",
}
"""Status codes shared by every source; 0x03-0x7F are reserved."""

_SOURCE_SPECIFIC_STATUSES = range(0x80, MAX_OST_CODE + 1)

EJECT_STATUS_NAMES: dict[int, str] = {
    0x80: "ejection not supported by OSPM",
    0x81: "device in use by an application",
    0x82: "device busy",
    0x83: "ejection dependency busy or not supported",
    0x84: "ejection in progress",
}
"""For sources 0x03 (eject request) and 0x103 (OSPM ejection); 0x85 and up are reserved."""

INSERTION_STATUS_NAMES: dict[int, str] = {
    0x80: "insertion in progress",
    0x81: "device driver load failure",
    0x82: "insertion not supported by OSPM",
}
"""For source 0x200; 0x90-0x9F are decoded from their resource bits, the rest is reserved."""

INSERTION_RESOURCE_BITS: tuple[tuple[int, str], ...] = (
    (0x8, "bus numbers"),
    (0x4, "interrupts"),
    (0x2, "I/O"),
    (0x1, "memory"),
)
"""Low nibble of insertion statuses 0x90-0x9F: which resources were unavailable."""

_INSERTION_RESOURCE_STATUSES = range(0x90, 0xA0)

SHUTDOWN_STATUS_NAMES: dict[int, str] = {
    0x80: "shutdown request denied",
    0x81: "shutdown in progress",
    0x82: "shutdown completed",
    0x83: "graceful shutdown not supported",
}
"""For source 0x100; 0x84 and up are reserved."""

SPECIFIC_STATUS_NAMES: dict[int, dict[int, str]] = {
    SOURCE_EJECT_REQUEST: EJECT_STATUS_NAMES,
    SOURCE_OSPM_EJECT: EJECT_STATUS_NAMES,
    SOURCE_OSPM_INSERTION: INSERTION_STATUS_NAMES,
    SOURCE_OSPM_SHUTDOWN: SHUTDOWN_STATUS_NAMES,
}
"""Sources whose 0x80+ statuses ACPI defines; other sources' 0x80+ are notify-specific."""

# libvirt aliases hotpluggable vCPUs "vcpuN" (N = libvirt vCPU id); ASCII digits, no
# leading zeros, bounded length so int() never sees a huge number.
_VCPU_ALIAS = re.compile(r"vcpu(0|[1-9][0-9]{0,4})")
_PERIPHERAL_PREFIX = "/machine/peripheral/"


def _hex(code: int) -> str:
    return f"0x{code:02x}"


def _insertion_resources_name(status: int) -> str:
    """Name an insertion status 0x90-0x9F from the unavailable-resource bits it carries."""
    resources = [name for bit, name in INSERTION_RESOURCE_BITS if status & bit]
    detail = ", ".join(resources) if resources else "unspecified"
    return f"insertion failed, resources unavailable ({detail})"


def source_name(source: int) -> str:
    """Human name of an _OST source (notify) code, e.g. ``"device check"``."""
    name = SOURCE_NAMES.get(source)
    if name is not None:
        return name
    if source in _DEVICE_SPECIFIC_SOURCES:
        return f"device-specific ({_hex(source)})"
    return f"reserved ({_hex(source)})"


def status_name(source: int, status: int) -> str:
    """Human name of an _OST status code, decoded in the context of its source."""
    general = GENERAL_STATUS_NAMES.get(status)
    if general is not None:
        return general
    if status not in _SOURCE_SPECIFIC_STATUSES:
        return f"reserved ({_hex(status)})"
    specific = SPECIFIC_STATUS_NAMES.get(source)
    if specific is None:
        return f"notify-specific ({_hex(status)})"
    name = specific.get(status)
    if name is not None:
        return name
    if source == SOURCE_OSPM_INSERTION and status in _INSERTION_RESOURCE_STATUSES:
        return _insertion_resources_name(status)
    return f"reserved ({_hex(status)})"


def _vcpu_id_from_alias(alias: str | None) -> int | None:
    """``"vcpu3"`` -> 3; ``None`` for anything else (other ids, ids above MAX_CPU_ID)."""
    if alias is None:
        return None
    match = _VCPU_ALIAS.fullmatch(alias)
    if match is None:
        return None
    vcpu_id = int(match.group(1))
    return vcpu_id if vcpu_id <= MAX_CPU_ID else None


@dataclass(frozen=True)
class OstEvent:
    """One ACPI_DEVICE_OST report: what the guest said about one hotplug slot."""

    source: int
    status: int
    device: str | None  # QEMU device id = libvirt alias ("vcpu2"); absent after an eject
    slot: str | None  # QEMU slot index as a string ("2")
    slot_type: str | None  # "CPU", "DIMM", ...

    @property
    def source_name(self) -> str:
        return source_name(self.source)

    @property
    def status_name(self) -> str:
        return status_name(self.source, self.status)

    @property
    def is_cpu(self) -> bool:
        return self.slot_type == "CPU"

    @property
    def is_success(self) -> bool:
        return self.status == STATUS_SUCCESS

    @property
    def vcpu_id(self) -> int | None:
        """libvirt vCPU id from a ``vcpuN`` device id; ``None`` if absent or another name."""
        return _vcpu_id_from_alias(self.device)

    @property
    def subject(self) -> str:
        """What the event is about: the device id, else e.g. "the CPU in slot 2"."""
        if self.device is not None:
            return self.device
        subject = f"the {self.slot_type}" if self.slot_type is not None else "the device"
        return subject if self.slot is None else f"{subject} in slot {self.slot}"

    def describe(self) -> str:
        """One line for logs, e.g. ``eject request: ejection in progress (vcpu3)``."""
        head = f"{self.source_name}: {self.status_name}"
        explain = _SUCCESS_EXPLANATIONS.get(self.source) if self.is_success else None
        if explain is not None:
            return f"{head} — {explain(self)}"
        if self.device is None and self.slot is None and self.slot_type is None:
            return head
        return f"{head} ({self.subject})"


def _explain_detected(event: OstEvent) -> str:
    # The guest's ACPI code reports Device Check success; that the kernel has the CPU (a
    # cpuN in sysfs) is known only once the guest lists it: a kernel with no room in its
    # possible-CPU mask accepts the device and still never lists a CPU (lab notes, Debian
    # 13 under TCG). And listed never means online: the guest decides that on its own.
    suffix = "; not yet listed by the guest" if event.is_cpu else ""
    return f"the guest's ACPI accepted {event.subject}{suffix}"


def _explain_ejected(event: OstEvent) -> str:
    return f"guest ejected {event.subject}"


_SUCCESS_EXPLANATIONS: dict[int, Callable[[OstEvent], str]] = {
    SOURCE_DEVICE_CHECK: _explain_detected,
    SOURCE_EJECT_REQUEST: _explain_ejected,
    SOURCE_OSPM_EJECT: _explain_ejected,
}
"""source -> what a *successful* report from that source means, for ``describe()``."""


@dataclass(frozen=True)
class DeviceDeleted:
    """A DEVICE_DELETED event: QEMU finished removing a device or one of its children.

    On QEMU 7.2 unplugging ``vcpu1`` yields DEVICE_DELETED only for the child
    ``/machine/peripheral/vcpu1/lapic`` (no ``device`` field), never for ``vcpu1`` itself
    (lab notes). So ``vcpu_id`` is set only when the event is for the vCPU device itself,
    and ``parent_vcpu_id`` names the vCPU a deleted child belonged to.
    """

    device: str | None
    path: str

    @property
    def is_device_itself(self) -> bool:
        """True when the path is the named device's own (``/machine/peripheral/<device>``)."""
        return self.device is not None and self.path == _PERIPHERAL_PREFIX + self.device

    @property
    def vcpu_id(self) -> int | None:
        """The vCPU deleted, only when this event is for the vCPU device itself."""
        return _vcpu_id_from_alias(self.device) if self.is_device_itself else None

    @property
    def is_vcpu_child(self) -> bool:
        """True when a child of a vCPU (e.g. its lapic) was deleted, not the vCPU itself."""
        return self.parent_vcpu_id is not None

    @property
    def parent_vcpu_id(self) -> int | None:
        """The vCPU whose child (e.g. its lapic) was deleted: a hint that it is going away."""
        return _vcpu_id_from_alias(_peripheral_parent(self.path))


def _peripheral_parent(path: str) -> str | None:
    """``/machine/peripheral/vcpu1/lapic`` -> ``"vcpu1"``; ``None`` if not such a child."""
    if not path.startswith(_PERIPHERAL_PREFIX):
        return None
    parent, slash, child = path[len(_PERIPHERAL_PREFIX) :].partition("/")
    return parent if slash and parent and child else None


# --- parsing untrusted event details ---------------------------------------------------


class EventDataError(ValueError):
    """QEMU event details are missing, malformed or out of bounds. One-line message."""


Details = Union[str, bytes, bytearray, Mapping[str, Any], None]
"""What a monitor-event callback may hand us as ``details``."""


def _quote(value: object) -> str:
    """Describe an untrusted value in a few characters, whatever its size or depth.

    Never ``repr`` a container (deep nesting makes repr recurse) or a huge int (repr is
    slow, and refused by Python 3.11+ past 4300 digits): slice or summarise first.
    """
    if isinstance(value, str):
        suffix = "..." if len(value) > _QUOTE_CHARS else ""
        return f"{value[:_QUOTE_CHARS]!r}{suffix}"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"a {value.bit_length()}-bit integer"
    if value is None or isinstance(value, (bool, int, float)):
        return repr(value)
    return f"a {_json_type(value)}"


def _reject_constant(name: str) -> Any:
    raise EventDataError(f"non-finite number {name} in event details")


def _bounded_int(digits: str) -> int:
    if len(digits) > _MAX_INT_DIGITS:
        raise EventDataError(f"number with {len(digits)} digits in event details")
    return int(digits)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Refuse duplicate keys: a guest-influenced document must have one meaning only."""
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise EventDataError(f"duplicate key {_quote(key)} in event details")
        result[key] = value
    return result


def _nesting_exceeds(text: str, limit: int) -> bool:
    """True if arrays/objects in ``text`` nest deeper than ``limit``.

    Checked before ``json.loads`` so the outcome does not depend on the interpreter's
    recursion limits (3.13 parses thousands of levels, older versions raise RecursionError).
    Exact for valid JSON; for invalid JSON ``json.loads`` reports the error anyway.
    """
    depth = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > limit:
                return True
        elif char in "]}":
            depth -= 1
    return False


def _loads(text: str) -> Any:
    if _nesting_exceeds(text, MAX_EVENT_JSON_DEPTH):
        raise EventDataError(f"event details nested deeper than {MAX_EVENT_JSON_DEPTH} levels")
    try:
        return json.loads(
            text,
            parse_int=_bounded_int,
            parse_constant=_reject_constant,
            object_pairs_hook=_unique_keys,
        )
    except EventDataError:
        raise
    except RecursionError:  # defence in depth; the nesting check should prevent it
        raise EventDataError("event details nested too deeply") from None
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise EventDataError(f"event details are not valid JSON: {message}") from None


def _details_to_mapping(details: Details) -> Mapping[str, Any]:
    """Bound, decode and parse ``details`` into a JSON object (a mapping)."""
    if details is None:
        raise EventDataError("event has no details")
    if isinstance(details, (bytes, bytearray)):
        if len(details) > MAX_EVENT_JSON:
            raise EventDataError(f"event details too long: {len(details)} bytes")
        try:
            details = bytes(details).decode("utf-8")
        except UnicodeDecodeError:
            raise EventDataError("event details are not valid UTF-8") from None
    if isinstance(details, str):
        if len(details) > MAX_EVENT_JSON:
            raise EventDataError(f"event details too long: {len(details)} chars")
        details = _loads(details)
    if not isinstance(details, Mapping):
        raise EventDataError(f"event details must be a JSON object, not {_json_type(details)}")
    return details


def _json_type(value: object) -> str:
    return type(value).__name__


def _require_code(fields: Mapping[str, Any], key: str) -> int:
    value = fields.get(key)
    # bool is an int subclass; JSON true must not pass as 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise EventDataError(f"{key!r} must be an integer, got {_quote(value)}")
    if not 0 <= value <= MAX_OST_CODE:
        raise EventDataError(f"{key!r} out of range 0..0xFFFFFFFF: {_quote(value)}")
    return value


def _optional_text(fields: Mapping[str, Any], key: str, max_chars: int) -> str | None:
    """A present string must be non-empty, short and printable (it ends up in log lines)."""
    value = fields.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise EventDataError(f"{key!r} must be a string, got {_json_type(value)}")
    if not value or len(value) > max_chars:
        raise EventDataError(f"{key!r} must be 1..{max_chars} chars, got {len(value)}")
    if not value.isprintable():
        raise EventDataError(f"{key!r} has unprintable characters: {_quote(value)}")
    return value


def _required_text(fields: Mapping[str, Any], key: str, max_chars: int) -> str:
    value = _optional_text(fields, key, max_chars)
    if value is None:
        raise EventDataError(f"{key!r} is missing")
    return value


def parse_ost_details(details: Details) -> OstEvent:
    """Validate ACPI_DEVICE_OST details (``{"info": {...}}``) and return an ``OstEvent``.

    Accepts the JSON text (str or UTF-8 bytes) or an already decoded dict. Unknown keys are
    ignored so that a newer QEMU's additions do not break us; known keys must be exact.
    Raises ``EventDataError`` on anything else.
    """
    info = _details_to_mapping(details).get("info")
    if not isinstance(info, Mapping):
        raise EventDataError(f"'info' must be a JSON object, got {_json_type(info)}")
    return OstEvent(
        source=_require_code(info, "source"),
        status=_require_code(info, "status"),
        device=_optional_text(info, "device", _MAX_ID_CHARS),
        slot=_optional_text(info, "slot", _MAX_SLOT_CHARS),
        slot_type=_optional_text(info, "slot-type", _MAX_SLOT_TYPE_CHARS),
    )


def parse_device_deleted(details: Details) -> DeviceDeleted:
    """Validate DEVICE_DELETED details (``{"device": "vcpu1", "path": "/machine/..."}``).

    ``device`` is optional (children and anonymous devices have none); ``path`` is required
    and must be an absolute QOM path. Raises ``EventDataError`` on anything else.
    """
    fields = _details_to_mapping(details)
    path = _required_text(fields, "path", _MAX_PATH_CHARS)
    if not path.startswith("/"):
        raise EventDataError(f"'path' must be an absolute QOM path, got {_quote(path)}")
    return DeviceDeleted(device=_optional_text(fields, "device", _MAX_ID_CHARS), path=path)
