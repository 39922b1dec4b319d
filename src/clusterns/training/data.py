"""Deterministic global batches over the tokenized cache, sharded by process, resumable at any step."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from clusterns.model.packed import token_index
from clusterns.training import TrainingError

__all__ = ["TokenizedSentences", "GlobalBatchSampler", "make_collate", "total_steps", "per_process_batch",
           "load_training_data", "check_tokenizer"]


class TokenizedSentences(torch.utils.data.Dataset):
    """The tokenized cache as a map-style dataset with batched reads (``__getitems__``)."""

    def __init__(self, ds) -> None:
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> list[int]:
        return self.ds[int(i)]["input_ids"]

    def __getitems__(self, indices: list[int]) -> list[list[int]]:
        return self.ds[indices]["input_ids"]


class GlobalBatchSampler:
    """Yields this process' slice of global batch ``step`` for every step from ``start_step``.

    Epoch ``e`` visits the sentences in a permutation drawn from ``seed + e``; the incomplete
    last global batch of an epoch is dropped, so every step has exactly the global batch size.
    """

    def __init__(self, n: int, global_batch: int, rank: int, world: int, seed: int, start_step: int,
                 total_steps: int) -> None:
        self.n, self.global_batch, self.rank, self.world = n, global_batch, rank, world
        self.local = global_batch // world
        self.seed, self.start_step, self.total_steps = seed, start_step, total_steps
        self.steps_per_epoch = n // global_batch
        self._perm: tuple[int, torch.Tensor] | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        if self._perm is None or self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = (epoch, torch.randperm(self.n, generator=g))
        return self._perm[1]

    def global_indices(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        return self.permutation(epoch)[i * self.global_batch:(i + 1) * self.global_batch]

    def __iter__(self):
        for step in range(self.start_step, self.total_steps):
            idx = self.global_indices(step)
            yield idx[self.rank * self.local:(self.rank + 1) * self.local].tolist()

    def __len__(self) -> int:
        return max(0, self.total_steps - self.start_step)


def make_collate(pad_id: int):
    """Right-pad a list of token id lists to the longest one (dynamic padding); ``token_index``
    lists the real tokens' flat positions (for the packed forward, computed here on the CPU)."""

    def collate(batch: list[list[int]]) -> dict[str, torch.Tensor]:
        longest = max(len(x) for x in batch)
        ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), longest), dtype=torch.long)
        for i, x in enumerate(batch):
            ids[i, :len(x)] = torch.tensor(x, dtype=torch.long)
            mask[i, :len(x)] = 1
        return {"input_ids": ids, "attention_mask": mask, "token_index": token_index(mask)}

    return collate


def total_steps(n_sentences: int, global_batch: int, epochs: int, max_steps: int | None) -> int:
    """Steps of the run: full global batches over ``epochs`` epochs, capped by ``max_steps``."""
    per_epoch = n_sentences // global_batch
    if per_epoch == 0:
        raise TrainingError(f"the training data has {n_sentences} sentences, fewer than one global batch "
                            f"of {global_batch}; lower batch_size or use more data")
    steps = per_epoch * epochs
    return min(steps, max_steps) if max_steps else steps


def per_process_batch(global_batch: int, processes: int) -> int:
    """Per-process batch; a global batch not divisible by the process count is refused."""
    if global_batch % processes:
        raise TrainingError(f"global batch size {global_batch} is not divisible by {processes} processes; "
                            f"choose a batch_size that is a multiple of the GPU count")
    return global_batch // processes


def load_training_data(data_dir: Path, sentence_only: bool):
    """The tokenized cache and its statistics; refused when missing, incomplete (fewer rows than
    it recorded, or unreadable) or of the other format."""
    from clusterns.tokenize import STATS_FILE, load_tokenized

    rebuild = f"delete {data_dir} and rebuild it (snakemake {data_dir})"
    try:
        ds = load_tokenized(data_dir)
        stats = json.loads((data_dir / STATS_FILE).read_text())
    except FileNotFoundError as e:
        raise TrainingError(str(e)) from None
    except Exception as e:  # a cut arrow file, bad JSON: datasets/pyarrow raise many kinds
        raise TrainingError(f"the tokenized cache {data_dir} cannot be read ({type(e).__name__}: {e}); "
                            f"{rebuild}") from None
    if "sentences" in stats and len(ds) != stats["sentences"]:
        raise TrainingError(f"the tokenized cache {data_dir} holds {len(ds)} sentences but was written with "
                            f"{stats['sentences']}: it is incomplete; {rebuild}")
    expected = "sentence_only" if sentence_only else "full"
    if stats.get("format", "full") != expected:  # caches written before the format was recorded are full
        raise TrainingError(f"the tokenized cache {data_dir} has format {stats.get('format', 'full')!r} but this "
                            f"run needs {expected!r} (prompt runs use python -m clusterns.tokenize --sentence-only)")
    return ds, stats


def check_tokenizer(data_dir: Path, stats: dict, tokenizer, model_dir) -> None:
    """Refuse a cache tokenized with another tokenizer than the run's backbone's (token ids would
    mean other words); caches written before the fingerprint was recorded are not checked."""
    from clusterns.tokenize import tokenizer_fingerprint

    recorded = stats.get("tokenizer_sha256")
    if recorded is not None and recorded != tokenizer_fingerprint(tokenizer):
        raise TrainingError(f"the tokenized cache {data_dir} was built with another tokenizer "
                            f"({stats.get('tokenizer')}) than the backbone's ({model_dir}); tokenize with this "
                            f"backbone (python -m clusterns.tokenize --model {model_dir} ...)")
