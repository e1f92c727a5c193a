"""`recipec list`: the bundled recipes grouped by model family."""

from __future__ import annotations

from collections import defaultdict

from .api import build
from .errors import RecipeError
from .loader import bundled_recipes, library_dir


def family(name: str, architecture: str = "") -> str:
    """The group of a recipe in `recipec list`: its model.architecture when the name starts with it
    (`gpt_oss_20b` -> `gpt_oss`, whose name has an underscore of its own), else the name's first
    word, which keeps a family's generations apart (`llama31_70b_sft` -> `llama31`, Llama 3.1)."""
    base = name.split("/")[-1]
    if architecture and (base == architecture or base.startswith(architecture + "_")):
        return architecture
    return base.split("_")[0]


def library_table() -> str:
    groups: dict[str, list[str]] = defaultdict(list)
    for path in bundled_recipes():
        name = path.relative_to(library_dir()).with_suffix("").as_posix()
        try:
            c = build(path)
        except RecipeError as exc:  # a broken bundled recipe is a bug; show it, don't hide the rest
            groups["(broken)"].append(f"  {name:<28} {exc.problems[0].message}")
            continue
        m, p, launch = c.config.model, c.plan, c.config.launch
        size = f"{p.params_total / 1e9:.2f}B" if p.params_total >= 1e8 else f"{p.params_total / 1e6:.1f}M"
        groups[family(name, m.architecture)].append(
            f"  {name:<28} {size:>8}  seq {m.seq_length:<6} {launch.nodes:>3} x {launch.gpus_per_node:<2} "
            f"{c.config.description}"
        )
    lines = []
    for group in sorted(groups):
        lines += [f"{group}:", *groups[group], ""]
    return "\n".join(lines).rstrip() + "\n"
