"""The command-line conventions every recipec command shares, public so that the runtime's commands
(`recipec convert`, runtime/hf/cli.py) use the same ones without importing compiler/cli.py.

One boundary (`user_errors`): anything a user or a file can cause is one `recipec: error:` line and
exit 2; `overrides` and `files` are the KEY=VALUE arguments and `-f FILE` overlays of every command.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import click

from .errors import RecipeError
from .text import shown

__all__ = ["USER_ERROR", "fail", "files", "overrides", "user_errors"]

USER_ERROR = 2


def user_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """The CLI's one boundary: anything a user or a file can cause ends in one `recipec: error:`
    message and exit 2. RecipeError carries file, line, key and hint; the file-caused exceptions
    below are a last resort for what no check foresaw (a directory vanishing mid-build, a full
    disk). Everything else is a bug in recipec and keeps its traceback."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except RecipeError as exc:
            fail(str(exc))
        except BrokenPipeError:
            _quiet_broken_pipe()
        except OSError as exc:
            fail(_os_message(exc))
        except UnicodeError as exc:
            fail(f"text that is not valid UTF-8 ({exc.reason})",
                  "file names, recipes and overrides are UTF-8 text")
        except RecursionError:
            fail("input nested too deeply to read", "a recipe nests a few tables deep; flatten the data")

    return wrapper


def _quiet_broken_pipe() -> NoReturn:
    """`recipec schema | head` closed our stdout: that is the reader's choice, not an error.
    Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(0)


def fail(message: str, hint: str | None = None) -> NoReturn:
    text = f"recipec: error: {message}" + (f"\n   hint: {hint}" if hint else "")
    # Arguments that are not UTF-8 arrive as surrogates; print them escaped rather than fail again.
    click.echo(text.encode("utf-8", "backslashreplace").decode("utf-8"), err=True)
    sys.exit(USER_ERROR)


_OS_HINTS = {
    errno.EEXIST: "a file is in the way: -o names a directory (it is created when missing)",
    errno.ENOTDIR: "a file is in the way: -o names a directory (it is created when missing)",
    errno.EISDIR: "name a file, not a directory",
    errno.ENAMETOOLONG: "use a shorter path",
    errno.EACCES: "choose a path you may read and write, e.g. -o under your home or working directory",
    errno.EROFS: "choose a writable location",
    errno.ENOSPC: "free some space or write elsewhere (-o)",
}


def _os_message(exc: OSError) -> str:
    where = shown(os.fsdecode(exc.filename)) + ": " if exc.filename is not None else ""
    hint = _OS_HINTS.get(exc.errno or 0)
    return f"{where}{exc.strerror or exc}" + (f"\n   hint: {hint}" if hint else "")


overrides = click.argument("overrides", nargs=-1)
files = click.option("-f", "--file", "files", multiple=True, metavar="FILE", help="TOML overlay, applied in order.")
