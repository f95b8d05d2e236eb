"""ds_gpt: nanoGPT's GPT-2 recipe on DeepSpeed, made to run on SLURM clusters."""

__version__ = "0.1.0"
