"""Every sweep key, from the typed model that reads sweep files: what ``orch config`` prints.

The model in ``orchestrator.config`` is the one source of each key's meaning (its field's
``description``), default and allowed values (its type and bounds); this module only walks it.
``reference`` lists the keys; ``annotated_yaml`` writes them as a sweep file, every key at its
default with its meaning as a comment (the README's annotated example is a selection of these
lines: tests/orchestrator/test_config.py checks it); ``markdown`` is docs/sweep-file.md.
"""

from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from orchestrator import config

# A section that is one of several models, picked by one of its keys: the data (by family) and
# the pruner (by name). The first is the one ``annotated_yaml`` writes out.
VARIANTS: dict[tuple[str, ...], tuple[tuple[str, type[BaseModel]], ...]] = {
    ("data",): (("family: sinusoid", config.SinusoidData), ("family: images", config.ImageData)),
    ("search", "pruner"): tuple((f"name: {name}", model) for name, model in config.PRUNERS.items()),
}
COMMENT_COLUMN = 34


@dataclass(frozen=True)
class Key:
    """One key of the sweep file."""

    path: str  # dotted, e.g. training.checkpoint_every
    allowed: str  # the type or the allowed values, as a reader writes them
    default: str  # as YAML writes it; "required" where there is none
    meaning: str  # the field's description
    variant: str = ""  # "family: images" for a key of one variant of its section


def reference() -> list[Key]:
    """Every key of ``config.Sweep``, in the model's order, sections expanded; a key without a
    description is a ``TypeError``."""
    return list(_keys(config.Sweep, ()))


def _keys(model: type[BaseModel], prefix: tuple[str, ...], variant: str = "") -> Iterator[Key]:
    for name, field in model.model_fields.items():
        path = prefix + (name,)
        if path in VARIANTS:
            for label, sub in VARIANTS[path]:
                yield from _keys(sub, path, label)
            continue
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _keys(annotation, path, variant)
            continue
        if not field.description:
            raise TypeError(f"{model.__name__}.{name} ({'.'.join(path)}) has no description: "
                            "every sweep key says what it means in its Field")
        allowed = "algorithm -> knobs" if path == ("algorithms",) else _allowed(field)
        yield Key(".".join(path), allowed, _default(field), field.description, variant)


def _default(field: FieldInfo) -> str:
    if field.default is PydanticUndefined and field.default_factory is None:
        return "required"
    return yaml_value(field.get_default(call_default_factory=True))


def yaml_value(value: Any) -> str:
    """``value`` as YAML writes it in flow style."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value).replace('"', "")
    return str(value)


def _allowed(field: FieldInfo) -> str:
    bounds = []
    for item in field.metadata:
        for kind, attribute, sign in ((annotated_types.Ge, "ge", ">="),
                                      (annotated_types.Gt, "gt", ">"),
                                      (annotated_types.Le, "le", "<="),
                                      (annotated_types.Lt, "lt", "<")):
            if isinstance(item, kind):
                bounds.append(f"{sign} {getattr(item, attribute):g}")
    return _type_text(field.annotation) + (f" ({', '.join(bounds)})" if bounds else "")


def _type_text(annotation: Any) -> str:
    origin = get_origin(annotation)
    if origin is Literal:
        return " | ".join(str(value) for value in get_args(annotation))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_text(arg) for arg in get_args(annotation))
    if origin is typing.Annotated:  # a section of variants: named by their tags
        return _type_text(get_args(annotation)[0])
    if origin is list:
        item = _type_text(get_args(annotation)[0])
        return f"list of ({item})" if " | " in item else f"list of {item}"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "{name: ..., knobs}"
    return getattr(annotation, "__name__", str(annotation))


def annotated_yaml() -> str:
    """A sweep file with every key at its default (``...`` where it has none) and its meaning as
    a comment; of a section with variants, the first one's keys."""
    lines: list[str] = []
    opened: set[tuple[str, ...]] = set()
    for key in reference():
        parts = tuple(key.path.split("."))
        if key.variant and key.variant != VARIANTS[parts[:-1]][0][0]:
            continue
        for depth in range(1, len(parts)):
            if parts[:depth] not in opened:
                opened.add(parts[:depth])
                lines.append(f"{'  ' * (depth - 1)}{parts[depth - 1]}:")
        value = "..." if key.default == "required" else key.default
        text = f"{'  ' * (len(parts) - 1)}{parts[-1]}: {value}"
        lines.append(f"{text:<{COMMENT_COLUMN}}# {key.meaning}")
    return "\n".join(lines) + "\n"


def markdown() -> str:
    """docs/sweep-file.md: every key, its allowed values, default and meaning."""
    rows = ["# The sweep file, key by key", "",
            "Generated from the typed model that reads sweep files (`orchestrator/config.py`): "
            "`orch config --markdown` writes this page, `orch config` prints it in the terminal, "
            "and a test fails when they differ. How to write a sweep file, with an annotated "
            "example: the [README](../README.md#the-sweep-file).", "",
            "| key | allowed | default | meaning |", "| --- | --- | --- | --- |"]
    for key in reference():
        where = f" ({key.variant})" if key.variant else ""
        allowed = key.allowed.replace("|", "\\|")
        rows.append(f"| `{key.path}`{where} | {allowed} | `{key.default}` | {key.meaning} |")
    return "\n".join(rows) + "\n"
