"""One torchrun rank of the TP/PP parity check: Megatron logits of an HF model, loaded (a) straight
from the HF directory and (b) from the dist checkpoint `recipec convert hf-to-mcore` wrote, under
the given layout, compared with transformers' logits. The rank holding the last stage's full
logits writes {"hf_dir": maxdiff, "ckpt": maxdiff} as JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import hfutil  # noqa: E402
from recipec.runtime.hf.convert import cpu_mode, load_hf_into_chunks  # noqa: E402


def forward(chunks: list, toks: torch.Tensor, hidden: int) -> torch.Tensor | None:
    """Full-vocabulary logits on the last stage's TP rank 0, None elsewhere (PP by hand: send/recv)."""
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    (model,) = chunks
    pos = torch.arange(toks.shape[1]).unsqueeze(0).expand_as(toks)
    with torch.no_grad():
        if not ps.is_pipeline_first_stage():
            recv = torch.empty(toks.shape[1], toks.shape[0], hidden)
            dist.recv(recv, src=ps.get_pipeline_model_parallel_prev_rank())
            model.set_input_tensor(recv)
        out = model(toks, pos, None)
        if not ps.is_pipeline_last_stage():
            dist.send(out.contiguous(), dst=ps.get_pipeline_model_parallel_next_rank())
            return None
        logits = gather_from_tensor_model_parallel_region(out)
    return logits if ps.get_tensor_model_parallel_rank() == 0 else None


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--hf-dir", type=Path, required=True)
    p.add_argument("--recipe", type=Path, required=True)
    p.add_argument("--ckpt", type=Path, required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--ep", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--set", action="append", default=[], help="extra recipe override")
    a = p.parse_args()
    cpu_mode()
    dist.init_process_group("gloo")
    from megatron.core import parallel_state, tensor_parallel

    from recipec.runtime import checkpoint as ckpt

    parallel_state.initialize_model_parallel(tensor_model_parallel_size=a.tp, pipeline_model_parallel_size=a.pp,
                                             expert_model_parallel_size=a.ep)
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    layout = (f"parallel.tensor_model_parallel_size={a.tp}", f"parallel.pipeline_model_parallel_size={a.pp}",
              f"parallel.expert_model_parallel_size={a.ep}",
              f"launch.gpus_per_node={max(a.tp * a.pp, a.ep)}", *a.set)
    toks = hfutil.tokens(hfutil.ARCHS_VOCAB(a.hf_dir))
    ref = hfutil.hf_logits(a.hf_dir, toks)
    result = {}
    for source in ("hf_dir", "ckpt"):
        chunks, c, padded = hfutil.megatron_model(a.recipe, layout)
        if source == "hf_dir":
            load_hf_into_chunks(a.hf_dir, chunks, c, padded)
        else:
            ckpt.load_latest(a.ckpt, chunks, None, None, "", with_optimizer=False)
        logits = forward(chunks, toks, c.model.hidden_size)
        if logits is not None:
            result[source] = (logits[..., : ref.shape[-1]] - ref).abs().max().item()
            result[source + "_padded_rows"] = logits[..., ref.shape[-1]:].abs().max().item() if padded > ref.shape[-1] else 0.0
    if result:
        result["layout"] = {"tp": a.tp, "pp": a.pp, "ep": a.ep}
        a.out.write_text(json.dumps(result))
    dist.barrier()
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
