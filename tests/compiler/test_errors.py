"""Every kind of user mistake: one RecipeError whose message names the file, the line and the
key and carries a hint; the CLI prints it and exits 2 without a traceback."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import attrs
import pytest
from click.testing import CliRunner
from compiler_testlib import DATA, write

from recipec.compiler import (
    CyclicExtendsError,
    OverrideError,
    RecipeError,
    RecipeNotFoundError,
    TomlSyntaxError,
    TypeMismatchError,
    UnknownKeyError,
    ValidationError,
    build,
)
from recipec.compiler.cli import main

# A standalone dense base (24 layers, hidden 2048, 16 heads, 8 KV groups, 8 GPUs, DP 8), so that
# edits of the bundled library do not move these messages. Lines 1-3 here; a case's own lines follow.
BASE = f"""extends = {json.dumps((DATA / "dense.toml").as_posix())}
[model]
num_layers = 24
"""


@attrs.frozen
class Case:
    """A recipe (files written into an empty directory), the CLI arguments, and what the error must say."""

    id: str
    files: dict[str, str | bytes]
    args: tuple[str, ...]
    kind: type[RecipeError]
    expect: tuple[str, ...]  # regexes the message must match, in order of appearance not required
    problems: int = 1
    keyed: bool = True  # the message names a dotted key


def case(id: str, files: dict[str, str | bytes], args: Sequence[str], kind: type[RecipeError], *expect: str,
         problems: int = 1, keyed: bool = True) -> Case:
    return Case(id, files, tuple(args), kind, expect, problems, keyed)


HINT = r"\n\s+hint: \S"

CASES = [
    case("toml-syntax", {"r.toml": BASE + "hidden_size = = 4096\n"}, ["r.toml"], TomlSyntaxError,
         r"^r\.toml:4: \[model\.hidden_size\] invalid TOML", r"\| hidden_size = = 4096", HINT),
    case("unknown-key", {"r.toml": BASE + "num_layrs = 3\n"}, ["r.toml"], UnknownKeyError,
         r"^r\.toml:4: \[model\.num_layrs\] unknown key `num_layrs` in \[model\]", r"hint: did you mean `num_layers`\?"),
    case("wrong-section-override", {"r.toml": BASE}, ["r.toml", "model.tensor_model_parallel_size=4"], UnknownKeyError,
         r"^CLI 'model\.tensor_model_parallel_size=4': \[model\.tensor_model_parallel_size\] unknown key",
         r"hint: .*write `parallel\.tensor_model_parallel_size`"),
    case("wrong-section-file", {"r.toml": BASE + "tensor_model_parallel_size = 4\n"}, ["r.toml"], UnknownKeyError,
         r"^r\.toml:4: \[model\.tensor_model_parallel_size\]", r"hint: .*parallel\.tensor_model_parallel_size"),
    case("wrong-type", {"r.toml": BASE + 'hidden_size = "4096"\n'}, ["r.toml"], TypeMismatchError,
         r"^r\.toml:4: \[model\.hidden_size\] expected an integer, got a string '4096'", r"hint: drop the quotes"),
    case("wrong-type-float-for-int", {"r.toml": BASE}, ["r.toml", "train.micro_batch_size=1.5"], TypeMismatchError,
         r"\[train\.micro_batch_size\] expected an integer, got a number 1\.5", r"CLI 'train\.micro_batch_size=1\.5'"),
    case("not-in-choices", {"r.toml": BASE + 'normalization = "BatchNorm"\n'}, ["r.toml"], TypeMismatchError,
         r"^r\.toml:4: \[model\.normalization\] 'BatchNorm' is not one of 'RMSNorm', 'LayerNorm'",
         r'hint: allowed: "RMSNorm", "LayerNorm"'),
    case("below-minimum", {"r.toml": BASE + "[train]\nglobal_batch_size = 0\n"}, ["r.toml"], TypeMismatchError,
         r"^r\.toml:5: \[train\.global_batch_size\] must be >= 1, got 0"),
    case("parallel-layout", {"r.toml": BASE + "[parallel]\ntensor_model_parallel_size = 4\npipeline_model_parallel_size = 3\n"
                             "context_parallel_size = 1\n[launch]\nnodes = 2\n"},
         ["r.toml"], ValidationError,
         r"^r\.toml:5: \[parallel\.tensor_model_parallel_size\] world size 16 \(nodes 2 x gpus_per_node 8\) "
         r"is not divisible by tensor 4 x pipeline 3 x context 1 = 12", r"hint: use a world size that is a multiple of 12"),
    case("heads-vs-tp", {"r.toml": BASE + "num_attention_heads = 12\nnum_query_groups = 4\nhidden_size = 3072\n"
                         "[parallel]\ntensor_model_parallel_size = 8\n"},
         ["r.toml"], ValidationError,
         r"r\.toml:4: \[model\.num_attention_heads\] num_attention_heads 12 is not divisible by tensor_model_parallel_size 8",
         r"r\.toml:5: \[model\.num_query_groups\] num_query_groups 4 is not divisible by tensor_model_parallel_size 8",
         r"hint: use tensor_model_parallel_size <= 4", problems=2),
    case("layers-vs-pp", {"r.toml": BASE}, ["r.toml", "parallel.pipeline_model_parallel_size=8", "model.num_layers=30"],
         ValidationError,
         r"^CLI 'parallel\.pipeline_model_parallel_size=8': \[parallel\.pipeline_model_parallel_size\] "
         r"num_layers 30 is not divisible by pipeline 8"),
    case("layers-vs-vpp", {"r.toml": BASE + "[parallel]\npipeline_model_parallel_size = 4\n"
                           "virtual_pipeline_model_parallel_size = 4\n"},
         ["r.toml"], ValidationError,
         r"^r\.toml:6: \[parallel\.virtual_pipeline_model_parallel_size\] num_layers 24 is not divisible by "
         r"pipeline 4 x virtual 4 = 16"),
    case("seq-vs-cp", {"r.toml": BASE + "seq_length = 4090\n[parallel]\ncontext_parallel_size = 2\n"}, ["r.toml"], ValidationError,
         r"^r\.toml:4: \[model\.seq_length\] seq_length 4090 is not divisible by 2 x context 2 = 4"),
    case("seq-vs-sp", {"r.toml": BASE + "seq_length = 4100\n[parallel]\n"
                       "tensor_model_parallel_size = 8\nsequence_parallel = true\n"},
         ["r.toml"], ValidationError,
         r"^r\.toml:4: \[model\.seq_length\] seq_length 4100 / context 1 is not divisible by tensor 8 \(sequence parallel"),
    case("sp-needs-tp", {"r.toml": BASE + "[parallel]\nsequence_parallel = true\n"}, ["r.toml"], ValidationError,
         r"^r\.toml:5: \[parallel\.sequence_parallel\] sequence_parallel needs tensor_model_parallel_size > 1",
         r"hint: set parallel\.sequence_parallel=false"),
    case("global-batch", {"r.toml": BASE + "[train]\nglobal_batch_size = 100\n"}, ["r.toml"], ValidationError,
         r"^r\.toml:5: \[train\.global_batch_size\] global_batch_size 100 is not divisible by micro_batch_size 1 "
         r"x data-parallel 8 = 8", r"hint: use a multiple of 8"),
    case("moe-experts-vs-ep", {"r.toml": BASE + "num_moe_experts = 6\n[parallel]\nexpert_model_parallel_size = 4\n"},
         ["r.toml"], ValidationError,
         r"^r\.toml:4: \[model\.num_moe_experts\] num_moe_experts 6 is not divisible by expert_model_parallel_size 4"),
    case("ep-needs-moe", {"r.toml": BASE}, ["r.toml", "parallel.expert_model_parallel_size=2"], ValidationError,
         r"\[parallel\.expert_model_parallel_size\] expert_model_parallel_size 2 needs an MoE model"),
    case("lr-warmup", {"r.toml": BASE + "[train]\ntrain_iters = 100\n[scheduler]\nlr_warmup_iters = 200\n"},
         ["r.toml", "~scheduler.lr_warmup_fraction"], ValidationError,
         r"^r\.toml:7: \[scheduler\.lr_warmup_iters\] lr_warmup_iters 200 >= train_iters 100: the run never reaches "
         r"the peak lr", r"hint: lower scheduler\.lr_warmup_iters"),
    case("warmup-iters-and-fraction", {"r.toml": BASE + "[scheduler]\nlr_warmup_iters = 7\n"}, ["r.toml"],
         ValidationError, r"\[scheduler\.lr_warmup_fraction\] set lr_warmup_iters or lr_warmup_fraction, not both",
         r"hint: unset one of them"),
    case("sft-paths-jsonl", {"r.toml": BASE + '[data]\nkind = "sft"\npaths = ["a.jsonl", "b.txt"]\n'
                             '[tokenizer]\ntype = "byte"\n'},
         ["r.toml"], ValidationError,
         r"^r\.toml:6: \[data\.paths\] data\.kind 'sft' reads jsonl files .* 'b\.txt' does not end in \.jsonl",
         r"hint: name the files \*\.jsonl"),
    case("sft-no-weights", {"r.toml": BASE + '[data]\nkind = "sft"\npaths = ["a.jsonl"]\n'
                            '[tokenizer]\ntype = "byte"\n'},
         ["r.toml", "data.weights=[1.0]"], ValidationError,
         r"\[data\.weights\] data\.kind 'sft' concatenates its files; blend weights are not supported",
         r"hint: unset them with ~data\.weights"),
    case("sft-needs-tokenizer", {"r.toml": BASE + '[data]\nkind = "sft"\npaths = ["a.jsonl"]\n'
                                 '[tokenizer]\ntype = "null"\n'},
         ["r.toml"], ValidationError,
         r"^r\.toml:8: \[tokenizer\.type\] data\.kind 'sft' holds text and needs a real tokenizer", r"hint: set tokenizer\.type"),
    case("memory", {"r.toml": BASE}, ["r.toml", "optimizer.use_distributed_optimizer=false", "model.seq_length=65536"],
         ValidationError, r"dense\.toml:\d+: \[launch\.nodes\] estimated memory per GPU [\d.]+ GiB exceeds the H100-80GB's 79\.1 GiB \(weights", r"hint: add nodes"),
    case("missing-file", {}, ["nope.toml"], RecipeNotFoundError,
         r"^recipe 'nope\.toml' not found \(looked in \., recipes_toml\)", HINT),
    case("missing-file-did-you-mean", {}, ["llama3_8c"], RecipeNotFoundError,
         r"recipe 'llama3_8c' not found", r"hint: did you mean `llama3_8b`\?"),
    case("missing-parent", {"a.toml": 'extends = "b"\n', "b.toml": '# b\n\nextends = ["_base/pretrain", "no_such_parent"]\n'},
         ["a.toml"], RecipeNotFoundError,
         r"^b\.toml:3: recipe 'no_such_parent' not found .*; extends chain: a\.toml -> b\.toml -> no_such_parent"),
    case("missing-overlay", {"r.toml": BASE}, ["r.toml", "-f", "gone.toml"], RecipeNotFoundError,
         r"^overlay 'gone\.toml' not found \(-f gone\.toml; looked in \., recipes_toml\)", r"hint: -f takes a TOML file"),
    case("missing-overlay-did-you-mean", {"r.toml": BASE, "conf/overrides.toml": "[train]\n"},
         ["r.toml", "-f", "conf/overides.toml"], RecipeNotFoundError,
         r"^overlay 'conf/overides\.toml' not found", r"hint: did you mean -f conf/overrides\.toml\?"),
    case("overlay-is-a-directory", {"r.toml": BASE, "conf/x.toml": ""}, ["r.toml", "-f", "conf"], RecipeNotFoundError,
         r"^-f conf is a directory, not an overlay file"),
    case("cyclic-extends", {"a.toml": 'extends = "b"\n', "b.toml": 'extends = "c.toml"\n', "c.toml": '\nextends = "a"\n'},
         ["a.toml"], CyclicExtendsError,
         r"^c\.toml:2: \[extends\] `extends` forms a cycle: a\.toml -> b\.toml -> c\.toml -> a\.toml", HINT),
    case("extends-itself", {"me.toml": 'extends = "me"\n'}, ["me.toml"], CyclicExtendsError,
         r"^me\.toml:1: \[extends\] `extends` forms a cycle: me\.toml -> me\.toml"),
    case("extends-wrong-type", {"r.toml": "extends = 3\n"}, ["r.toml"], TypeMismatchError,
         r"^r\.toml:1: \[extends\] `extends` must be a string or a list of strings", HINT),
    case("override-no-key", {"r.toml": BASE}, ["r.toml", "=3"], OverrideError,
         r"^CLI '=3': cannot read override '=3'", r"hint: write key=value"),
    case("override-no-value", {"r.toml": BASE}, ["r.toml", "train.train_iters"], OverrideError,
         r"\[train\.train_iters\] override 'train\.train_iters' has no value", r"hint: write train\.train_iters=VALUE"),
    case("override-unset-with-value", {"r.toml": BASE}, ["r.toml", "~train.train_iters=3"], OverrideError,
         r"`~train\.train_iters` unsets a key and takes no value", r"hint: write ~train\.train_iters"),
    case("override-bad-value", {"r.toml": BASE}, ["r.toml", "data.paths=[1,"], OverrideError,
         r"\[data\.paths\] value '\[1,' is not a TOML value", r'hint: quote strings with spaces'),
    case("override-unset-unknown", {"r.toml": BASE}, ["r.toml", "~optimizer.min_lrr"], OverrideError,
         r"\[optimizer\.min_lrr\] `optimizer\.min_lrr` is not a key", r"hint: did you mean `optimizer\.min_lr`"),
    case("override-free-table-needs-plus", {"r.toml": BASE}, ["r.toml", "launch.env.NCCL_DEBUG=INFO"], OverrideError,
         r"`launch\.env\.NCCL_DEBUG` is not in this recipe", r"hint: add a new entry with \+launch\.env\.NCCL_DEBUG=INFO"),
    case("several-overrides", {"r.toml": BASE}, ["r.toml", "=1", "a.b", "~c=1"], OverrideError,
         r"^3 problems in this recipe:\n1\. CLI '=1'", r"\n2\. CLI 'a\.b'", r"\n3\. CLI '~c=1'", problems=3),
    case("several-independent", {"r.toml": BASE + "num_layrs = 3\nactivation = 3\n[train]\nseed = -1\n[launch]\nnodez = 2\n"},
         ["r.toml"], RecipeError,
         r"^4 problems in this recipe:", r"r\.toml:4: \[model\.num_layrs\] unknown key", r"r\.toml:5: \[model\.activation\] "
         r"expected a string", r"r\.toml:7: \[train\.seed\] must be >= 0", r"r\.toml:9: \[launch\.nodez\].*\n.*did you mean `nodes`",
         problems=4),
    case("duplicate-key", {"r.toml": BASE + "hidden_size = 1\nnum_layers = 30\n"}, ["r.toml"], TomlSyntaxError,
         r"^r\.toml:5: \[model\.num_layers\] invalid TOML: Cannot overwrite a value",
         r"hint: `model\.num_layers` is already set on line 3 in this file"),
    case("several-rules", {"r.toml": BASE}, ["r.toml", "model.num_layers=30", "parallel.pipeline_model_parallel_size=4", "train.global_batch_size=3"], ValidationError,
         r"^2 problems", r"num_layers 30 is not divisible by pipeline 4", r"global_batch_size 3 is not divisible",
         problems=2),
]


# Broken recipes a new user writes (found by trying the compiler on a fresh clone).
CASES += [
    case("nested-section", {"r.toml": BASE + "[model.parallel]\ntensor_model_parallel_size = 2\n"}, ["r.toml"],
         UnknownKeyError, r"^r\.toml:4: \[model\.parallel\] unknown key `parallel` in \[model\]",
         r"hint: \[parallel\] is a section of its own: write \[parallel\], not \[model\.parallel\]"),
    case("array-of-tables", {"r.toml": BASE.replace("[model]\n", "[[model]]\n")}, ["r.toml"], TypeMismatchError,
         r"^r\.toml:2: \[model\] `model` must be a table", r"hint: write \[model\] \(a table\), not \[\[model\]\]"),
    case("section-as-scalar", {"r.toml": BASE.split("[model]")[0] + "model = 3\n"}, ["r.toml"], TypeMismatchError,
         r"^r\.toml:2: \[model\] `model` must be a table", HINT),
    case("not-utf8", {"r.toml": BASE.encode() + b"name = \"\xff\xfe\"\n"}, ["r.toml"], TomlSyntaxError,
         r"^r\.toml:4: \[model\.name\] not UTF-8 text \(byte 0xff at line 4\)", r"hint: TOML files are UTF-8"),
    case("empty-file", {"r.toml": ""}, ["r.toml"], RecipeError, r"^r\.toml:1: r\.toml is empty", r'hint: .*extends = ',
         keyed=False),
    case("only-comments", {"r.toml": "# nothing yet\n"}, ["r.toml"], RecipeError, r"r\.toml is empty", keyed=False),
    case("directory", {"recipes/a.toml": BASE}, ["recipes"], RecipeNotFoundError,
         r"^recipes is a directory, not a recipe file", r"hint: name a \.toml file inside it"),
    case("extends-directory", {"r.toml": 'extends = "_base"\n'}, ["r.toml"], RecipeNotFoundError,
         r"^r\.toml:1: recipes_toml/_base is a directory"),
    case("extends-empty-name", {"r.toml": 'extends = ""\n'}, ["r.toml"], RecipeNotFoundError,
         r"^r\.toml:1: recipe '' not found"),
    case("overlay-unknown-key", {"r.toml": BASE, "o.toml": "[train]\ntrain_itres = 5\n"}, ["r.toml", "-f", "o.toml"],
         UnknownKeyError, r"^overlay o\.toml:2: \[train\.train_itres\] unknown key", r"did you mean `train_iters`"),
    case("overlay-bad-toml", {"r.toml": BASE, "o.toml": "[train\n"}, ["r.toml", "-f", "o.toml"], TomlSyntaxError,
         r"^o\.toml:1: invalid TOML: Expected ']'", keyed=False),
    case("plus-unknown-nested", {"r.toml": BASE}, ["r.toml", "+model.foo.bar=1"], UnknownKeyError,
         r"^CLI '\+model\.foo\.bar=1': \[model\.foo\] unknown key `foo` in \[model\]"),
    case("plus-unknown-section", {"r.toml": BASE}, ["r.toml", "+trian.train_iters=1"], UnknownKeyError,
         r"^CLI '\+trian\.train_iters=1': \[trian\] unknown key `trian` in the top level", r"did you mean `train`"),
    case("plus-env-nested", {"r.toml": BASE}, ["r.toml", "+launch.env.X.Y=1"], TypeMismatchError,
         r"^CLI '\+launch\.env\.X\.Y=1': \[launch\.env\] expected a table of strings", r"hint: \[env\] holds NAME"),
    case("env-int-in-file", {"r.toml": BASE + "[launch.env]\nNCCL_IB_DISABLE = 1\n"}, ["r.toml"], TypeMismatchError,
         r"^r\.toml:5: \[launch\.env\] expected a table of strings", r'hint: quote the value: NCCL_IB_DISABLE = "1"'),
    case("unicode-key", {"r.toml": BASE + '"nüm_läyers" = 3\n'}, ["r.toml"], UnknownKeyError,
         r"^r\.toml:4: \[model\.nüm_läyers\] unknown key", HINT),
    case("unicode-override", {"r.toml": BASE}, ["r.toml", "mödel.num_layers=1"], OverrideError,
         r"cannot read override 'mödel\.num_layers=1'"),
    case("huge-int", {"r.toml": BASE + "hidden_size = 99999999999999999999999\n"}, ["r.toml"], TypeMismatchError,
         r"^r\.toml:4: \[model\.hidden_size\] integer 99999999999999999999999 does not fit in 64 bits"),
    case("inf-float", {"r.toml": BASE + "rotary_base = inf\n"}, ["r.toml"], TypeMismatchError,
         r"^r\.toml:4: \[model\.rotary_base\] inf is not a finite number"),
    case("nan-float", {"r.toml": BASE}, ["r.toml", "optimizer.min_lr=nan"], TypeMismatchError,
         r"^CLI 'optimizer\.min_lr=nan': \[optimizer\.min_lr\] nan is not a finite number"),
    case("nan-in-list", {"r.toml": BASE + '[data]\nkind = "indexed"\npaths = ["a"]\nweights = [nan]\n'}, ["r.toml"],
         TypeMismatchError, r"^r\.toml:7: \[data\.weights\] nan is not a finite number"),
    case("float-for-int", {"r.toml": BASE + "num_layers = 1e400\n"}, ["r.toml"], TomlSyntaxError,
         r"Cannot overwrite|already set"),
    case("date-value", {"r.toml": BASE + "seq_length = 1979-05-27\n"}, ["r.toml"], TypeMismatchError,
         r"^r\.toml:4: \[model\.seq_length\] expected an integer, got date"),
    case("replace-not-bool", {"r.toml": BASE + "_replace = 1\n"}, ["r.toml"], TypeMismatchError,
         r"^r\.toml:4: \[model\._replace\] `_replace` must be true or false, got 1", HINT),
    case("bad-name", {"r.toml": BASE.split("[model]")[0] + 'name = "../../etc"\n'}, ["r.toml"], ValidationError,
         r"^r\.toml:2: \[name\] name '\.\./\.\./etc' cannot be used", HINT),
    case("extends-in-override", {"r.toml": BASE}, ["r.toml", "extends=llama3_8b"], UnknownKeyError,
         r"\[extends\] unknown key `extends` in the top level"),
    case("cuda-graph-on-cpu", {"r.toml": BASE + '[train]\ncuda_graph = "layers"\n[launch]\naccelerator = "cpu"\n'},
         ["r.toml"], ValidationError, r"^r\.toml:5: \[train\.cuda_graph\] train\.cuda_graph='layers' needs a GPU",
         r'hint: set train\.cuda_graph="none"'),
    case("fp8-on-local-modules", {"r.toml": BASE + 'transformer_impl = "local"\n[precision]\nfp8 = "tensorwise"\n'},
         ["r.toml"], ValidationError, r"^r\.toml:4: \[model\.transformer_impl\] precision\.fp8='tensorwise' needs "
         r"Transformer Engine modules", HINT),
    case("compile-on-te-modules", {"r.toml": BASE + 'transformer_impl = "transformer_engine"\n'},
         ["r.toml", "train.torch_compile=true"], ValidationError,
         r"^CLI 'train\.torch_compile=true': \[train\.torch_compile\] torch\.compile runs on Megatron-Core's local",
         r'hint: set model\.transformer_impl="local"'),
    case("graph-with-nan-check", {"r.toml": BASE + '[train]\ncuda_graph = "full_iteration"\n'},
         ["r.toml", "train.check_for_nan_in_grad=true"], ValidationError,
         r"\[train\.check_for_nan_in_grad\] the DDP NaN check reads every gradient bucket", HINT),
    # A construct left open: named at the line it opened on, with the line where TOML noticed it.
    case("unclosed-array", {"r.toml": BASE + '[data]\npaths = ["a",\nkind = "indexed"\n'}, ["r.toml"], TomlSyntaxError,
         r"^r\.toml:5: \[data\.paths\] invalid TOML: the array opened on line 5 is not closed before line 6",
         r'\n\s+\| 5: paths = \["a",\n\s+\| 6: kind = "indexed"', r"hint: close the array with `\]`"),
    case("unclosed-array-at-end", {"r.toml": BASE + '[data]\npaths = ["a",\n\n'}, ["r.toml"], TomlSyntaxError,
         r"^r\.toml:5: \[data\.paths\] invalid TOML: the array opened on line 5 is not closed before the file ends"),
    case("unclosed-inline-table", {"r.toml": BASE + '[launch]\nenv = { A = "1",\nnodes = 1\n'}, ["r.toml"],
         TomlSyntaxError,
         r"^r\.toml:5: \[launch\.env\] invalid TOML: the inline table opened on line 5 does not end on that line",
         r'\| 5: env = \{ A = "1",\n\s+\| 6: nodes = 1', r"hint: an inline table \{ \.\.\. \} is one line in TOML"),
    case("unclosed-array-in-inline-table", {"r.toml": BASE + '[launch]\nenv = { A = ["1",\nnodes = 1\n'},
         ["r.toml"], TomlSyntaxError,
         r"^r\.toml:5: \[launch\.env\] invalid TOML: the array opened on line 5 is not closed before line 6",
         r"\| 6: nodes = 1"),
    case("missing-comma-in-array", {"r.toml": BASE + '[data]\npaths = [\n  "a"\n  "b",\n]\n'}, ["r.toml"],
         TomlSyntaxError, r"^r\.toml:7: \[data\.paths\] invalid TOML: .* on line 7, inside the array opened on line 5",
         r'\| 5: paths = \[\n\s+\| 7: "b",'),
    case("unclosed-multiline-string", {"r.toml": BASE + 'description = """a long\ntext\n'}, ["r.toml"],
         TomlSyntaxError, r"^r\.toml:4: \[model\.description\] invalid TOML: the multi-line string opened on line 4 "
         r"is not closed \(the file ends inside it\)", r'hint: close it with the three quotes'),
    case("unknown-table-at-header", {"r.toml": BASE + "[modle]\n\n# the model\nnum_layers = 2\n"}, ["r.toml"],
         UnknownKeyError, r"^r\.toml:4: \[modle\] unknown key `modle` in the top level", r"hint: did you mean `model`\?"),
    case("unknown-table-in-overlay", {"r.toml": BASE, "o.toml": "# mine\n[trian]\nseed = 3\n"}, ["r.toml", "-f", "o.toml"],
         UnknownKeyError, r"^overlay o\.toml:2: \[trian\] unknown key `trian`", r"did you mean `train`"),
    case("launch-bounds", {"r.toml": BASE}, ["r.toml", "launch.gpus_per_node=80000"], TypeMismatchError,
         r"^CLI 'launch\.gpus_per_node=80000': \[launch\.gpus_per_node\] must be <= 4096, got 80000"),
    case("grace-beyond-slurm", {"r.toml": BASE + "[launch]\npreempt_grace_s = 100000\n"}, ["r.toml"], TypeMismatchError,
         r"^r\.toml:5: \[launch\.preempt_grace_s\] must be <= 65535, got 100000"),
    case("env-string-too-long", {"r.toml": BASE}, ["r.toml", "+launch.env.BIG=" + "x" * 200_000], ValidationError,
         r"^CLI '\+launch\.env\.BIG=x+\.\.\.x+ \(200016 characters\)': \[launch\.env\.BIG\] the entry is 200,005 bytes "
         r"as an environment string .* Linux refuses one over 131,072 bytes", HINT),
    case("launch-rules-with-others", {"r.toml": BASE + "[launch.env]\nLD_PRELOAD = \"x.so\"\n"},
         ["r.toml", "train.global_batch_size=100"], ValidationError,
         r"^2 problems", r"\[train\.global_batch_size\] global_batch_size 100 is not divisible",
         r"r\.toml:5: \[launch\.env\.LD_PRELOAD\] launch\.env may not set LD_PRELOAD", problems=2),
    case("quoted-number", {"r.toml": BASE + '[optimizer]\nlr = "3e-4"\n'}, ["r.toml"], TypeMismatchError,
         r"^r\.toml:5: \[optimizer\.lr\] expected a number, got a string '3e-4'", r"hint: drop the quotes: lr = 3e-4"),
]

def compile_case(c: Case, root: Path) -> RecipeError:
    for name, text in c.files.items():
        write(root / name, text)
    recipe, *rest = c.args
    overrides = [a for a in rest if a not in ("-f",) and (rest.index(a) == 0 or rest[rest.index(a) - 1] != "-f")]
    overlays = [rest[i + 1] for i, a in enumerate(rest) if a == "-f"]
    with pytest.raises(RecipeError) as info:
        build(recipe, overrides, overlays=overlays)
    return info.value


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_error_message(c: Case, in_tmp: Path) -> None:
    error = compile_case(c, in_tmp)
    message = str(error)
    assert isinstance(error, c.kind), f"{type(error).__name__}: {message}"
    assert len(error.problems) == c.problems, message
    for pattern in c.expect:
        assert re.search(pattern, message, re.M), f"{pattern!r} not in:\n{message}"
    for problem in error.problems:
        if c.kind is not RecipeNotFoundError or problem.source is not None:
            assert problem.source is not None or problem.kind is RecipeNotFoundError, message
    if c.problems == 1 and c.kind not in (RecipeNotFoundError, OverrideError):
        # file:line, or the CLI override that set it, and the dotted key
        key = r"\[[\w.]+\] " if c.keyed else ""
        assert re.search(rf"^(overlay )?(\S+\.toml:\d+|CLI '[^']*'): {key}", message), message


def test_every_error_kind_has_a_case() -> None:
    kinds = {c.kind for c in CASES}
    assert {TomlSyntaxError, UnknownKeyError, TypeMismatchError, ValidationError, RecipeNotFoundError,
            CyclicExtendsError, OverrideError, RecipeError} <= kinds


@pytest.mark.parametrize("c", CASES, ids=[c.id for c in CASES])
def test_cli_exits_2_without_traceback(c: Case, in_tmp: Path) -> None:
    for name, text in c.files.items():
        write(in_tmp / name, text)
    result = CliRunner().invoke(main, ["build", *c.args])
    assert result.exit_code == 2, result.output
    assert not isinstance(result.exception, RecipeError) or result.exit_code == 2
    assert "Traceback" not in result.output
    assert result.output.startswith("recipec: error: ")
    assert re.search(c.expect[0].lstrip("^"), result.output), result.output
    assert not (in_tmp / "build").exists(), "nothing is written for a recipe with errors"


def test_real_subprocess_exits_2_without_traceback(tmp_path: Path) -> None:
    write(tmp_path / "r.toml", BASE + "num_layrs = 3\n")
    recipec = Path(sys.executable).with_name("recipec")
    command = [str(recipec)] if recipec.exists() else [sys.executable, "-m", "recipec.compiler.cli"]
    done = subprocess.run([*command, "build", "r.toml"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stdout == ""
    assert "Traceback" not in done.stderr
    assert done.stderr == ("recipec: error: r.toml:4: [model.num_layrs] unknown key `num_layrs` in [model]\n"
                           "   hint: did you mean `num_layers`?\n")


def test_problem_carries_structured_fields(in_tmp: Path) -> None:
    write(in_tmp / "r.toml", BASE + "num_layrs = 3\n")
    with pytest.raises(UnknownKeyError) as info:
        build("r.toml")
    (problem,) = info.value.problems
    assert problem.key == "model.num_layrs"
    assert problem.source is not None and (problem.source.file, problem.source.line) == ("r.toml", 4)
    assert problem.hint == "did you mean `num_layers`?"
