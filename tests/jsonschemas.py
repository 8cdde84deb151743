"""The published JSON Schemas (schemas/*.json) as the tests apply them: every ``--json``
document a test sees, and every ``watch --json`` record, is validated against its command's
schema. jsonschema is a development dependency only; the program never loads a schema.
"""

from __future__ import annotations

import json
from functools import cache, lru_cache
from pathlib import Path
from typing import Any, Optional, Sequence

import jsonschema

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"
DOCUMENT_COMMANDS = ("status", "policy", "apply", "setvcpus")


@lru_cache(maxsize=1)
def schemas() -> dict[str, Any]:
    """Every published schema by its ``$id``."""
    found = {}
    for path in sorted(SCHEMAS.glob("*.json")):
        schema = json.loads(path.read_text())
        found[schema["$id"]] = schema
    return found


@cache
def validator(name: str) -> Any:
    schema = json.loads((SCHEMAS / f"{name}.json").read_text())
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, **_references())


def _references() -> dict[str, Any]:
    """How the validator resolves ``$ref`` between the schemas: ``referencing`` (jsonschema
    4.18 and later, the development venv), else the older RefResolver (Debian 12's
    python3-jsonschema 4.10, which the installed-package tests run with)."""
    try:
        from referencing import Registry, Resource
    except ImportError:
        store = schemas()
        return {"resolver": jsonschema.RefResolver("", {}, store=store)}
    resources = [(uri, Resource.from_contents(schema)) for uri, schema in schemas().items()]
    return {"registry": Registry().with_resources(resources)}


def validate(name: str, document: Any) -> None:
    """Raise ``jsonschema.ValidationError`` unless ``document`` fits schema ``name``."""
    validator(name).validate(document)


def validate_output(argv: Sequence[str], out: str) -> None:
    """The command's ``--json`` output, when ``argv`` asked for one and printed it."""
    from virthotplug.cli.main import command_word, with_debug_levels

    command: Optional[str] = command_word(with_debug_levels(list(argv)))
    if "--json" not in argv or not out.strip():
        return
    if command in DOCUMENT_COMMANDS:
        validate(command, json.loads(out))
    elif command == "watch":
        for line in out.splitlines():
            validate("watch-record", json.loads(line))
