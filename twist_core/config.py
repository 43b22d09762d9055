"""One dataclass per command, filled from an optional YAML/JSON file and then the command line.

Every field carries its help text in ``metadata["help"]`` so that ``--help`` documents each option and
the saved ``config.json`` reproduces a run exactly.

A config file's values are checked against the field types strictly, with no conversion: an integer option
takes an integer (``5``, not ``"5"`` or ``true``), a number an integer or a decimal, a switch only ``true`` or
``false`` (a quoted ``"false"`` is text, and text is never read as a switch), a text option only text (quote
``"10"``), ``null`` only where the option may be left out, and the options with a fixed set of choices one of
them. A wrong value is one line naming the key, the value and the type expected, before the command starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from twist_core.errors import UserError

C = TypeVar("C")
AUTO = "auto"  # the one spelling of "choose this for me": command line, config files and the config dataclasses


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with its command-line help text."""
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def auto_option(legacy: Any, help: str, **kwargs: Any) -> Any:
    """A field chosen automatically unless given (``auto``). ``legacy`` is the sentinel older versions used for it
    (0, -1 or None): ``AutoConfig`` still reads it as ``auto``, so their config.json files and flags keep working."""
    return option(AUTO, help, legacy_auto=legacy, **kwargs)


class AutoConfig:
    """Base of every command's config: the one place that turns an old auto sentinel into ``AUTO``."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):  # type: ignore[arg-type]
            if "legacy_auto" not in field.metadata:
                continue
            value, legacy = getattr(self, field.name), field.metadata["legacy_auto"]
            if value is legacy or (legacy is not None and not isinstance(value, bool | str) and value == legacy):
                setattr(self, field.name, AUTO)


def auto_or(kind: type) -> Any:
    """Argparse type of an auto field: the word ``auto`` or a value of ``kind``."""
    def parse(text: str) -> Any:
        return AUTO if text == AUTO else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value"
    return parse


def _base_type(annotation: Any) -> Any:
    """Strip ``X | None`` to ``X`` so argparse knows how to parse the value."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0]
    return annotation


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, positional: tuple[str, ...] = ()) -> None:
    """Add one option per field of ``cls``; fields named in ``positional`` become positional arguments."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.metadata.get("cli") is False:
            continue
        kind = _base_type(hints[field.name])
        help_text = field.metadata.get("help", "")
        if field.name in positional:
            parser.add_argument(field.name, type=str, help=help_text, nargs="?" if field.default is None else None)
            continue
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
        help_text = f"{help_text} (default: {default})"
        if kind is bool:
            parser.add_argument(_flag(field.name), dest=field.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
        elif typing.get_origin(kind) is list:
            item = typing.get_args(kind)[0]
            parser.add_argument(_flag(field.name), dest=field.name, type=item, nargs="*",
                                default=argparse.SUPPRESS, help=help_text)
        else:
            choices = field.metadata.get("choices")
            parse = auto_or(kind) if "legacy_auto" in field.metadata else kind
            parser.add_argument(_flag(field.name), dest=field.name, type=parse, choices=choices,
                                default=argparse.SUPPRESS, help=help_text, metavar=field.metadata.get("metavar"))


def command_parser(prog: str, doc: str | None, cls: type, positional: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """A command's parser: one option per config field, plus ``--config FILE`` (flags override the file)."""
    # The module docstring's first paragraph, without its reStructuredText literal quotes (``twist demo``).
    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").split("\n\n")[0].replace("``", ""),
                                     allow_abbrev=False)  # --to must never be read as --top
    add_dataclass_arguments(parser, cls, positional)
    parser.add_argument("--config", help="YAML or JSON file of options (command-line flags override it)")
    return parser


class ConfigError(UserError, ValueError):
    """A config file that cannot be read, or one of its values has the wrong type."""


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON mapping of option names (dashes or underscores) to values."""
    text = Path(path).read_text()
    try:
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as error:
        raise ConfigError(f"{path}: not a valid {'JSON' if str(path).endswith('.json') else 'YAML'} file "
                          f"({' '.join(str(error).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option names to values")
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(f"{path}: option names are text, got {_shown(key)} ({_type_name(key)})")
    return {k.replace("-", "_"): v for k, v in data.items()}


def build_config(cls: type[C], args: argparse.Namespace, config_file: str | None = None) -> C:
    """File values first (each checked against its field's type), then every option given on the command
    line; unknown keys are an error."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = checked_file_values(cls, config_file, str(config_file)) if config_file else {}
    values.update({k: v for k, v in vars(args).items() if k in fields and v is not None})
    return cls(**values)


def checked_file_values(cls: type, path: str | Path, source: str) -> dict[str, Any]:
    """The options of a YAML/JSON file for the dataclass ``cls``: unknown keys refused, each value checked
    against its field's type (``source`` names the file in messages)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values = load_config_file(path)
    unknown = set(values) - set(fields)
    if unknown:
        raise ConfigError(f"unknown option(s) in {path}: {', '.join(sorted(unknown))}")
    hints = typing.get_type_hints(cls)
    return {name: checked_value(fields[name], hints[name], value, source) for name, value in values.items()}


def checked_value(field: dataclasses.Field, annotation: Any, value: Any, source: str) -> Any:
    """``value`` if it has the type of ``field`` (an integer given for a number becomes a float), else a
    :class:`ConfigError` naming the key, the value and the expected type. Nothing is converted from text."""
    kinds = _members(annotation)
    legacy = field.metadata.get("legacy_auto", AUTO)
    if legacy != AUTO:  # an auto option: the word auto, its old sentinel, or a value of its real type
        if value == AUTO or (value is None and legacy is None):
            return value
        kinds = [kind for kind in kinds if kind is not str]
    if value is None and (type(None) in kinds or field.default is None):
        return value
    choices = field.metadata.get("choices")
    for kind in kinds:
        matched, typed = _matches(value, kind)
        if matched and (not choices or typed in choices):
            return typed
    expected = (f"one of {', '.join(map(str, choices))}" if choices
                else " or ".join(([AUTO] if legacy != AUTO else []) + [_expected(kind) for kind in kinds]))
    raise ConfigError(f"{source}: {field.name}: {_shown(value)} ({_type_name(value)}) is not {expected}")


def _members(annotation: Any) -> list[Any]:
    """The types a field takes: ``int | None`` -> [int, NoneType]."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return list(typing.get_args(annotation))
    return [annotation]


def _matches(value: Any, kind: Any) -> tuple[bool, Any]:
    """Whether ``value`` is a ``kind`` as YAML/JSON give it (``True`` is no integer), and the value to keep."""
    if kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if typing.get_origin(kind) is list:
        item = typing.get_args(kind)[0]
        if not isinstance(value, list):
            return False, value
        checked = [_matches(element, item) for element in value]
        return all(ok for ok, _ in checked), [typed for _, typed in checked]
    if kind is type(None):
        return value is None, value
    return isinstance(value, kind), value


def _expected(kind: Any) -> str:
    if typing.get_origin(kind) is list:
        return f"a list of {_expected(typing.get_args(kind)[0])}"
    return {bool: "true or false", int: "an integer", float: "a number", str: "text (quote it)",
            type(None): "null"}.get(kind, getattr(kind, "__name__", str(kind)))


def _type_name(value: Any) -> str:
    for kind, name in ((bool, "true/false"), (int, "integer"), (float, "number"), (str, "text"),
                       (list, "list"), (dict, "mapping"), (type(None), "null")):
        if isinstance(value, kind):
            return name
    return type(value).__name__


def _shown(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Any, path: Path) -> None:
    from twist_core.io_utils import atomic_write_text

    atomic_write_text(path, json.dumps(to_dict(config), indent=2, sort_keys=True) + "\n")
