"""[launch] and [peft]: where the job runs, and the adapter finetuning option."""

import attrs

from ..hardware import ACCELERATORS
from ._fields import option


@attrs.frozen
class LaunchConfig:
    """Machines, processes and the scheduler that starts them."""

    nodes: int = option(1, "Machines.", min=1)
    gpus_per_node: int = option(8, "Processes per machine (GPUs; CPU processes without GPU).", min=1)
    executor: str = option("local", "local: torchrun here; slurm: an sbatch job.", choices=("local", "slurm"))
    master_addr: str = option("127.0.0.1", "Rendezvous host for local multi-node runs.")
    master_port: int = option(29500, "Rendezvous port.", min=1, max=65535)
    accelerator: str = option(
        "H100-80GB", "What each process runs on; sets the memory budget and the MFU peak.",
        choices=tuple(ACCELERATORS),
    )
    max_restarts: int = option(0, "torchrun restarts after a failure (resume from checkpoint).", min=0)
    output_dir: str = option("runs/{name}", "Run directory; {name} is the recipe name.")
    slurm_account: str | None = option(None, "SLURM account (-A).")
    slurm_partition: str | None = option(None, "SLURM partition (-p).")
    slurm_time: str = option("04:00:00", "SLURM time limit.")
    slurm_exclusive: bool = option(True, "Ask SLURM for whole nodes.")
    slurm_requeue: bool = option(True, "Requeue after preemption; the run resumes from its checkpoint.")
    preempt_grace_s: int = option(120, "Seconds between the warning signal and the kill.", min=0)
    container_image: str | None = option(None, "Container image for srun (pyxis).")
    container_mounts: tuple[str, ...] = option((), "src:dst mounts for the container.")
    env: dict[str, str] = option({}, "Extra environment variables for every rank.")


@attrs.frozen
class PeftConfig:
    """Parameter-efficient finetuning; only the adapters train."""

    method: str | None = option(None, "Adapter kind; unset for full training.", choices=("lora",))
    lora_rank: int = option(16, "LoRA rank r.", min=1)
    lora_alpha: float = option(32.0, "LoRA scaling alpha (update scaled by alpha / r).", min=0.0)
    lora_dropout: float = option(0.0, "Dropout on the LoRA input.", min=0.0, max=1.0)
    target_modules: tuple[str, ...] = option(
        ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"),
        "Megatron linear layers that get adapters.",
    )
