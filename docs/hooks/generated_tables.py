"""mkdocs hook: tables made from the code at build time, so that the pages cannot drift from it.

A page line ``<!-- generated: NAME -->`` is replaced by the table NAME: ``commands`` (every ``invertnet``
command with its usage, help and options, from the click group), ``kinds`` (every registered model kind with its
family, builder and ``model`` config fields, from the registry) or ``configs`` (the embedded configs with their
kind, data and steps).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable

import click
from pydantic.fields import FieldInfo

MARKER = re.compile(r"^<!-- generated: (\w+) -->$", flags=re.MULTILINE)


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _commands() -> str:
    from invertnet.app.cli import main

    rows = ["| command | what it does | options |", "| --- | --- | --- |"]
    context = click.Context(main, info_name="invertnet")
    for name in sorted(main.commands):
        command = main.commands[name]
        usage = command.get_usage(click.Context(command, info_name=name, parent=context))
        usage = usage.removeprefix("Usage: ")
        summary = inspect.cleandoc(command.help or "").split("\n\n")[0]
        options = ", ".join(
            f"`{param.opts[0]}`" for param in command.params if isinstance(param, click.Option) and not param.hidden
        )
        rows.append(f"| `{_cell(usage)}` | {_cell(summary)} | {options} |")
    return "\n".join(rows)


def _default(field: FieldInfo) -> str:
    return " (required)" if field.is_required() else f" = `{field.get_default(call_default_factory=True)!r}`"


def _kinds() -> str:
    from invertnet.app.kinds import KINDS

    rows = ["| kind | family | builder | `model` fields (defaults) |", "| --- | --- | --- | --- |"]
    for name, kind in KINDS.items():
        config = kind.config
        builder = config.builder
        fields = ", ".join(
            f"`{field}`{_default(info)}" for field, info in config.model_fields.items() if field != "kind"
        )
        rows.append(
            f"| `{name}` | {kind.family} | `{builder.__module__.rsplit('.', 1)[0]}.{builder.__name__}` | "
            f"{fields or '(none)'} |"
        )
    return "\n".join(rows)


def _configs() -> str:
    from invertnet.app.config import load_config
    from invertnet.app.embedded import embedded_configs

    rows = ["| config | model kind | data | training steps |", "| --- | --- | --- | --- |"]
    for name in embedded_configs():
        config = load_config(name)
        rows.append(f"| `{name}` | `{config.model.kind}` | `{config.data.name}` | {config.train.steps} |")
    return "\n".join(rows)


TABLES: dict[str, Callable[[], str]] = {"commands": _commands, "kinds": _kinds, "configs": _configs}


def on_page_markdown(markdown: str, **_: object) -> str:
    def table(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in TABLES:
            raise ValueError(f"docs: unknown generated table {name!r}; known: {sorted(TABLES)}")
        return TABLES[name]()

    return MARKER.sub(table, markdown)
