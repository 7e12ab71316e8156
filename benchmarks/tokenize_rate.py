"""Tokenization rate of `seqpar prepare` (seqpar.corpus) on the Python standard library.

Writes the stdlib's .py files (the stdlib corpus's hash order, one JSONL row per file, up to
--max-bytes) to a JSONL file, trains a byte-level BPE tokenizer on it offline (`tokenizers`,
--vocab entries, saved with transformers' save_pretrained), then prepares the corpus into a
fresh cache as UTF-8 bytes and with the tokenizer, with 1 and --workers map processes, and
prints one markdown row per run (documents, tokens, seconds, tokens/s, MB of text/s). The
times include reading the JSONL into Arrow, the map and writing the token file and index (not
importing `datasets`, done once before).

    python3 benchmarks/tokenize_rate.py --workers 2
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sysconfig
import tempfile
from pathlib import Path

from seqpar.corpus import CorpusSpec, prepare_corpus


def stdlib_jsonl(path: Path, max_bytes: int) -> tuple[int, int]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [f for f in root.rglob("*.py") if "site-packages" not in f.parts and f.is_file()]
    files.sort(key=lambda f: hashlib.sha1(f.relative_to(root).as_posix().encode()).hexdigest())
    rows = total = 0
    with open(path, "w") as out:
        for f in files:
            text = f.read_bytes().decode("utf-8", errors="replace")
            if not text.strip():
                continue
            out.write(json.dumps({"text": text, "path": f.relative_to(root).as_posix()}) + "\n")
            rows, total = rows + 1, total + len(text.encode())
            if total >= max_bytes:
                break
    return rows, total


def bpe_tokenizer(corpus: Path, directory: Path, vocab: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = (json.loads(line)["text"] for line in open(corpus))
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel
                                                       .alphabet(), show_progress=False))
    PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(directory)
    return str(directory)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-bytes", type=int, default=16_000_000)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    import datasets  # noqa: F401 - imported before timing (prepare_corpus imports it on first use)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rows, size = stdlib_jsonl(tmp / "stdlib.jsonl", args.max_bytes)
        tokenizer = bpe_tokenizer(tmp / "stdlib.jsonl", tmp / "bpe", args.vocab)
        print(f"stdlib JSONL: {rows} documents, {size / 1e6:.1f} MB; Python {platform.python_version()}, "
              f"{os.cpu_count()} CPUs\n")
        print("| tokenizer | map processes | documents | tokens | seconds | tokens/s | MB/s |")
        print("|---|---|---|---|---|---|---|")
        for name, tok in (("UTF-8 bytes", ""), (f"BPE {args.vocab}", tokenizer)):
            for workers in sorted({1, args.workers}):
                cache = tmp / f"cache-{len(tok)}-{workers}"
                p = prepare_corpus(CorpusSpec(str(tmp / "stdlib.jsonl"), str(cache), tokenizer=tok, workers=workers))
                print(f"| {name} | {workers} | {p.documents:,} | {p.tokens:,} | {p.seconds:.2f} | "
                      f"{p.tokens / p.seconds:,.0f} | {size / 1e6 / p.seconds:.1f} |")


if __name__ == "__main__":
    main()
