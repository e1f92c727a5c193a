"""Hugging Face interop: per-architecture weight mappings (mappings.py), conversion both ways
(convert.py) and the `recipec convert` commands (cli.py). Needs the runtime extra."""
