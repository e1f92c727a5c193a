"""train.mode = "pretrain": next-token loss on every token of mock, indexed or text data."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..schema import RecipeConfig
    from .base import ExtraModel, Finding


class Pretrain:
    name = "pretrain"
    options = None

    def rules(self, config: RecipeConfig) -> Iterator[Finding]:
        if config.data.kind == "sft":
            yield ("train.mode", ('train.mode "pretrain" trains on every token, but data.kind "sft" holds '
                   "prompt/response records (loss on the responses only)"),
                   'set train.mode="sft" (or unset it: sft data selects it), or use data.kind="text"')
        if config.data.packing:
            yield ("data.packing", ("data.packing packs finetuning examples (train.mode \"sft\"); pretraining "
                   "data is already a stream of full sequences"), "unset it with ~data.packing")

    def extra_models(self, config: RecipeConfig) -> Iterable[ExtraModel]:
        return ()


MODE = Pretrain()
