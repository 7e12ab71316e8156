"""`seqpar` command line: train | prepare | plan | verify | export.

Each subcommand lives in its own module exposing `add_arguments(parser)` and
`main(args) -> int`; modules are imported only when their subcommand runs.
"""
from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "train": ("seqpar.train", "train a Llama-style model, a Hugging Face causal LM (--hf-model) or a DiT "
                              "(--model dit) with sequence parallelism (default: local gloo world; "
                              "under torchrun: gloo on CPU, NCCL on GPUs - the NCCL/GPU path has never been run "
                              "in this project, no GPU was available)"),
    "prepare": ("seqpar.prepare", "tokenize a corpus (.jsonl, .json, .parquet, a folder of .txt/.md files, a "
                                  "datasets save_to_disk directory) into seqpar's cache ahead of `seqpar train` "
                                  "(takes train's flags)"),
    "plan": ("seqpar.plan", "rank strategies and degrees by predicted step time and memory"),
    "verify": ("seqpar.verify", "check a strategy's exactness against single-device attention"),
    "export": ("seqpar.export", "write a training run's checkpoint as a Hugging Face model directory"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Parser with every subcommand listed; only `command`'s module is imported for its options."""
    parser = argparse.ArgumentParser(prog="seqpar", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if a in SUBCOMMANDS), None)
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        return int(importlib.import_module(args._module).main(args) or 0)
    except (ValueError, OSError) as e:  # configuration / input errors: one line, no traceback
        print(f"seqpar {args.command}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"seqpar {args.command}: interrupted", file=sys.stderr)
        return 130


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


if __name__ == "__main__":
    sys.exit(main())
