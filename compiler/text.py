"""User text made safe to show: in a terminal message, or in a TOML comment.

A recipe name, a key, a path or a config.json string is data. Echoed raw it can
flood the terminal (a 100k-character name), forge lines (a newline), or, in a
TOML comment, start a new TOML line. Everything recipec echoes goes through here.
"""

from __future__ import annotations

import re

CLIP = 160  # characters of user text echoed in a message

# C0 and C1 controls, DEL, and the other characters str.splitlines() breaks a line at.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def clip(text: str, limit: int = CLIP) -> str:
    """`text` shortened for a message, so a 100k-character name or key cannot flood the terminal."""
    if len(text) <= limit:
        return text
    return f"{text[: limit - 40]}...{text[-20:]} ({len(text)} characters)"


def one_line(text: str) -> str:
    """`text` with every control or line-breaking character spelled as an escape (\\n, \\x1b):
    what may follow `#` in a TOML comment or stand on one line of a message."""
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def shown(text: str, limit: int = CLIP) -> str:
    """Clipped and on one line: user text as a message quotes it."""
    return one_line(clip(text, limit))
