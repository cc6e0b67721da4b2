"""The `sculpt` command: the parser of every command, and the error contract.

Errors a user can cause print one line (``sculpt: error: ...``) naming the file, pass, option or
input at fault, exit with status 2, and write nothing; a bug in sculpt prints one line too and exits
with status 3 (``SCULPT_DEBUG=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Sequence

from sculpt import __version__
from sculpt.cli.demo_command import register_demo
from sculpt.cli.inspect_commands import register_inspect, register_passes
from sculpt.cli.optimize_command import register_optimize
from sculpt.cli.run_commands import register_compare, register_run
from sculpt.cli.tvm_commands import register_tvm_commands
from sculpt.common import one_line
from sculpt.common.messages import LINE_LIMIT
from sculpt.errors import OptionError, SculptError, SculptWarning

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 3


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a usage error raised as an OptionError (one line, no usage dump)."""

    def error(self, message: str):
        raise OptionError(message if self.prog == "sculpt" else f"{self.prog}: {message}")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="sculpt", description="Model-compression compiler for ONNX models.")
    p.add_argument("--version", action="version", version=f"sculpt {__version__}")
    sub = p.add_subparsers(dest="command", parser_class=ArgumentParser)
    register_inspect(sub)
    register_run(sub)
    register_passes(sub)
    register_compare(sub)
    register_optimize(sub)
    register_demo(sub)
    register_tvm_commands(sub)  # targets, compile, verify, bench: TVM itself loads only when one runs
    return p


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning sculpt gives (a dropped declaration, a GPU schedule fallback) as one line on stderr;
    other libraries' warnings as Python shows them."""
    if issubclass(category, SculptWarning):
        print(f"sculpt: warning: {one_line(message, LINE_LIMIT)}", file=sys.stderr)
    else:
        _show_warning(message, category, filename, lineno, file, line)


_show_warning = warnings.showwarning


def main(argv: Sequence[str] | None = None) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("always", SculptWarning)
        warnings.showwarning = _one_line_warning
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            parser.print_help()
            return EXIT_USER_ERROR
        return int(args.func(args) or 0)
    except SculptError as e:
        print(f"sculpt: error: {one_line(e, LINE_LIMIT)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as e:  # a file the user named cannot be read or written (permissions, disk full)
        if os.environ.get("SCULPT_DEBUG"):
            raise
        where = f"{e.filename}: " if e.filename else ""
        print(f"sculpt: error: {where}{one_line(e.strerror or e, LINE_LIMIT)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("sculpt: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug in sculpt: one line, the traceback on request
        if os.environ.get("SCULPT_DEBUG"):
            raise
        print(f"sculpt: internal error: {type(e).__name__}: {one_line(e, LINE_LIMIT)} (set SCULPT_DEBUG=1 for the "
              "traceback)", file=sys.stderr)
        return EXIT_INTERNAL_ERROR
