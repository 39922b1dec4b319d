"""The pooler vocabulary, torch-free: the one place that knows the names and which one is the
prompt [MASK] pooler. Every other module asks :func:`is_prompt` instead of comparing strings.

Training poolers (``pooler`` of a backbone): ``cls`` ([CLS] through the training-only MLP),
``cls_before_pooler``, ``avg``, ``avg_first_last``, ``avg_top2``. Evaluation poolers add
``mask``: the last-layer state at a PromptBERT template's [MASK] (prompt models).
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["HF_POOLERS", "PROMPT_POOLER", "EVAL_POOLERS", "POOLER_FILE", "check", "is_prompt",
           "default_eval_pooler", "needs_hidden_states", "read_model_pooler"]

HF_POOLERS = ("cls", "cls_before_pooler", "avg", "avg_first_last", "avg_top2")
PROMPT_POOLER = "mask"
EVAL_POOLERS = HF_POOLERS + (PROMPT_POOLER,)
POOLER_FILE = "clusterns_pooler.json"  # written next to every exported model
_PROMPT_FILE = "clusterns_prompt.json"  # written next to exported prompt models (clusterns.model.prompt)
_NEEDS_HIDDEN_STATES = ("avg_first_last", "avg_top2")


def check(name: str, choices: tuple[str, ...] = EVAL_POOLERS) -> str:
    """``name`` if it is one of ``choices``; else one error listing them."""
    if name not in choices:
        raise ValueError(f"unknown pooler {name!r}; choose one of {', '.join(choices)}")
    return name


def is_prompt(name: str) -> bool:
    """Whether ``name`` is the prompt [MASK] pooler (the model embeds with its template)."""
    return name == PROMPT_POOLER


def default_eval_pooler(train_pooler: str) -> str:
    """The evaluation pooler of a model trained with ``train_pooler``: [CLS] without the
    training-only MLP for ``cls`` (SimCSE's ``cls_before_pooler``), else the same pooler."""
    return "cls_before_pooler" if train_pooler == "cls" else train_pooler


def needs_hidden_states(name: str) -> bool:
    """Whether the pooler reads intermediate layers (the backbone must return all hidden states)."""
    return name in _NEEDS_HIDDEN_STATES


def read_model_pooler(model_dir: str | Path) -> str | None:
    """The evaluation pooler a model folder declares: ``clusterns_pooler.json`` (every model we
    export), else ``mask`` when it carries a prompt config; None when it says nothing (a hub model)."""
    model_dir = Path(model_dir)
    path = model_dir / POOLER_FILE
    if path.is_file():
        try:
            name = json.loads(path.read_text())["eval_pooler"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a pooler file ({e!r}); re-export the model or pass --pooler") from None
        return check(name)
    if (model_dir / _PROMPT_FILE).is_file():
        return PROMPT_POOLER
    return None
