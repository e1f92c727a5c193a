"""recipec runtime: executes compiled recipes on Megatron-Core (device layer, attention, specs)."""
