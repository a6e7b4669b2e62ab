"""Options of the training scripts: one dataclass per script, read by transformers' `HfArgumentParser`.

Every field is an option, `--name` or `--name-with-hyphens`, whose help and default `--help` lists (`HfArg(default=...,
help=...)`). `--config FILE.yaml` sets any of them and the command line wins: the file's values become the parser's
defaults before the command line is parsed. Also, as the recipes and configs of this repository use them:

- `name=value` is `--name=value` (overrides of a config, `order=random`);
- `null` or `none` is None for an option that may be None (`--log_with null`);
- a mapping (`text_config`) is written in YAML on the command line (`--text_config "{d_model: 64}"`).

The options shared by the scripts have one spelling each, the diffusers training examples' (`--output_dir`,
`--train_batch_size`, `--max_train_steps`, `--learning_rate`, ...); an old spelling is refused with the new one.
A bad option raises `UsageError`, one line naming it (exit status 2 under `run_script`); an unreadable `--config`
file raises `CommandError` (exit status 1).
"""

import argparse
import dataclasses
import difflib
import os
import re
import sys
import typing

import yaml
from transformers import HfArgumentParser

from progressive_denoising.commands.base import DEBUG_ENV, CommandError, UsageError, as_usage_error
from progressive_denoising.files import check_creatable_folder, check_local_or_hub

# Old spellings of options the scripts share -> their names now. Each script refuses these unless it has an option
# of that name; a script passes its own old spellings on top (`parse_options(..., renamed=...)`).
RENAMED = {"output": "output_dir", "out": "output_dir", "data": "dataset", "steps": "max_train_steps",
           "max_steps": "max_train_steps", "lr": "learning_rate", "batch_size": "train_batch_size"}
# `name=value` on the command line (the name as a field's, hyphens allowed).
ASSIGNMENT = re.compile(r"([A-Za-z_][\w-]*)=(.*)", re.DOTALL)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every option with its default; the script's docstring as it is written."""


def _or_none(kind):
    """An argparse type: `kind` of the text, or None for "null" / "none" (YAML's spellings of None)."""

    def convert(text):
        return None if text.lower() in ("null", "none") else kind(text)

    convert.__name__ = getattr(kind, "__name__", "value")  # argparse names the type in its errors
    return convert


def _may_be_none(hint):
    return typing.get_origin(hint) is typing.Union and type(None) in typing.get_args(hint)


class OptionParser(HfArgumentParser):
    """`HfArgumentParser` of one options dataclass, with the rules of the module docstring: an error raises
    `UsageError` instead of printing the usage and exiting, `null` is None where None is allowed."""

    def __init__(self, cls, prog):
        self.nullable = {name for name, hint in typing.get_type_hints(cls).items() if _may_be_none(hint)}
        description = (getattr(sys.modules.get(cls.__module__), "__doc__", None) or "").strip()
        super().__init__(cls, prog=prog, description=description, allow_abbrev=False, formatter_class=_HelpFormatter,
                         usage="%(prog)s [--config FILE.yaml] [--option value | option=value ...] [--debug]")
        self.add_argument("--config", metavar="FILE.yaml", help="options from a YAML file (the command line wins)")
        self.add_argument("--debug", action="store_true",
                          help=f"show the traceback of an error (also: environment variable {DEBUG_ENV}=1)")

    def add_argument(self, *names, **kwargs):
        if names and names[0].lstrip("-") in self.nullable and callable(kwargs.get("type")) and "nargs" not in kwargs:
            kwargs["type"] = _or_none(kwargs["type"])
        return super().add_argument(*names, **kwargs)

    def error(self, message):
        raise UsageError(None, message)


def _unknown(name, fields, renamed, config=None):
    """UsageError for an option that `fields` lack (on the command line, or in the YAML file `config`): its new name
    if it was renamed, else the closest names."""
    where = f" in {config}" if config else ""
    if name in renamed:
        old, new = (repr(name), repr(renamed[name])) if config else (f"--{name}", f"--{renamed[name]}")
        return UsageError(None, f"option {old}{where} is now {new}")
    close = difflib.get_close_matches(name, fields, n=3)
    known = f"did you mean {' or '.join(map(repr, close))}?" if close else f"known: {', '.join(sorted(fields))}"
    return UsageError(None, f"unknown option {name!r}{where}; {known}")


def read_config(path):
    """The mapping of options in the YAML file `path`."""
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


def _option_name(arg):
    """The option `arg` sets, underscored ('--batch-size=8', 'batch-size=8' -> 'batch_size'); None if none."""
    if arg.startswith("--") and len(arg) > 2:
        return arg[2:].partition("=")[0].replace("-", "_")
    match = ASSIGNMENT.fullmatch(arg)
    return match.group(1).replace("-", "_") if match else None


def _command_line(argv, names):
    """`argv` with `name=value` written `--name=value` where `name` is one of `names` (elsewhere it may be a value:
    `--hub_model_id a=b`)."""
    return [f"--{arg}" if not arg.startswith("-") and _option_name(arg) in names else arg for arg in argv]


def _split_config(argv):
    """(the path of `--config PATH` or `--config=PATH`, or None; the other arguments)."""
    rest, config, position = [], None, 0
    while position < len(argv):
        name, equals, value = argv[position].partition("=")
        if name != "--config":
            rest.append(argv[position])
        elif equals:
            config = value
        elif position + 1 < len(argv):
            config, position = argv[position + 1], position + 1
        else:
            raise UsageError("--config", "expected a YAML file")
        position += 1
    return config, rest


def _config_defaults(path, fields, renamed):
    """The options of the YAML file `path`, every key checked against `fields`."""
    values = read_config(path)
    for key in values:
        if key not in fields:
            raise _unknown(key, fields, renamed, config=path)
    return values


def _refuse_leftovers(leftovers, fields, renamed):
    """UsageError for the first argument the parser did not take: an unknown option, or no option at all."""
    if leftovers:
        name = _option_name(leftovers[0])
        if name is None:
            raise UsageError(None, f"cannot read command-line argument {leftovers[0]!r}: use --option value or "
                                   "option=value")
        raise _unknown(name, fields, renamed)


def _value_type(hint):
    """The type a value of an option of type hint `hint` has: Optional[X] -> X, Union[dict, str] -> dict (a
    mapping, written in YAML on the command line), List[int] -> list."""
    if typing.get_origin(hint) is typing.Union:
        kinds = [kind for kind in typing.get_args(hint) if kind is not type(None)]
        hint = dict if dict in kinds else kinds[0]
    return typing.get_origin(hint) or hint


def _coerce(name, kind, value):
    """`value` (from YAML, or as argparse read it) as `kind`, or a ValueError naming the option."""
    if value is None:
        return None
    if kind is dict and isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as error:
            raise ValueError(f"option {name!r}: cannot read {value!r} as a YAML mapping") from error
    if kind is float and isinstance(value, str):  # YAML 1.1 reads "3e-3" as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or (kind in (int, float) and isinstance(value, bool)):
        raise ValueError(f"option {name!r} must be of type {kind.__name__}, got {value!r}")
    return value


def _typed(options):
    """`options` with every value of its type (argparse converts command-line text, YAML values come as written)."""
    hints = typing.get_type_hints(type(options))
    for field in dataclasses.fields(options):
        setattr(options, field.name, _coerce(field.name, _value_type(hints[field.name]), getattr(options, field.name)))
    return options


def script_name(cls):
    """The file name of the script whose options are `cls` (for `--help`), also when it runs as `__main__`."""
    path = getattr(sys.modules.get(cls.__module__), "__file__", None)
    return os.path.basename(path) if path else cls.__module__.rpartition(".")[2] + ".py"


def parse_options(cls, argv=None, check=None, renamed=RENAMED):
    """An instance of the dataclass `cls` from `--config FILE.yaml` and the command line `argv` (see the module
    docstring); `--help` prints every option and exits.

    A bad option raises `UsageError`, and so does a `ValueError` of `check(options)`, the script's own checks, run
    here when given. `renamed` maps old option names to new ones.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    fields = [field.name for field in dataclasses.fields(cls)]
    renamed = {old: new for old, new in renamed.items() if old not in fields}
    config, argv = _split_config(_command_line(argv, {*fields, *renamed, "config"}))
    for name in [_option_name(arg) for arg in argv if arg.startswith("--")]:
        if name in renamed:  # before parsing: argparse would take an old flag's value for an unknown argument
            raise _unknown(name, fields, renamed)
    parser = OptionParser(cls, script_name(cls))
    if config is not None:
        parser.set_defaults(**_config_defaults(config, fields, renamed))
    *parsed, leftovers = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True,
                                                            look_for_args_file=False)
    _refuse_leftovers(leftovers, fields, renamed)
    try:
        options = _typed(parsed[0])
        if check is not None:
            check(options)
    except (UsageError, CommandError):
        raise
    except ValueError as error:
        raise (as_usage_error(error) or UsageError(None, str(error))) from error
    return options


def check_paths(options, inputs=(), outputs=()):
    """An error naming the option unless the `inputs` options that are set name existing paths (or could be Hub ids)
    and the `outputs` options name folders that exist or can be made: checked before anything is loaded."""
    for name in inputs:
        value = getattr(options, name)
        if value is not None:
            check_local_or_hub(f"--{name}", value)
    for name in outputs:
        check_creatable_folder(f"--{name}", getattr(options, name))


def check_required(options, *names):
    for name in names:
        if getattr(options, name) is None:
            raise ValueError(f"option {name!r} is required")


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"option {name!r} must be one of {tuple(choices)}, got {value!r}")


def check_range(name, value, low, high):
    if value is None or not low <= value <= high:
        raise ValueError(f"option {name!r} must be in [{low}, {high}], got {value!r}")


def check_positive(options, *names):
    """Each of the options `names` that is set is an integer >= 1."""
    for name in names:
        value = getattr(options, name)
        if value is not None and value < 1:
            raise ValueError(f"option {name!r} must be a positive integer, got {value!r}")
