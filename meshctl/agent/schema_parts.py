"""Building blocks of the manifest's JSON Schema, shared by agent.schema and its `schema_*` families.

`ref()` points at a shared definition under `$defs` (a duration, a name, a retry policy);
`closed_object()` is an object that refuses unknown keys, so a typo is an error.
"""

from __future__ import annotations

from typing import Any


def described(schema: dict, description: str) -> dict:
    return {**schema, "description": description}


def ref(name: str, description: str) -> dict:
    return {"$ref": "#/$defs/" + name, "description": description}


def closed_object(properties: dict, description: str, required: tuple = (), **extra: Any) -> dict:
    schema: dict[str, Any] = {
        "type": "object",
        "description": description,
        "properties": properties,
        "additionalProperties": False,
    }
    if required:
        schema["required"] = list(required)
    schema.update(extra)
    return schema


def exactly_one_of(properties: dict, description: str) -> dict:
    return closed_object(properties, description, minProperties=1, maxProperties=1)


PERCENT = {"type": "number", "minimum": 0, "maximum": 100}
