"""Options of the training scripts: a dataclass filled from a YAML file, then from `--key value` / `key=value` on the
command line, with checks that name the option."""

import dataclasses
import difflib
import inspect
import os
import re
import sys
import typing

import yaml

from progressive_denoising.commands.base import CommandError, UsageError
from progressive_denoising.commands.files import check_creatable_folder, check_local_or_hub


def _field_type(field):
    """The type a value of `field` must have; Optional[X] -> X."""
    kind = field.type
    if typing.get_origin(kind) is typing.Union:
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    return typing.get_origin(kind) or kind


def _coerce(name, kind, value):
    """`value` (from YAML or parsed from a command-line string) as `kind`, or a ValueError naming the option."""
    if value is None:
        return None
    if kind is float and isinstance(value, str):  # YAML 1.1 reads "3e-3" as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"option {name!r} must be of type {kind.__name__}, got {value!r}")
    return value


def _parse_cli_value(kind, text):
    # Strings stay verbatim (a Hub id like "user/1e5" is not a number); everything else reads as YAML.
    if kind is str:
        return None if text.lower() in ("null", "none") else text
    return yaml.safe_load(text)


def _split_cli(argv):
    """['--a', '1', 'b=2', '--c=3', '--flag'] -> {'a': '1', 'b': '2', 'c': '3', 'flag': 'true'}."""
    pairs, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        key = arg[2:] if arg.startswith("--") else arg
        if "=" in key:
            key, value = key.split("=", 1)
        elif not arg.startswith("--"):
            raise ValueError(f"cannot read command-line argument {arg!r}: use --key value or key=value")
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value, i = argv[i + 1], i + 1
        else:
            value = "true"  # a bare --flag
        pairs[key.replace("-", "_")] = value
        i += 1
    return pairs


def _field_comments(cls):
    """{field name: the comment written beside it in the dataclass's source}, for `--help`."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        match = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)", line)
        if match:
            comments[match.group(1)] = match.group(2).strip()
    return comments


def options_help(cls):
    """The `--help` text of a script whose options are the dataclass `cls`: its docstring, then every option."""
    script = os.path.basename(sys.argv[0]) or "script"
    description = (sys.modules[cls.__module__].__doc__ or "").strip()
    lines = [f"usage: {script} [--config FILE.yaml] [--option value | option=value ...] [--debug]", "", description,
             "", "options (hyphen or underscore spelling; a YAML --config sets any of them, the command line wins):",
             "  --config FILE.yaml  options from a YAML file", "  --debug  show the traceback of an error"]
    comments = _field_comments(cls)
    for field in dataclasses.fields(cls):
        default = field.default if field.default is not dataclasses.MISSING else None
        note = f"  {comments[field.name]}" if field.name in comments else ""
        lines.append(f"  --{field.name.replace('_', '-')} {_field_type(field).__name__} (default {default!r}){note}")
    return "\n".join(lines)


def parse_options(cls, argv=None, check=None):
    """An instance of the dataclass `cls` from `--config FILE.yaml` and command-line overrides.

    `--help` prints the options and exits. A bad option raises `UsageError` (a `ValueError` naming it), and so does
    a `ValueError` of `check(options)`, the script's own checks, run here when given.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help" in argv or "-h" in argv:
        print(options_help(cls))
        raise SystemExit(0)
    try:
        options = _options_from(cls, argv)
        if check is not None:
            check(options)
    except (UsageError, CommandError):
        raise
    except ValueError as error:
        raise UsageError(None, str(error)) from error
    return options


def _read_config(path):
    if not os.path.isfile(path):
        raise UsageError("--config", f"no such file: {path}")
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except yaml.YAMLError as error:
        raise CommandError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from error
    if not isinstance(values, dict):
        raise CommandError(f"{path}: expected a mapping of options, got {type(values).__name__}")
    return values


def _options_from(cls, argv):
    cli = _split_cli(argv)
    values = _read_config(cli.pop("config")) if "config" in cli else {}
    fields = {field.name: field for field in dataclasses.fields(cls)}
    for key in list(values) + list(cli):
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=3)
            known = f"did you mean {' or '.join(map(repr, close))}?" if close else f"known: {', '.join(sorted(fields))}"
            raise ValueError(f"unknown option {key!r}; {known}")
    for key, text in cli.items():
        try:
            values[key] = _parse_cli_value(_field_type(fields[key]), text)
        except yaml.YAMLError as error:
            raise ValueError(f"option {key!r}: cannot read {text!r}") from error
    return cls(**{key: _coerce(key, _field_type(fields[key]), value) for key, value in values.items()})


def check_paths(options, inputs=(), outputs=()):
    """UsageError unless the `inputs` options that are set name existing paths (or could be Hub ids) and the
    `outputs` options name folders that exist or can be made: checked before anything is loaded."""
    for name in inputs:
        value = getattr(options, name)
        if value is not None:
            check_local_or_hub(f"--{name.replace('_', '-')}", value)
    for name in outputs:
        check_creatable_folder(f"--{name.replace('_', '-')}", getattr(options, name))


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"option {name!r} must be one of {tuple(choices)}, got {value!r}")


def check_range(name, value, low, high):
    if value is None or not low <= value <= high:
        raise ValueError(f"option {name!r} must be in [{low}, {high}], got {value!r}")
