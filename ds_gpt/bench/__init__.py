"""Benchmarks that print figures and never pass or fail: `python -m ds_gpt.bench <what>`.

    python -m ds_gpt.bench prepare --num_proc 2   # tokens/s: ours vs nanoGPT's datasets.map
    python -m ds_gpt.bench loader --cold          # batches/s: RandomWindowSampler vs nanoGPT's get_batch, warm and cold
    python -m ds_gpt.bench step --zero_stage 1    # tokens/s and MFU: our DeepSpeed step vs a plain PyTorch loop
    python -m ds_gpt.bench memory --iters 3000    # host RSS over a 3000-iteration run on a 1 GB .bin
    python -m ds_gpt.bench checkpoint --model 124M  # seconds to save and to verify a checkpoint
    python -m ds_gpt.bench recipe --data_dir data/shakespeare  # tokens to a target loss: AdamW vs Muon
    python -m ds_gpt.bench gpu --json gpu.json    # every GPU figure in one ~8-minute run (CUDA only)

Every one takes `--json FILE` and writes its figures there as one JSON object (docs/benchmarks.md).
Each benchmark is a module `ds_gpt/bench/<what>.py` with a function `bench_<what>(args)` and an
`add_<what>(subparsers)` that declares its flags; adding one is that module and one entry in BENCHES.
"""
