"""The configuration reference, generated from the config schema so it cannot drift.

    python -m recaption.config_reference > docs/CONFIG.md

A test checks that ``docs/CONFIG.md`` equals this module's output.
"""

from __future__ import annotations

import json
import sys
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from recaption.config import RunConfig, Section


def _type_name(annotation: Any) -> str:
    text = getattr(annotation, "__name__", None) if not typing.get_args(annotation) else None
    if text:
        return text
    return str(annotation).replace("typing.", "").replace("pathlib.", "")


def _default(field: Any) -> str:
    if field.default is not PydanticUndefined:
        value = field.default
    elif field.default_factory is not None:
        value = field.default_factory()
    else:
        return "**required**"
    if isinstance(value, BaseModel):
        return "(section)"
    return f"`{json.dumps(value, default=str)}`"


def render() -> str:
    """The reference as Markdown: one table per section, one row per key."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `recaption/config.py` by `python -m recaption.config_reference`; do not",
        "edit by hand. Every key can be overridden on the command line as `SECTION.KEY=VALUE`.",
        "Keys marked *operational* change speed, not outputs: changing them never blocks a resume.",
        "",
        "## Top level",
        "",
        "| key | type | default | description |",
        "| --- | --- | --- | --- |",
    ]
    sections: list[tuple[str, type[Section]]] = []
    for name, field in RunConfig.model_fields.items():
        if field.exclude:
            continue
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, Section):
            sections.append((name, annotation))
            continue
        lines.append(
            f"| `{name}` | {_type_name(annotation)} | {_default(field)} | "
            f"{field.description or ''} |"
        )
    for name, model in sections:
        lines += ["", f"## `{name}`", ""]
        doc = (model.__doc__ or "").strip().splitlines()
        if doc:
            lines += [doc[0], ""]
        lines += ["| key | type | default | description |", "| --- | --- | --- | --- |"]
        for key, field in model.model_fields.items():
            note = field.description or ""
            if key in model.operational_keys:
                note = f"*operational.* {note}".strip()
            cells = [f"`{name}.{key}`", _type_name(field.annotation), _default(field), note]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
