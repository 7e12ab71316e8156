"""`seqpar train`: train a byte-level Llama-style model (or a Hugging Face causal LM,
`--hf-model DIR`, or a DiT on images, `--model dit`) with sequence parallelism.

    seqpar train                                 # 4 local gloo processes, wallfacer, stdlib corpus
    seqpar train --config tiny --steps 50        # a packaged config (src/seqpar/configs/tiny.toml)
    seqpar train --strategy usp --ulysses 2 --layout zigzag --data enwik8
    torchrun --nproc-per-node 8 -m seqpar train --config my.toml   # cluster: NCCL on GPUs

The NCCL/GPU path is written against the same interfaces but has never been run in this
project (no GPU was available); torchrun on CPU (gloo), one or several agents, is tested.

Configuration: defaults < config file (TOML or YAML; flat keys or [model]/[data]/[optim]/
[parallel]/[output] tables) < command-line flags. `train(cfg, group)` is the training loop
on an already-initialised process group (what the launchers and the tests call).

Loss normalisation (each rank back-propagates sum_local * world / C): see train/trainer.py.
"""
from .config import DTYPES, TrainConfig, add_arguments, build_config, config_from_args, load_config
from .launch import launch_local, launch_torchrun, main, prepare
from .trainer import Trainer, loss_and_backward, lr_at, train

__all__ = ["TrainConfig", "Trainer", "train", "load_config", "build_config", "add_arguments", "main",
           "loss_and_backward", "lr_at", "DTYPES", "prepare", "launch_local", "launch_torchrun", "config_from_args"]
