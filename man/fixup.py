"""Tidy rst2man's roff so that ``mandoc -T lint`` (style level included) is silent.

    python3 man/fixup.py < page.roff > page.N

* drops the ``.sp`` rst2man puts right after ``.SH``/``.SS`` (a no-op there);
* names the literal-block font ``CR`` instead of ``C`` (the same Courier for groff; mandoc
  knows only the former);
* wraps filled text lines longer than 80 bytes at spaces (a newline is a space in filled
  text), never inside no-fill blocks or tables, never after the end of a sentence, and
  never so that a line starts with a control character.

Standard library only; the rendering with ``man -l`` is unchanged.
"""

from __future__ import annotations

import sys

LIMIT = 80


def fix(lines: list[str]) -> list[str]:
    out: list[str] = []
    verbatim = False  # inside .nf/.fi or a table
    for line in lines:
        if line == ".sp" and out and out[-1].startswith((".SH ", ".SS ")):
            continue
        if line == ".ft C":
            line = ".ft CR"
        if line.startswith((".nf", ".TS", ".EX")):
            verbatim = True
        elif line.startswith((".fi", ".TE", ".EE")):
            verbatim = False
        # A leading space is significant (a break): such lines are left as they are.
        if verbatim or line.startswith((".", "'", " ")) or len(line.encode()) <= LIMIT:
            out.append(line)
        else:
            out.extend(wrap(line))
    return out


def wrap(line: str) -> list[str]:
    words = split_at_spaces(line)
    lines: list[str] = []
    current = ""
    for word in words:
        candidate = f"{current} {word}" if current else word
        if current and len(candidate.encode()) > LIMIT:
            head, _, last = current.rpartition(" ")
            if head and ends_sentence(last):
                # A line ending in "." starts a new sentence for groff (wider space): keep
                # the rendering as it was by breaking one word earlier.
                lines.append(head)
                current = f"{last} {word}"
            else:
                lines.append(current)
                current = word
        else:
            current = candidate
    lines.append(current)
    return [lines[0]] + [r"\&" + w if w.startswith((".", "'")) else w for w in lines[1:]]


def ends_sentence(word: str) -> bool:
    return word.rstrip("\"')]*").endswith((".", "!", "?"))


def split_at_spaces(line: str) -> list[str]:
    """Words separated by single unescaped spaces (``\\ `` is a non-breaking space)."""
    words: list[str] = []
    start = 0
    i = 0
    while i < len(line):
        if line[i] == "\\":
            i += 2
            continue
        if line[i] == " ":
            if i > start:
                words.append(line[start:i])
            start = i + 1
        i += 1
    words.append(line[start:])
    return words


def main() -> None:
    text = sys.stdin.read()
    sys.stdout.write("\n".join(fix(text.split("\n"))))


if __name__ == "__main__":
    main()
