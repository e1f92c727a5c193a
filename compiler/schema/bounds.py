"""Upper bounds on the numbers a human could mistype.

`num_layers = 2**63-1` pasted from somewhere, `lr = 1e308` for `1e-3`, an extra
digit in `train_iters`: each compiles into a plan whose estimates are nonsense
or whose run dies hours later. Every bound here sits orders of magnitude above
any real model or run (the largest published ones are noted), so a real recipe
never meets one and a mistyped one fails at compile time, naming the key and the
limit. Raising a bound is a one-line change here, if a real model ever needs it.
"""

MAX_LAYERS = 10_000  # transformer layers; the largest published models have ~120-200
MAX_WIDTH = 2**20  # hidden_size, lora_rank (1,048,576); the largest published width is ~25k
MAX_FFN = 4 * MAX_WIDTH  # MLP inner sizes; derived ffn_hidden_size is 4 x hidden_size
MAX_HEADS = 2**16  # heads, query groups, head dim, experts (65,536); real ones are <= 512
MAX_TOKENS = 2**27  # sequence and position lengths (134M tokens); the longest contexts are ~10M
MAX_VOCAB = 2**24  # vocabulary (16.7M); real vocabularies are <= ~260k
MAX_STEPS = 10**12  # iterations, intervals, step numbers; a year at 30 steps/s is ~1e9
MAX_BATCH = 2**30  # sequences per step (global or micro); real global batches are <= ~16k
MAX_RANKS = 2**20  # any parallel size (1M GPUs); the largest clusters have ~100k
MAX_RATE = 10.0  # learning rates and weight decay; real peak rates are <= ~1e-2
MAX_SEED = 2**31 - 1  # numpy seeds must be < 2**32 after Megatron adds per-rank offsets
MAX_WORKERS = 1024  # DataLoader workers per rank
MAX_KEEP = 10**6  # checkpoints kept
MAX_FACTOR = 1e6  # RoPE scaling factor, LoRA alpha, gradient clip: real ones are <= ~128
MAX_THETA = 1e12  # RoPE base; real ones are <= ~1e8
MAX_SMALL = 10.0  # init std, norm epsilon and other numbers that are well below 1 in practice
MAX_LOSS_SCALE = 2.0**64  # fp16 initial loss scale; Megatron's default is 2**32
MAX_NODES = MAX_RANKS  # machines in one job (launch.nodes)
MAX_PROCS_PER_NODE = 4096  # processes per machine; GPU nodes have <= 16, the largest CPU hosts ~1k cores
MAX_RESTARTS = 10**6  # torchrun restarts after a failure; real runs allow a few to ~100
MAX_GRACE_S = 65535  # seconds of warning before a SLURM kill: --signal's limit (sig_time <= 65535)
MAX_ENV_STRING = 128 * 1024  # bytes of one NAME=value environment string, NUL included (Linux MAX_ARG_STRLEN)
