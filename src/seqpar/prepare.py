"""`seqpar prepare`: tokenize a corpus ahead of a run (a large corpus, or a cluster job that should
not spend its first minutes tokenizing).

    seqpar prepare --data corpus.jsonl --tokenizer tok/ --data-cache /data/cache --data-workers 16
    seqpar train --data corpus.jsonl --tokenizer tok/ --data-cache /data/cache ...   # reads the cache

It takes `seqpar train`'s flags (a --config too), so the same flags name the same cache entry:
--data, --text-field, --tokenizer (or --hf-model's tokenizer), --data-cache (default
<out_dir>/data); the model's vocabulary (--vocab-size or --hf-model) is checked against the
tokenizer's. See seqpar.corpus.
"""
from __future__ import annotations

import argparse
import sys

from .corpus import corpus_kind
from .train.config import add_arguments as _train_arguments
from .train.config import config_from_args
from .train.tasks import prepared_corpus

__all__ = ["add_arguments", "main"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _train_arguments(parser)


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    if not cfg.data.data or corpus_kind(cfg.data.data) is None:
        raise ValueError("seqpar prepare needs --data with a corpus: .jsonl, .json, .parquet, a folder of .txt/.md "
                         "files or a save_to_disk directory")
    cfg.data.validate()
    cfg.model.validate()
    prepared = prepared_corpus(cfg)
    print(f"seqpar prepare: {prepared.describe(cfg.data.data)}", file=sys.stderr)
    print(prepared.path)
    return 0
