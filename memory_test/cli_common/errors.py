"""One-line errors for every tool: ``<tool>: error: <what> — <what to do>``, an exit code, no traceback.

``MEMORY_TEST_DEBUG=1`` (honoured by every tool, and inherited by the processes a sweep starts) re-raises instead,
so the traceback is there when someone needs it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

DEBUG_ENV = "MEMORY_TEST_DEBUG"
EXIT_FAILED = 1  # the tool itself failed (a bug, or a fault outside the user's input)
EXIT_BAD_INPUT = 2  # bad input: nothing was done (argparse uses 2 as well)
EXIT_INTERRUPTED = 130  # Ctrl-C or SIGTERM


class ToolError(Exception):
    """Bad input (or a refused action) a tool reports in one line: what is wrong, and what to do about it."""

    def __init__(self, what: str, fix: str | None = None, exit_code: int = EXIT_BAD_INPUT):
        super().__init__(what if fix is None else f"{what} — {fix}")
        self.what, self.fix, self.exit_code = what, fix, exit_code


def debug_enabled() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def error_line(tool: str, what: str, fix: str | None = None) -> str:
    """``<tool>: error: <what> — <fix>`` on one line (library messages may span lines: they are joined)."""
    text = " ".join(str(what).split())
    return f"{tool}: error: {text}" + (f" — {' '.join(fix.split())}" if fix else "")


class ToolArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line in the shared format (no usage block), exit code 2. Flags are never
    abbreviated: the sweep would take single_experiment's ``--output x.json`` as ``--output-dir x.json``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        if not self.exit_on_error:  # a caller validating flags for another tool (the sweep) reports it itself
            raise ToolError(message, f"see `{self.prog} --help`")
        self.exit(EXIT_BAD_INPUT, error_line(self.prog, message, f"see `{self.prog} --help`") + "\n")


def run_tool(tool: str, body: Callable[[], int | None], bad_input: tuple[type[BaseException], ...] = ()) -> int:
    """Run a tool's work and return its exit code; errors become one line on stderr.

    ``ToolError`` gives its own code; exceptions of ``bad_input`` (library errors whose messages already say what to
    change) give 2; Ctrl-C/SIGTERM gives 130; anything else is unexpected: 1, with how to see the traceback.
    """
    try:
        return body() or 0
    except ToolError as e:
        return _report(tool, e, e.what, e.fix, e.exit_code)
    except bad_input as e:
        return _report(tool, e, str(e) or type(e).__name__, None, EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        print(f"{tool}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        fix = f"this is unexpected: rerun with {DEBUG_ENV}=1 to see the traceback, and report it"
        return _report(tool, e, f"{type(e).__name__}: {e}", fix, EXIT_FAILED)


def _report(tool: str, exc: BaseException, what: str, fix: str | None, code: int) -> int:
    if debug_enabled():
        raise exc
    print(error_line(tool, what, fix), file=sys.stderr)
    return code
