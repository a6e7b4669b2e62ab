"""What every `pdm` sub-command and training script shares: one flag style, one-line errors, exit statuses.

- Flags are spelled with hyphens (`--batch-size`); the underscore spelling (`--batch_size`) is accepted too (the
  training scripts, whose options `transformers.HfArgumentParser` reads, list the underscore spelling).
- A usage error (a bad argument) prints one line, `prog: error: argument --flag: ...`, and exits with status 2, as
  argparse does (without the usage block argparse prints first: `--help` shows it). A `UsageError` is one, and so is
  the package's `ArgumentError` when it names a flag: the path checks of `progressive_denoising.files` are given the
  flag they check (`--output`), library code names its parameters (`num_stages`; see `usage_errors`).
- A runtime error (a missing or corrupt file, a failure while working) prints one line naming the file and exits
  with status 1.
- `--debug`, or the environment variable `PDM_DEBUG=1`, re-raises the error instead, with its traceback.

Only the standard library (and the package's standard-library modules) is imported here: `pdm <command> --help`
answers without torch.
"""

import argparse
import contextlib
import logging
import os
import sys
import warnings

from ..errors import ArgumentError

DEBUG_ENV = "PDM_DEBUG"
# Largest seed that `torch.Generator.manual_seed` and numpy take without overflowing (a signed 64-bit integer).
MAX_SEED = 2**63 - 1


class UsageError(ValueError):
    """A bad command-line argument: exit status 2. The message starts with the argument, as argparse's do."""

    def __init__(self, argument, message):
        self.argument = argument
        super().__init__(f"argument {argument}: {message}" if argument else message)


class CommandError(RuntimeError):
    """A failure that is not a typing mistake, e.g. a missing component or a corrupt file (named in the message):
    exit status 1."""


def hyphenate(flag: str) -> str:
    """`--batch_size` -> `--batch-size`; `--key=va_lue` keeps its value."""
    name, sep, value = flag.partition("=")
    return name.replace("_", "-") + sep + value


def normalize_flags(argv):
    """Every long flag in its hyphen spelling; arguments after a bare `--` are left alone (they are values)."""
    normalized = []
    for position, arg in enumerate(argv):
        if arg == "--":
            return normalized + list(argv[position:])
        normalized.append(hyphenate(arg) if arg.startswith("--") else arg)
    return normalized


def debug_requested(argv=()) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")


class ArgumentParser(argparse.ArgumentParser):
    """`argparse.ArgumentParser` with the conventions above, and `--debug` on every command."""

    def __init__(self, *args, **kwargs):
        # Abbreviations would make a later flag that shares a prefix change what an old command line means.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true",
                          help=f"show the traceback of an error (also: environment variable {DEBUG_ENV}=1)")

    def add_argument(self, *names, **kwargs):
        return super().add_argument(*(hyphenate(n) if n.startswith("--") else n for n in names), **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else args
        return super().parse_known_args(normalize_flags(args), namespace)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def as_usage_error(error: BaseException):
    """`error` as a `UsageError` if it is one (see the module docstring), else None."""
    if isinstance(error, UsageError):
        return error
    argument = getattr(error, "argument", None)
    if isinstance(error, ArgumentError) and isinstance(argument, str) and argument.startswith("--"):
        return UsageError(argument, str(error))
    return None


def error_line(prog: str, error: BaseException) -> str:
    """The one line printed for `error`; errors this package did not word itself keep their type for context."""
    usage = as_usage_error(error)
    if usage is not None:
        return f"{prog}: error: {first_line(usage)} (see {prog} --help)"
    if isinstance(error, CommandError):
        return f"{prog}: error: {first_line(error)}"
    hint = f" (run with --debug or {DEBUG_ENV}=1 for the traceback)"
    return f"{prog}: error: {type(error).__name__}: {first_line(error)}{hint}"


def exit_status(error: BaseException) -> int:
    return 2 if as_usage_error(error) is not None else 1


@contextlib.contextmanager
def usage_errors(flags):
    """Turn a library's error about one of its arguments into a `UsageError` naming the command's flag.

    `flags` maps argument names to flags ({"num_stages": "--steps"}); the package's argument errors carry the name as
    data (`ArgumentError.argument`), so a reworded message still blames the right flag. Other errors pass.
    """
    try:
        yield
    except ValueError as error:
        argument = getattr(error, "argument", None)
        if isinstance(error, UsageError) or argument not in flags:
            raise
        raise UsageError(flags[argument], str(error)) from error


def _one_line_warning(prog):
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{prog}: warning: {message}", file=sys.stderr if file is None else file)

    return show


@contextlib.contextmanager
def one_line_warnings(prog):
    """Python warnings as `prog: warning: message`, without the source line that `warnings` prints."""
    original = warnings.showwarning
    warnings.showwarning = _one_line_warning(prog)
    try:
        yield
    finally:
        warnings.showwarning = original


class _LineFormatter(logging.Formatter):
    def __init__(self, prog):
        super().__init__()
        self.prog = prog

    def format(self, record):
        return f"{self.prog}: {record.levelname.lower()}: {record.getMessage()}"


@contextlib.contextmanager
def package_log_lines(prog):
    """What the package logs at warning level or above (an unknown word, a cut prompt) as `prog: warning: ...`."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(_LineFormatter(prog))
    logger = logging.getLogger(__name__.partition(".")[0])
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def _report_errors(prog, debug, call):
    """`call()`'s result; its errors printed as one line with `SystemExit(1 or 2)`, or re-raised when `debug`."""
    with one_line_warnings(prog), package_log_lines(prog):
        try:
            return call()
        except KeyboardInterrupt:
            if debug:
                raise
            print(f"{prog}: interrupted", file=sys.stderr)
            raise SystemExit(130)
        except Exception as error:
            if debug:
                raise
            print(error_line(prog, error), file=sys.stderr)
            raise SystemExit(exit_status(error))


def run_command(parser, run, argv=None):
    """Parse `argv` with `parser`, call `run(args)` and return its exit status (0 when it returns None).

    Errors print one line and raise `SystemExit` with status 2 (usage) or 1 (runtime), as `parser.error` does, so
    that `pdm`, `python -m ...` and code calling `main(argv)` behave alike; `--debug` re-raises them instead.
    """
    args = parser.parse_args(argv)
    return _report_errors(parser.prog, args.debug or debug_requested(), lambda: run(args) or 0)


def run_script(main, prog, argv=None):
    """`main(argv)` of a script that parses its own options (the training scripts), with errors reported as
    `run_command` reports them; `--debug` is taken out of `argv` here."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    argv = [arg for arg in argv if arg != "--debug"]
    _report_errors(prog, debug, lambda: main(argv))
    return 0


def check_seed(argument, seed, count=1):
    """UsageError unless seeds `seed .. seed + count - 1` all lie in 0..2^63-1."""
    if not 0 <= seed <= MAX_SEED - (count - 1):
        detail = f" (seeds {seed}.. for {count} images)" if count > 1 else ""
        raise UsageError(argument, f"must be in 0..{MAX_SEED - (count - 1)}, got {seed}{detail}")


def _int_at_least(text, low, what):
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < low:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text):
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text):
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0, "an integer >= 0")
