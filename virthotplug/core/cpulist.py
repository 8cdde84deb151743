"""Parse and format cpulist strings such as ``0-3,^2,7``.

Cpulists reach us from the guest agent (``dom.guestVcpus()``), from domain XML and from
users. The guest is untrusted (anyone with root in it writes what the agent returns), so
the parser is strict and bounded:

* the input is at most ``MAX_CPULIST_CHARS`` characters and every id is at most ``max_id``;
  bounds are checked on the digit strings *before* any conversion or expansion, so a
  string like ``0-99999999999`` is refused at once;
* the set is built as an integer bitmask, so memory is at most ``max_id + 1`` bits however
  many (overlapping) ranges the input repeats, and each item costs O(max_id / word size);
* every failure is a ``CpulistError`` with a one-line message.

Grammar (after stripping surrounding whitespace, e.g. the newline of a sysfs file)::

    cpulist := "" | item ("," item)*
    item    := ["^"] id ["-" id]            first id <= second id
    id      := "0" | [1-9][0-9]*            ASCII digits only

Decisions, and why:

* **Leading zeros are rejected** (``07``, ``00``). Neither the Linux kernel (sysfs
  ``online``/``possible``) nor libvirt's ``virBitmapFormat`` (what ``guestVcpus()``
  returns) ever emits them, so their presence means the text was not produced by either.
* **No whitespace inside the list.** libvirt's parser skips spaces around separators, but
  nothing we read emits them; accepting them would only widen what a guest can send.
* **Exclusions apply in order**, as in libvirt's ``virBitmapParse``: ``^N`` removes ids that
  the items *before* it added, and a later item can add them back (``^2,0-3`` is 0-3).
  ``^N-M`` is accepted as well, although libvirt's own parser refuses it; we never emit it.
* No stride syntax (the kernel's ``0-7:2/4``): the kernel accepts it but never emits it.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator

MAX_CPULIST_CHARS = 4096
"""Longest cpulist string accepted (before stripping whitespace)."""

MAX_CPU_ID = 16383
"""Default upper bound on any CPU id; above any real NR_CPUS or QEMU maximum."""

_QUOTE_CHARS = 40
"""How much of the offending input an error message quotes."""

# ASCII only: str.strip() with no argument also strips e.g. U+001C and U+0085.
_SURROUNDING_WHITESPACE = " \t\n\r\f\v"

# ASCII-only on purpose: ``\d`` and ``int()`` also accept e.g. Arabic-Indic digits.
_ITEM = re.compile(r"(\^?)([0-9]+)(?:-([0-9]+))?")


class CpulistError(ValueError):
    """A cpulist string is malformed or out of bounds. The message is one line."""


def _quote(text: str) -> str:
    """Return a short, one-line ``repr`` of untrusted text for an error message."""
    if len(text) <= _QUOTE_CHARS:
        return repr(text)
    return f"{text[:_QUOTE_CHARS]!r}... ({len(text)} chars)"


def _check_max_id(max_id: int) -> None:
    """Reject a caller's bad ``max_id`` (a programming error, not bad input)."""
    if isinstance(max_id, bool) or not isinstance(max_id, int):
        raise TypeError(f"max_id must be an int, not {type(max_id).__name__}")
    if max_id < 0:
        raise ValueError(f"max_id must be >= 0, got {max_id}")


def _parse_id(digits: str, item: str, max_id: int, text: str) -> int:
    """Convert one run of ASCII digits, refusing leading zeros and ids above ``max_id``."""
    if len(digits) > 1 and digits[0] == "0":
        raise CpulistError(f"leading zero in item {_quote(item)} of cpulist {_quote(text)}")
    # Compare lengths first so a huge digit string is never converted.
    if len(digits) > len(str(max_id)) or int(digits) > max_id:
        raise CpulistError(
            f"cpu id {_quote(digits)} exceeds maximum {max_id} in cpulist {_quote(text)}"
        )
    return int(digits)


def _range_mask(first: int, last: int) -> int:
    """Bitmask with bits ``first``..``last`` (inclusive) set."""
    return ((1 << (last - first + 1)) - 1) << first


def _mask_to_ids(mask: int) -> frozenset[int]:
    """Expand a bitmask into the set of its bit positions."""
    # bin() is linear in the number of bits; shifting the mask bit by bit would be quadratic.
    bits_lowest_first = bin(mask)[:1:-1]
    return frozenset(position for position, bit in enumerate(bits_lowest_first) if bit == "1")


def _apply_item(mask: int, item: str, max_id: int, text: str) -> int:
    """Return ``mask`` with one cpulist item added (or, for ``^``, removed)."""
    if not item:
        raise CpulistError(f"empty item in cpulist {_quote(text)}")
    match = _ITEM.fullmatch(item)
    if match is None:
        raise CpulistError(f"malformed item {_quote(item)} in cpulist {_quote(text)}")
    exclude, first_digits, last_digits = match.groups()
    first = _parse_id(first_digits, item, max_id, text)
    last = first if last_digits is None else _parse_id(last_digits, item, max_id, text)
    if last < first:
        raise CpulistError(f"reversed range {_quote(item)} in cpulist {_quote(text)}")
    bits = _range_mask(first, last)
    return mask & ~bits if exclude else mask | bits


def parse_cpulist(text: str, *, max_id: int = MAX_CPU_ID) -> frozenset[int]:
    """Parse a cpulist (see the module docstring for the grammar) into a set of CPU ids.

    Raises ``CpulistError`` for any input that does not follow the grammar, is longer than
    ``MAX_CPULIST_CHARS``, is not a ``str``, or names an id above ``max_id``.
    """
    _check_max_id(max_id)
    if not isinstance(text, str):
        raise CpulistError(f"cpulist must be a str, not {type(text).__name__}")
    if len(text) > MAX_CPULIST_CHARS:
        raise CpulistError(
            f"cpulist too long: {len(text)} chars (max {MAX_CPULIST_CHARS}): {_quote(text)}"
        )
    stripped = text.strip(_SURROUNDING_WHITESPACE)
    if not stripped:
        return frozenset()
    mask = 0
    for item in stripped.split(","):
        mask = _apply_item(mask, item, max_id, text)
    return _mask_to_ids(mask)


def _check_id(cpu_id: object) -> int:
    """Accept only non-negative ints (``bool`` is an int subclass but never a CPU id)."""
    if isinstance(cpu_id, bool) or not isinstance(cpu_id, int):
        raise TypeError(f"cpu id must be an int, not {type(cpu_id).__name__}")
    if cpu_id < 0:
        raise CpulistError(f"cpu id must be >= 0, got {cpu_id}")
    return cpu_id


def _runs(sorted_ids: list[int]) -> Iterator[tuple[int, int]]:
    """Group sorted, distinct ids into (first, last) runs of consecutive ids."""
    first = last = sorted_ids[0]
    for cpu_id in sorted_ids[1:]:
        if cpu_id != last + 1:
            yield first, last
            first = cpu_id
        last = cpu_id
    yield first, last


def format_cpulist(ids: Iterable[int]) -> str:
    """Format CPU ids in canonical compact form: ``"0-3,7"``; ``""`` for no ids.

    Sorted, duplicates merged, ranges for two or more consecutive ids, never ``^``:
    the same form as ``virBitmapFormat`` and the kernel, so ``parse_cpulist`` reads it back.
    Raises ``TypeError`` for a non-int id and ``CpulistError`` for a negative one.
    """
    sorted_ids = sorted({_check_id(cpu_id) for cpu_id in ids})
    if not sorted_ids:
        return ""
    return ",".join(
        str(first) if first == last else f"{first}-{last}" for first, last in _runs(sorted_ids)
    )
