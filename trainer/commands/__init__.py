"""The sub-commands of ``python -m trainer`` / ``cvat-detector``, one module each, and the entry point.

A new command is a module here exposing ``HELP``, ``add_arguments(parser)`` and ``run(args)``.
Command modules are imported only when the parser is built and keep heavy imports inside ``run`` so
that ``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import pkgutil
import sys
import typing
from collections.abc import Callable, Collection
from functools import partial
from typing import Any

from serverless.errors import USER_ERRORS, UserError
from trainer import __version__

#: Listing order of the sub-commands (modules of this package).
ORDER = ["demo", "synth", "inspect", "train", "evaluate", "package", "predict", "crop", "suggest", "count"]


def command_names() -> list[str]:
    found = {m.name for m in pkgutil.iter_modules(__path__)}
    return [n for n in ORDER if n in found] + sorted(found - set(ORDER))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cvat-detector",
        description="Train detectors on CVAT annotations, serve them to CVAT, export object crops.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in command_names():
        module = importlib.import_module(f"trainer.commands.{name}")
        p = sub.add_parser(
            name,
            help=module.HELP,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def crop_main() -> int:
    """Console script ``cvat-detector-crop``: the crop exporter on its own."""
    return main(["crop", *sys.argv[1:]])


# ---------------------------------------------------------------- options defined once


def add_model_options(group: Any, *, threshold: bool = True, engine: bool = True) -> None:
    """--device, --engine and --threshold of every command that runs a trained model."""
    from serverless.engine import ENGINES
    from trainer.training.config import parse_device

    group.add_argument("--device", default="auto", type=partial(_as_argparse_type, parse=parse_device),
                       help="auto (the GPU when there is one), cpu, cuda or cuda:N (default: auto)")
    if engine:
        group.add_argument("--engine", choices=ENGINES, default="pytorch",
                           help="openvino: the run's OpenVINO export on the CPU, made and verified against "
                                "PyTorch on first use (default: pytorch)")
    if threshold:
        group.add_argument("--threshold", type=partial(_as_argparse_type, parse=parse_threshold),
                           help="score threshold for every label (default: the model's calibrated ones)")


def add_task_options(group: Any) -> None:
    """--tasks IDS or --project ID: the CVAT tasks a --server command reads (predict, suggest)."""
    from trainer.data.options import parse_ids

    which = group.add_mutually_exclusive_group()
    which.add_argument("--tasks", type=partial(_as_argparse_type, parse=parse_ids), metavar="IDS",
                       help="comma-separated task ids")
    which.add_argument("--project", type=int, metavar="ID", help="every task of this project")


def parse_threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"expected a score between 0 and 1, got {text!r}")
    return value


_UNSET = object()


def add_options(parser: argparse.ArgumentParser, cls: type, title: str, only: Collection[str] = ()) -> None:
    """One flag per field of the dataclass ``cls`` (see :func:`trainer.data.options.option`), or of
    the fields named in ``only`` (the others keep their defaults in :func:`read_options`).

    Defaults are left out of the parsed namespace (``SUPPRESS``) so that :func:`read_options`
    knows exactly which flags the user gave: those win over ``--config``, whatever their value.
    """
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if only and f.name not in only:
            continue
        meta, kind = f.metadata, _base_type(hints[f.name])
        kwargs: dict[str, Any] = {"help": _help(f), "default": argparse.SUPPRESS}
        if meta.get("positional"):
            group.add_argument(f.name, nargs="*", metavar=meta.get("metavar"), **kwargs)
            continue
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        if kind is bool:
            kwargs["action"] = "store_false" if meta.get("negate") else "store_true"
            group.add_argument(flag, dest=f.name, **kwargs)
            continue
        kwargs["type"] = partial(_as_argparse_type, parse=_parser(f, kind))
        kwargs["metavar"] = meta.get("metavar") or ("{" + ",".join(meta["choices"]) + "}"
                                                    if "choices" in meta else None)
        if meta.get("append"):
            kwargs["action"] = "append"
        group.add_argument(flag, dest=f.name, **kwargs)


def read_options(cls: type, args: argparse.Namespace, config: dict[str, Any] | None = None) -> Any:
    """An instance of ``cls``: defaults, then ``config`` (parsed like the flags), then the flags given.

    Every value is checked by the field's parser and the class's ``validate()``; a wrong value is a
    UserError naming the key.
    """
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in vars(args):
            values[f.name] = getattr(args, f.name)
        elif config and f.name in config:
            values[f.name] = _from_yaml(f, _base_type(hints[f.name]), config[f.name])
    instance = cls(**values)
    if hasattr(instance, "validate"):
        instance.validate()
    return instance


def load_config(path: str) -> dict[str, Any]:
    """A ``--config`` YAML file as {option name: raw value}; keys may use '-' or '_'."""
    import yaml

    try:
        data = yaml.safe_load(open(path, encoding="utf-8").read())  # noqa: SIM115
    except OSError as exc:
        raise UserError(f"{path}: cannot read config file: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: invalid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of option: value, got {type(data).__name__}")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def check_config_keys(path: str, config: dict[str, Any], *classes: type) -> None:
    known = {f.name for cls in classes for f in dataclasses.fields(cls)}
    unknown = sorted(set(config) - known)
    if unknown:
        raise UserError(
            f"{path}: unknown option(s) {', '.join(unknown)}; expected some of: {', '.join(sorted(known))}"
        )


def _base_type(hint: Any) -> Any:
    """int for ``int | None``; list for ``list[str]``; the hint itself otherwise."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if type(None) in typing.get_args(hint) and len(args) == 1:
        hint = args[0]
    return typing.get_origin(hint) or hint


def _parser(f: dataclasses.Field, kind: Any) -> Callable[[str], Any]:
    """The text -> value function of a field: its own ``parse``, else by type, with choices."""
    parse = f.metadata.get("parse") or {int: _number(int), float: _number(float)}.get(kind, str)
    choices = f.metadata.get("choices")
    if not choices:
        return parse

    def choose(text: str) -> Any:
        value = parse(text)
        if value not in choices:
            raise ValueError(f"{value!r} is not one of {', '.join(map(str, choices))}")
        return value

    return choose


def _number(kind: type) -> Callable[[str], Any]:
    """int or float of a text, with an error that says what was expected."""

    what = "an integer" if kind is int else "a number"

    def parse(text: str) -> Any:
        try:
            return kind(text)
        except ValueError:
            raise ValueError(f"expected {what}, got {text!r}") from None

    return parse


def non_negative(kind: type, what: str) -> Callable[[str], Any]:
    """An argparse type: an int or float (``kind``) >= 0, else "expected WHAT >= 0, got 'TEXT'"."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = -1
        if not value >= 0:  # NaN too
            raise argparse.ArgumentTypeError(f"expected {what} >= 0, got {text!r}")
        return value

    return parse


def _as_argparse_type(text: str, parse: Callable[[str], Any]) -> Any:
    try:
        return parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(_expected(exc, text)) from None


def _expected(exc: ValueError, text: str) -> str:
    message = str(exc)
    return message if message.startswith(("expected", "'")) or " is not one of " in message else (
        f"expected {message}" if message else f"invalid value {text!r}")


def _from_yaml(f: dataclasses.Field, kind: Any, value: Any) -> Any:
    """A YAML value through the flag's own parser: scalars as their text, lists joined by commas,
    mappings of repeatable options as NAME=VALUE items."""
    if value is None:
        return f.default if f.default is not dataclasses.MISSING else f.default_factory()
    try:
        if kind is bool:
            if not isinstance(value, bool):
                raise ValueError(f"expected true or false, got {value!r}")
            return value
        if f.metadata.get("positional"):
            return [str(v) for v in (value if isinstance(value, list) else [value])]
        parse = _parser(f, kind)
        if f.metadata.get("append"):
            items = value if isinstance(value, list) else [value]
            if isinstance(value, dict):
                items = [f"{k}={_joined(v)}" for k, v in value.items()]
            return [parse(str(item)) for item in items]
        if isinstance(value, dict) or (isinstance(value, bool) and kind is not str):
            raise ValueError(f"expected a {getattr(kind, '__name__', kind)}, got {value!r}")
        return parse(_joined(value))
    except ValueError as exc:
        raise UserError(f"{f.name}: {_expected(exc, str(value))}") from None


def _joined(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def _help(f: dataclasses.Field) -> str:
    text = f.metadata.get("help", "")
    default = f.default if f.default is not dataclasses.MISSING else None
    if default not in (None, False, True, "") and "(default" not in text and not text.endswith(")"):
        text += f" (default: {default})"
    return text.replace("%", "%%")
