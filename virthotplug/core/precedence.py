"""Which policy layer decides, field by field: the one rule for the daemon, the commands
and the libvirt hook.

A domain's policy layers, highest precedence first: its metadata element, the first
``[domain:PATTERN]`` section of the configuration file that matches it (a name glob,
case-sensitive like ``fnmatch.fnmatchcase``, or its UUID in any case), then ``[defaults]``;
each field comes from the first layer that has it, else from the built-in default.
``core.config`` picks the sections, ``core.policy.merge_policy`` merges and validates the
fields; ``hooks/qemu`` asks the same functions for the one field it needs (``mode``) without
validating anything. So this module imports nothing: the hook runs inside libvirtd's wait.
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy knows the name)
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence
    from typing import TypeVar

    V = TypeVar("V")

DOMAIN_PREFIX = "domain:"
DEFAULTS_SECTION = "defaults"


def section_matches(pattern: str, name: str, uuid: str) -> bool:
    """Whether a ``[domain:PATTERN]`` section applies to the domain."""
    return glob_match(name, pattern) or pattern.lower() == uuid.lower()


def first_match(patterns: Iterable[str], name: str, uuid: str) -> int | None:
    """The index of the first pattern that applies to the domain (file order), or None."""
    for index, pattern in enumerate(patterns):
        if section_matches(pattern, name, uuid):
            return index
    return None


def merge_fields(
    layers: Sequence[tuple[str, Mapping[str, V]]],
) -> dict[str, tuple[str, V]]:
    """Each field, from the first layer that has it: ``{field: (source, value)}``."""
    merged: dict[str, tuple[str, V]] = {}
    for source, fields in layers:
        for name, value in fields.items():
            if name not in merged:
                merged[name] = (source, value)
    return merged


# --- domain name globs --------------------------------------------------------------------
# Exactly fnmatch.fnmatchcase, without importing re (whose import alone costs the hook
# several milliseconds). A pattern is a list of tokens: STAR, ANY, a (negated, items)
# character set, or a literal character.
Token = object  # STAR, ANY, a CharSet or a one-character str
CharSet = tuple[bool, tuple[tuple[str, str], ...]]  # negated?, ranges (single chars: a-a)
STAR: Token = object()
ANY: Token = object()


def glob_match(name: str, pattern: str) -> bool:
    """``fnmatch.fnmatchcase(name, pattern)``."""
    if not any(c in pattern for c in "*?["):
        return name == pattern
    tokens = glob_tokens(pattern)
    i = j = 0
    star_j, star_i = -1, 0
    while i < len(name):  # greedy with backtracking to the last star: linear per star
        if j < len(tokens) and tokens[j] is not STAR and token_matches(tokens[j], name[i]):
            i, j = i + 1, j + 1
        elif j < len(tokens) and tokens[j] is STAR:
            star_j, star_i, j = j, i, j + 1
        elif star_j >= 0:
            star_i += 1
            i, j = star_i, star_j + 1
        else:
            return False
    while j < len(tokens) and tokens[j] is STAR:
        j += 1
    return j == len(tokens)


def token_matches(token: Token, char: str) -> bool:
    if token is ANY:
        return True
    if isinstance(token, tuple):
        negated, ranges = token
        return bool(any(low <= char <= high for low, high in ranges) != negated)
    return token == char


def glob_tokens(pat: str) -> list[Token]:
    """fnmatch.translate's parsing (CPython 3.9-3.12), producing tokens instead of a regex."""
    tokens: list[Token] = []
    i, n = 0, len(pat)
    while i < n:
        c = pat[i]
        i += 1
        if c == "*":
            if not tokens or tokens[-1] is not STAR:
                tokens.append(STAR)
        elif c == "?":
            tokens.append(ANY)
        elif c == "[":
            j = i
            if j < n and pat[j] == "!":
                j += 1
            if j < n and pat[j] == "]":
                j += 1
            while j < n and pat[j] != "]":
                j += 1
            if j >= n:
                tokens.append("[")
                continue
            tokens.append(char_set(pat, i, j))
            i = j + 1
        else:
            tokens.append(c)
    return tokens


def char_set(pat: str, i: int, j: int) -> CharSet:
    """The set ``pat[i:j]`` (between the brackets) as fnmatch turns it into a regex class:
    the same chunks and escapes, then that class read back."""
    if "-" not in pat[i:j]:
        stuff = pat[i:j].replace("\\", "\\\\")
    else:
        chunks = []
        k = i + 2 if pat[i] == "!" else i + 1
        while True:
            k = pat.find("-", k, j)
            if k < 0:
                break
            chunks.append(pat[i:k])
            i = k + 1
            k = k + 3
        chunk = pat[i:j]
        if chunk:
            chunks.append(chunk)
        else:
            chunks[-1] += "-"
        for k in range(len(chunks) - 1, 0, -1):  # drop empty ranges such as z-a
            if chunks[k - 1][-1] > chunks[k][0]:
                chunks[k - 1] = chunks[k - 1][:-1] + chunks[k][1:]
                del chunks[k]
        stuff = "-".join(c.replace("\\", "\\\\").replace("-", "\\-") for c in chunks)
    if stuff == "!":
        return (True, ())  # negated empty set: any character
    negated = stuff.startswith("!")
    body = stuff[1:] if negated else stuff
    atoms: list[tuple[str, bool]] = []  # (character, is it an unescaped "-")
    pos = 0
    while pos < len(body):
        if body[pos] == "\\" and pos + 1 < len(body):
            atoms.append((body[pos + 1], False))
            pos += 2
        else:
            atoms.append((body[pos], body[pos] == "-"))
            pos += 1
    ranges: list[tuple[str, str]] = []
    index = 0
    while index < len(atoms):
        char = atoms[index][0]
        # As in a regex class: an item, "-" and another item make a range.
        if index + 2 < len(atoms) and atoms[index + 1][1]:
            ranges.append((char, atoms[index + 2][0]))
            index += 3
        else:
            ranges.append((char, char))
            index += 1
    return (negated, tuple(ranges))
