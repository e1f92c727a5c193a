"""Reading a Hugging Face safetensors directory as untrusted input.

Used by `recipec convert hf-to-mcore` and by training with `checkpoint.pretrained = HF_DIR`.
Only safetensors are read (never pytorch_model.bin, which is a pickle). The index, the shard
files and the tensors are checked where they are read, and every problem is an HFConvertError
(a RecipeError: one message, exit 2) that names the file and what to do about it.
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from recipec.compiler.errors import RecipeError


class HFConvertError(RecipeError):
    """An HF directory or checkpoint that does not fit the recipe."""


def is_hf_dir(path: str | Path) -> bool:
    """A Hugging Face model directory (config.json + safetensors), not a recipec checkpoint root."""
    p = Path(path)
    return (p / "config.json").is_file() and any(p.glob("*.safetensors"))


class HFReader:
    """Tensor-by-tensor access to a local safetensors model (single file or index).

    Everything in the directory is untrusted input: the index must be a JSON object whose
    `weight_map` maps tensor names to shard files *inside* the directory (a name with `..` or an
    absolute path is refused, not followed), shards must be readable safetensors, and tensors
    floating point. Each problem is an HFConvertError naming the file and what to fix.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_index(index)
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in self.directory.glob("*.safetensors"))
            if not files:
                raise HFConvertError(f"{self.directory} holds no *.safetensors weights (pytorch_model.bin is not read)")
            weight_map = {}
        self._handles = {f: _open_shard(self.directory, f) for f in files}
        if not weight_map:
            for f, h in self._handles.items():
                weight_map.update(dict.fromkeys(h.keys(), f))
        self.weight_map: dict[str, str] = weight_map

    def get(self, name: str) -> torch.Tensor:
        """Tensor `name`; `X[i]` (runtime/hf/mappings.stacked_name) reads only slice i of tensor X."""
        from .mappings import stacked_name

        name, index = stacked_name(name)
        file = self.weight_map.get(name)
        if file is None:
            raise HFConvertError(f"{self.directory}: tensor {name!r} is missing from the safetensors files")
        try:
            if index is None:
                tensor = self._handles[file].get_tensor(name)
            else:
                part = self._handles[file].get_slice(name)
                rows = part.get_shape()[0] if part.get_shape() else 0
                if index >= rows:
                    raise HFConvertError(f"{self.directory / file}: tensor {name!r} stacks {rows} entries along "
                                         f"its first dim, the recipe needs entry {index} (model.num_moe_experts?)")
                tensor = part[index]
        except HFConvertError:
            raise
        except Exception as exc:  # noqa: BLE001 - SafetensorError and the like: the file's fault
            raise HFConvertError(f"{self.directory / file}: tensor {name!r} cannot be read ({exc}); the file is "
                                 "damaged or truncated: download or export it again") from None
        if not tensor.is_floating_point():
            raise HFConvertError(f"{self.directory / file}: tensor {name!r} has dtype {tensor.dtype}; model weights "
                                 "are floating point (is this a quantized or non-model file?)")
        return tensor


def read_index(index: Path) -> dict[str, str]:
    """The weight_map of model.safetensors.index.json: tensor name -> a shard file in the same directory."""
    fix = "re-export the model (save_pretrained writes a valid index), or remove the index for one shard"
    try:
        data = json.loads(index.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise HFConvertError(f"{index} is not UTF-8 text ({exc.reason} at byte {exc.start}); {fix}") from None
    except json.JSONDecodeError as exc:
        raise HFConvertError(f"{index}:{exc.lineno}: not valid JSON ({exc.msg}); {fix}") from None
    except RecursionError:
        raise HFConvertError(f"{index} nests JSON deeper than Python can read; {fix}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise HFConvertError(f"{index}: expected an object with \"weight_map\": {{tensor name: shard file}}; {fix}")
    for name, file in weight_map.items():
        if not _inside(file):
            raise HFConvertError(f"{index}: weight_map[{name!r}] = {file!r} is not a shard file inside "
                                 f"{index.parent}; shards are .safetensors files named relative to the model "
                                 "directory (no '..', no absolute paths): refusing to read outside it")
    return weight_map


def _inside(file: str) -> bool:
    """A relative name that stays inside its directory, read lexically (symlinks inside it, as the HF
    cache's snapshots use, are the directory owner's choice and still allowed)."""
    if not file or "\\" in file or "\0" in file:
        return False
    path = PurePosixPath(file)
    return not path.is_absolute() and ".." not in path.parts and path.suffix == ".safetensors"


def _open_shard(directory: Path, file: str) -> Any:
    from safetensors import safe_open

    path = directory / file
    if not path.is_file():
        raise HFConvertError(f"{path} does not exist, but model.safetensors.index.json names it; the download is "
                             "incomplete: fetch the missing shard")
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # noqa: BLE001 - SafetensorError / OSError: a damaged or foreign file
        raise HFConvertError(f"{path} is not a readable safetensors file ({exc}); download or export it again") from None
