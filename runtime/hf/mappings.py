"""Weight mappings between Hugging Face and Megatron-Core, as data.

A table is a tuple of `Rule(mcore, hf, transform)`: `mcore` is a Megatron parameter
named as the local layer spec names it, `hf` the Hugging Face tensor(s) it is made of,
with `{L}` (layer) and `{E}` (expert) placeholders, and `transform` one of the named,
invertible transforms in `TRANSFORMS` (or the family's own). Each model family's table is
`RuntimeFamily.weights` in runtime/families/<name>.py; this module only applies it.

Megatron's *checkpoint* keys differ from its module names: layers are stacked along
a prepended axis (`decoder.layers.self_attention.linear_qkv.weight`, shape
[layers, ...]), experts along a second one, and the local spec stores its norms
under the Transformer Engine names (`linear_qkv.layer_norm_weight` for
`input_layernorm.weight`, `mlp.linear_fc1.layer_norm_weight` for
`pre_mlp_layernorm.weight`). `canonical_name()` maps a checkpoint key plus its
prepended offsets back to the module name, so the same tables serve the local and
the TE spec, every TP/PP/EP layout, and checkpoints read without building a model.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from recipec.compiler.errors import RecipeError


class MappingError(RecipeError):
    """Weights whose names or shapes do not fit the architecture's table and the recipe's model."""


@dataclass(frozen=True)
class Rule:
    mcore: str
    hf: tuple[str, ...]
    transform: str = "copy"


@dataclass(frozen=True)
class Shape:
    """What the transforms need to know about the model."""

    heads: int
    groups: int
    head_dim: int
    vocab: int
    padded_vocab: int
    tied: bool


def _rows(t: torch.Tensor, rows: int, what: str, rest: tuple[int, ...] | None = None) -> None:
    """`t` has `rows` rows (and trailing dims `rest`); else a ValueError saying what was expected."""
    if t.dim() < 1 or t.shape[0] != rows or (rest is not None and tuple(t.shape[1:]) != rest):
        want = (rows, *rest) if rest is not None else (rows, "...")
        raise ValueError(f"{what} has shape {tuple(t.shape)}, expected {want}")


def _to_qkv(ts: Sequence[torch.Tensor], s: Shape) -> torch.Tensor:
    """q [H*d, ...], k/v [G*d, ...] -> Megatron's per-group interleave [G*(H/G+2)*d, ...]."""
    q, k, v = ts
    rest = tuple(q.shape[1:])
    _rows(q, s.heads * s.head_dim, f"q ({s.heads} heads x head dim {s.head_dim})", rest)
    _rows(k, s.groups * s.head_dim, f"k ({s.groups} query groups x head dim {s.head_dim})", rest)
    _rows(v, s.groups * s.head_dim, f"v ({s.groups} query groups x head dim {s.head_dim})", rest)
    per = s.heads // s.groups
    parts = (q.reshape(s.groups, per * s.head_dim, *rest), k.reshape(s.groups, s.head_dim, *rest),
             v.reshape(s.groups, s.head_dim, *rest))
    return torch.cat(parts, dim=1).reshape(s.groups * (per + 2) * s.head_dim, *rest)


def _from_qkv(t: torch.Tensor, s: Shape) -> list[torch.Tensor]:
    per = s.heads // s.groups
    rest = t.shape[1:]
    _rows(t, (s.heads + 2 * s.groups) * s.head_dim, f"fused qkv ({s.heads} heads + 2 x {s.groups} groups x "
          f"head dim {s.head_dim})")
    g = t.reshape(s.groups, (per + 2) * s.head_dim, *rest)
    q, k, v = torch.split(g, [per * s.head_dim, s.head_dim, s.head_dim], dim=1)
    return [x.reshape(-1, *rest).contiguous() for x in (q, k, v)]


def _gate_up(ts: Sequence[torch.Tensor], s: Shape) -> torch.Tensor:
    gate, up = ts
    _rows(up, gate.shape[0] if gate.dim() else -1, "up_proj (the same shape as gate_proj)", tuple(gate.shape[1:]))
    return torch.cat([gate, up], dim=0)


def _from_gate_up(t: torch.Tensor, s: Shape) -> list[torch.Tensor]:
    if t.dim() < 1 or t.shape[0] % 2:
        raise ValueError(f"fused gate/up has shape {tuple(t.shape)}, expected an even number of rows")
    return [x.contiguous() for x in torch.chunk(t, 2, dim=0)]


def _to_vocab(ts: Sequence[torch.Tensor], s: Shape) -> torch.Tensor:
    (t,) = ts
    if t.dim() < 1 or t.shape[0] != s.vocab:
        raise ValueError(f"vocabulary tensor has {t.shape[0]} rows, the recipe's model.vocab_size is {s.vocab}")
    if s.padded_vocab == s.vocab:
        return t
    return torch.cat([t, t.new_zeros(s.padded_vocab - s.vocab, *t.shape[1:])])


TRANSFORMS: dict[str, tuple[Callable[[Sequence[torch.Tensor], Shape], torch.Tensor],
                            Callable[[torch.Tensor, Shape], list[torch.Tensor]]]] = {
    # name: (HF tensors -> Megatron tensor, Megatron tensor -> HF tensors)
    "copy": (lambda ts, s: ts[0], lambda t, s: [t]),
    "vocab": (_to_vocab, lambda t, s: [t[: s.vocab].contiguous()]),
    "qkv": (_to_qkv, _from_qkv),
    "gate_up": (_gate_up, _from_gate_up),
}

_L = "decoder.layers.{L}."
_X = _L + "mlp.experts.local_experts.{E}."

# Checkpoint keys (layer/expert axes prepended) whose module name is not the key with
# `{L}.` (and `{E}.`) put back: the local spec saves its norms under TE's fused names,
# SequentialMLP saves its experts as `experts.experts`. A family adds its own
# (RuntimeFamily.checkpoint_aliases).
CHECKPOINT_ALIASES: dict[str, str] = {
    "decoder.layers.self_attention.linear_qkv.layer_norm_weight": _L + "input_layernorm.weight",
    "decoder.layers.mlp.linear_fc1.layer_norm_weight": _L + "pre_mlp_layernorm.weight",
    "decoder.layers.mlp.experts.experts.linear_fc1.weight": _X + "linear_fc1.weight",
    "decoder.layers.mlp.experts.experts.linear_fc2.weight": _X + "linear_fc2.weight",
}


_PER_LAYER_KEY = re.compile(r"decoder\.layers\.(\d+)\.(.+)$")


def canonical_name(key: str, prefix: Sequence[int], aliases: Mapping[str, str] | None = None) -> str:
    """Module name (local spec) of checkpoint `key` at prepended offsets `prefix` (layer, expert);
    `aliases` are a family's extra checkpoint-key -> module-name templates.

    Layers that are not all alike (Megatron's moe_layer_freq list: DeepSeek's dense leading layers)
    are saved per layer, `decoder.layers.<n>.<rest>` with no layer axis: <n> is the layer offset."""
    per_layer = _PER_LAYER_KEY.match(key)
    if per_layer:
        key, prefix = "decoder.layers." + per_layer[2], (int(per_layer[1]), *prefix)
    template = (aliases or {}).get(key) or CHECKPOINT_ALIASES.get(key)
    if template is None:
        if key.startswith("decoder.layers."):
            template = _L + key[len("decoder.layers."):]
        else:
            template = key
    layer = prefix[0] if len(prefix) > 0 else None
    expert = prefix[1] if len(prefix) > 1 else None
    if ("{L}" in template) != (layer is not None) or ("{E}" in template) != (expert is not None):
        raise MappingError(f"checkpoint key {key!r} with prepended offsets {tuple(prefix)} has no known module name; "
                           "is the checkpoint of the recipe's architecture?")
    return template.replace("{L}", str(layer)).replace("{E}", str(expert))


# An HF name `X[i]` in a table is slice i (dim 0) of the stacked HF tensor X: models such as GPT-OSS
# keep all experts of a layer in one tensor. The reader slices it (HFReader.get); the exporter stacks
# the slices back (runtime/hf/convert.py).
_STACKED = re.compile(r"^(?P<name>.+)\[(?P<index>\d+)\]$")


def stacked_name(hf_name: str) -> tuple[str, int | None]:
    """("X", i) for an HF name "X[i]" (slice i of the stacked tensor X), else (hf_name, None)."""
    match = _STACKED.match(hf_name)
    return (match["name"], int(match["index"])) if match else (hf_name, None)


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(r"\{L\}", r"(?P<L>\d+)").replace(r"\{E\}", r"(?P<E>\d+)") + "$")


class ArchMapping:
    """One architecture's table bound to a model shape."""

    def __init__(self, architecture: str, shape: Shape) -> None:
        from recipec.runtime import families

        family = families.get(architecture)
        if not family.weights:
            known = sorted(f.name for f in families.all_families() if f.weights)
            raise MappingError(f"no weight mapping for architecture {architecture!r}; known: {known}")
        self.architecture = architecture
        self.shape = shape
        self.transforms = {**TRANSFORMS, **family.transforms}
        self.aliases = dict(family.checkpoint_aliases)
        self.rules = tuple(r for r in family.weights if not (shape.tied and r.mcore == "output_layer.weight"))
        self._compiled = [(_pattern(r.mcore), r) for r in self.rules]

    def canonical_name(self, key: str, prefix: Sequence[int]) -> str:
        """`canonical_name` with this family's checkpoint aliases."""
        return canonical_name(key, prefix, self.aliases)

    def rule_for(self, name: str) -> tuple[Rule, dict[str, str]]:
        if self.shape.tied and name == "output_layer.weight":
            name = "embedding.word_embeddings.weight"  # the last stage's copy of the tied embedding
        for pattern, rule in self._compiled:
            match = pattern.match(name)
            if match:
                return rule, match.groupdict()
        raise MappingError(f"Megatron tensor {name!r} has no rule in the {self.architecture} mapping; is the "
                           "checkpoint of the recipe's architecture?")

    @staticmethod
    def fill(template: str, idx: dict[str, str]) -> str:
        for k, v in idx.items():
            template = template.replace("{" + k + "}", v)
        return template

    def to_mcore(self, name: str, get: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """The full (unsharded) Megatron tensor `name`, read from HF through `get(hf_name)`."""
        rule, idx = self.rule_for(name)
        names = [self.fill(h, idx) for h in rule.hf]
        tensors = [get(h) for h in names]
        try:
            return self.transforms[rule.transform][0](tensors, self.shape)
        except (ValueError, RuntimeError) as exc:  # a reshape of weights that do not fit the model
            shapes = ", ".join(f"{h} {tuple(t.shape)}" for h, t in zip(names, tensors))
            raise MappingError(f"Hugging Face weights {shapes} do not fit {name} of the recipe's {self.architecture} "
                               f"model: {exc}; check model.* (heads, query groups, kv_channels, sizes) against "
                               "the HF config.json") from None

    def to_hf(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """HF tensors made from the full Megatron tensor `name`."""
        rule, idx = self.rule_for(name)
        try:
            outs = self.transforms[rule.transform][1](tensor, self.shape)
        except (ValueError, RuntimeError) as exc:
            raise MappingError(f"checkpoint tensor {name} {tuple(tensor.shape)} does not fit the recipe's "
                               f"{self.architecture} model: {exc}; does --recipe describe this checkpoint?") from None
        return {self.fill(h, idx): t for h, t in zip(rule.hf, outs)}

    def mcore_names(self, num_layers: int, num_experts: int | None, model: Any = None) -> list[str]:
        """Every Megatron tensor of the model, in HF-friendly order (layer by layer); with the [model]
        section, only those its layers have (`layer_has`: dense vs MoE layers, MLA's q projections)."""
        names: list[str] = []
        for rule in self.rules:
            if "{L}" not in rule.mcore:
                names.append(rule.mcore)
        for layer in range(num_layers):
            for rule in self.rules:
                if "{L}" not in rule.mcore or (model is not None and not layer_has(model, layer, rule.mcore)):
                    continue
                experts = range(num_experts or 0) if "{E}" in rule.mcore else [None]
                for e in experts:
                    names.append(self.fill(rule.mcore, {"L": str(layer)} | ({"E": str(e)} if e is not None else {})))
        return names


def layer_has(model: Any, layer: int, template: str) -> bool:
    """Whether decoder layer `layer` of a derived [model] section has the Megatron tensor `template`
    (a table's module name): the first `moe_first_k_dense` layers of an MoE model have a dense MLP
    and no router or experts, the rest the reverse; the router's expert bias exists only with
    moe_router_enable_expert_bias; multi-head latent attention projects q through a latent
    (q_lora_rank: down/up projections and q_layernorm) or at full rank (linear_q_proj)."""
    moe = model.is_moe and layer >= model.moe_first_k_dense
    part = template.split("}.", 1)[-1]  # after "decoder.layers.{L}."
    if part.startswith(("mlp.router.", "mlp.experts.", "mlp.shared_experts.")):
        return moe and (not part.endswith("expert_bias") or model.moe_router_enable_expert_bias)
    if part.startswith("mlp.linear_fc"):
        return not moe
    if model.multi_latent_attention:
        if part.startswith("self_attention.linear_q_proj."):
            return model.q_lora_rank is None
        if part.startswith(("self_attention.linear_q_down_proj.", "self_attention.linear_q_up_proj.",
                            "self_attention.q_layernorm.")):
            return model.q_lora_rank is not None
    return True
