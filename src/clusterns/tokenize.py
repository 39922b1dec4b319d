"""Tokenization stage: the training sentences as a tokenized HF ``datasets`` cache on disk.

Built once per backbone (tokenizer) and max length and reused by every method and seed.
Only ``input_ids`` are stored (unpadded); the training collator pads each batch dynamically.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from clusterns.utils.files import atomic_path, sha256_file, write_json_atomic

STATS_FILE = "tokenize_stats.json"


def read_sentences(path: str | Path) -> tuple[list[str], dict]:
    """Lines of a UTF-8 text file; blank lines dropped and counted, bad bytes replaced and counted."""
    sentences: list[str] = []
    stats = {"lines": 0, "empty_dropped": 0, "decode_errors": 0}
    with open(path, "rb") as f:
        for raw in f:
            stats["lines"] += 1
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("utf-8", errors="replace")
                stats["decode_errors"] += 1
            text = text.rstrip("\r\n")
            if not text.strip():
                stats["empty_dropped"] += 1
                continue
            sentences.append(text)
    return sentences, stats


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of a tokenizer's vocabulary and special tokens: two caches agree only when built
    with tokenizers that map the same strings to the same ids."""
    import hashlib
    import json

    vocab = sorted(tokenizer.get_vocab().items())
    specials = sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items())
    return hashlib.sha256(json.dumps([vocab, specials]).encode()).hexdigest()


def tokenize_to_disk(model: str | Path, input_path: str | Path, output: str | Path, max_length: int,
                     num_proc: int = 1, batch_size: int = 1000, sentence_only: bool = False) -> dict:
    """Tokenize every sentence and save.

    Default format ``full``: truncated to ``max_length`` tokens, special tokens included.
    ``sentence_only`` (prompt runs): the sentence alone, no special tokens, truncated to
    ``max_length`` sentence tokens; the template is added around it at batch time.
    """
    from datasets import Dataset
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model)
    sentences, stats = read_sentences(input_path)
    if not sentences:
        raise ValueError(f"{input_path} holds no non-empty line; re-fetch the training data")

    def encode(batch):
        if sentence_only:
            from clusterns.model.prompt import sentence_only_ids

            return {"input_ids": sentence_only_ids(tokenizer, batch["text"], max_length)}
        enc = tokenizer(batch["text"], truncation=True, max_length=max_length, add_special_tokens=True)
        return {"input_ids": enc["input_ids"]}

    ds = Dataset.from_dict({"text": sentences})
    ds = ds.map(encode, batched=True, batch_size=batch_size, remove_columns=["text"],
                num_proc=num_proc if num_proc > 1 and len(sentences) >= 10_000 else None,
                desc="tokenize")
    lengths = [len(x) for x in ds["input_ids"]]
    stats.update({
        "sentences": len(ds),
        "truncated": sum(1 for n in lengths if n >= max_length),
        "mean_tokens": sum(lengths) / len(lengths),
        "max_length": max_length,
        "format": "sentence_only" if sentence_only else "full",
        "tokenizer": str(model),
        "tokenizer_class": type(tokenizer).__name__,
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "source": str(input_path),
        "source_sha256": sha256_file(input_path),
        "seconds": round(time.perf_counter() - t0, 2),
    })
    stats["sentences_per_s"] = round(len(ds) / max(stats["seconds"], 1e-9), 1)
    with atomic_path(output) as tmp:
        ds.save_to_disk(str(tmp))
        write_json_atomic(Path(tmp) / STATS_FILE, stats)
    return stats


def load_tokenized(path: str | Path):
    """Open a cache written by this stage, with a clear error when it is missing or incomplete."""
    from datasets import load_from_disk

    path = Path(path)
    if not (path / STATS_FILE).is_file():
        raise FileNotFoundError(
            f"no tokenized cache at {path}; build it first "
            f"(snakemake {path} or python -m clusterns.tokenize --output {path} ...)")
    return load_from_disk(str(path))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clusterns.tokenize", description=__doc__)
    p.add_argument("--model", required=True, help="backbone folder (its tokenizer is used)")
    p.add_argument("--input", required=True, help="text file, one sentence per line")
    p.add_argument("--output", required=True, help="dataset folder to create")
    p.add_argument("--max-length", type=int, default=32)
    p.add_argument("--num-proc", type=int, default=1)
    p.add_argument("--sentence-only", action="store_true",
                   help="prompt runs: sentence tokens only (no special tokens); the template is added per batch")
    args = p.parse_args(argv)
    try:
        stats = tokenize_to_disk(args.model, args.input, args.output, args.max_length, args.num_proc,
                                 sentence_only=args.sentence_only)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"tokenized {stats['sentences']} sentences ({stats['empty_dropped']} empty dropped, "
          f"{stats['decode_errors']} with undecodable bytes, {stats['truncated']} truncated) "
          f"in {stats['seconds']} s -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
