"""How every ``sfvideo`` command reports a user's error: one line, and one exit-status rule.

The rule (``docs/training.md``, "Exit status"):

- **0**: done;
- **2**: a usage or input error a user can fix (a bad flag or value, a missing or unreadable file, pieces that do
  not fit): one line on stderr, ``sfvideo <command>: error: <what>``, naming the flag or file; nothing is left
  half-written;
- **130**: interrupted (Ctrl-C): what was finished is kept (``generate`` finalises the frames done);
- **1**: anything else is a bug: a traceback.

Inside the process an error is ``SystemExit("sfvideo <command>: error: ...")`` (what :func:`fail` raises and what
the parsers below raise), so a caller of a command's ``main(argv)`` (the tests) sees the message; the ``sfvideo``
console script prints it and exits 2 (``sfvideo.cli.main``).

Bottom layer: imports nothing from sfvideo.
"""

from __future__ import annotations

import argparse
import re
from typing import Any, NoReturn

__all__ = ["EXIT_INTERRUPTED", "EXIT_USAGE", "ArgParser", "OneLineErrors", "fail", "json_parser", "nested_error_line",
           "one_line"]

EXIT_USAGE = 2
"""Exit status of a usage or input error."""
EXIT_INTERRUPTED = 130
"""Exit status after Ctrl-C (128 + SIGINT)."""

MAX_CHARS = 300
"""Longest error line; longer values (an overlong prompt, a long list) are cut with an ellipsis."""


def one_line(message: Any, limit: int = MAX_CHARS) -> str:
    """The first non-empty line of ``message``, cut to ``limit`` characters."""
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    line = lines[0] if lines else "error"
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


def clip(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters, for echoing a user's value in an error."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def nested_error_line(message: str) -> str:
    """The one line of a jsonargparse error. A failing subclass or a bad key is reported as "Does not validate
    against any of the Union subtypes" with the real reason among the listed errors; that reason is the line,
    with the key and the class it belongs to."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if not lines:
        return "error"
    if not any("Does not validate against any of the Union subtypes" in ln for ln in lines):
        return one_line(lines[0])
    key = re.match(r'Parser key "([^"]+)"', lines[0])
    where, cls = (key.group(1) if key else None), None
    structural = ("Parser key", "Does not validate", "Subtypes:", "Errors:", "Given value", "Expected a <class")
    for i, line in enumerate(lines):
        text = line[2:] if line.startswith("- ") else line
        problem = re.match(r"Problem with given class_path '([^']+)'", text)
        if problem:
            cls = problem.group(1)
            continue
        if text.startswith(structural):
            continue
        option = re.match(r"Option '([^']+)' is not accepted", text) or re.match(r'Key "([^"]+)" is not expected',
                                                                                text)
        if option and where and cls:
            return one_line(f"--{where}.init_args.{option.group(1)}: not an option of {cls}")
        # The class whose constructor failed, and a path among its arguments: the value given is listed after
        # the errors ("Given value: Namespace(class_path='...', init_args=Namespace(path='...', ...))").
        given = next((ln for ln in lines[i + 1 :] if ln.startswith("Given value: Namespace(class_path=")), "")
        failed = re.match(r"Given value: Namespace\(class_path='([^']+)'", given)
        paths = re.findall(r"(\w+)='([^']*/[^']*)'", given)
        label = failed.group(1) if failed and failed.group(1) != cls else cls
        if label:
            text = f"{label}{f' ({paths[0][0]}={paths[0][1]})' if paths else ''}: {text}"
        return one_line(f"{where}: {text}" if where and not text.startswith(where) else text)
    return one_line(lines[0])


def fail(prog: str, message: Any) -> NoReturn:
    """Raise the one-line error of command ``prog`` (exit status 2 from the ``sfvideo`` command)."""
    raise SystemExit(f"{prog}: error: {one_line(message)}")


class OneLineErrors:
    """Parser mix-in: a parse error is one line (no usage dump) and prefix abbreviations are off.

    With argparse's ``allow_abbrev`` a typo such as ``--num_frame`` silently means ``--num_frames``; here every
    option must be spelled out. A parser built with ``exit_on_error=False`` (jsonargparse's inner parsers) keeps
    raising its ``ArgumentError``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)

    def one_line_error(self, message: str) -> str:
        """The line printed for a parse error (jsonargparse's nested messages reduced to their reason)."""
        return nested_error_line(message)

    def error(self, message: str, *args: Any, **kwargs: Any) -> NoReturn:  # noqa: D102
        if not getattr(self, "exit_on_error", True):
            super().error(message, *args, **kwargs)  # type: ignore[misc]
        ex = args[0] if args else kwargs.get("ex")
        parser = getattr(ex, "subcommand_parser", None) or self
        prog = str(getattr(parser, "prog", "sfvideo")).replace(" [options]", "")
        raise SystemExit(f"{prog}: error: {self.one_line_error(message)} (see {prog} --help)")


class ArgParser(OneLineErrors, argparse.ArgumentParser):
    """``argparse.ArgumentParser`` of the plain-argparse commands (export, memory, bench, ...): one-line errors,
    no abbreviations."""


_JSON_PARSER: type | None = None


def json_parser(**kwargs: Any) -> Any:
    """A ``jsonargparse.ArgumentParser`` (the commands with typed flags: generate, serve, evaluate, ode-pairs) with
    one-line errors and no abbreviations."""
    global _JSON_PARSER
    if _JSON_PARSER is None:
        from jsonargparse import ArgumentParser

        _JSON_PARSER = type("JsonArgParser", (OneLineErrors, ArgumentParser), {})
    return _JSON_PARSER(**kwargs)
