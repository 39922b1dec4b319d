"""Prompt-based ClusterNS: PromptBERT templates, [MASK] pooling and template denoising.

The method is written out in docs/prompt.md (the § numbers below). The pieces, in the order a run
uses them:

* :data:`TEMPLATES` and :class:`Template` (§1.1-§1.2): the per-family template pair and the
  parsed template (prefix ids [BOS]+P, suffix ids S+[EOS], P_ns, S_ns, the template-only
  sequence τ, the mask id), validated so that τ = [BOS] + P_ns + S_ns + [EOS].
* :func:`sentence_only_ids` (§1.3): what a prompt run stores in its tokenized cache: each
  sentence tokenized **alone, without special tokens**, truncated to ``max_len`` (32) tokens.
* :func:`assemble` / :func:`make_prompt_collate` (§1.3-§1.4): [BOS] + P_ns + sent[:32] +
  S_ns + [EOS], right-padded; the template lies outside the truncation, so the [MASK] sits at
  0-based index ``1 + |P_ns| + n + mask_offset`` (= n + 7 = L - 3 for every template here).
  The collate turns B cached sentences into the 2B training rows [view 1 (template 1); view 2
  (template 2)] plus each row's sentence length n.
* :func:`template_deltas` (§2): the template-denoising rows; δ_t(ℓ) is the last-layer
  [MASK] state of τ_t whose suffix is shifted to where an ℓ-token sentence would put it.
* :class:`PromptEncoder` (§3): the training module. ``forward(input_ids, attention_mask,
  lengths=None)`` on the 2B assembled rows returns z = MLP(h_mask - δ_t(n)), δ recomputed
  every forward (R = 50 rows per template, dropout on, gradient flowing); in ``eval()`` mode it
  returns the template-1 [MASK] state, denoised or not, never through the MLP.
* :class:`MaskEncoder` (§1.5, §3): the prompt pooler's batch encoder for the embedding
  runtime (:mod:`clusterns.evaluation.embedding`); protocol ``raw`` is the final-test protocol
  of ``evaluation_prompt.py`` (string-level template, appended period, no denoising, no MLP),
  ``denoised`` the dev-selection protocol (token-level splice, δ_1 with R = 128, no grad),
  ``spliced`` the dev protocol of a run trained without denoising.
* :func:`prompt_config` / :func:`save_prompt_config` / :func:`load_prompt_config`: the
  ``clusterns_prompt.json`` written next to an exported model so the evaluator embeds it with
  the right template and protocol (:meth:`MaskEncoder.from_config`).

Faithfulness choices
--------------------
1. **Template pairs (run_prompt.sh overwrite).** ``run_prompt.sh`` assigns TEMPLATE/TEMPLATE2
   twice, so as written it trains and tests bert-base-uncased with the *RoBERTa* pair; which
   pair produced the released prompt-BERT checkpoints is unknown. We use the per-family pairs
   of :data:`TEMPLATES` (BERT pair for BERT, RoBERTa pair for RoBERTa), which is what
   PromptBERT's ``run.sh`` does and what the script's comment ("originate from PromptBERT")
   intends. The overwrite can still be reproduced on purpose by passing the RoBERTa strings
   with a BERT tokenizer: :meth:`Template.from_string` accepts any template string; the
   family only governs tokenizer-specific handling.
2. **Flag-parsing defaults.** When the template flags are omitted, ``train_prompt.py`` defaults
   *both* templates to RoBERTa template 2 (so even a BERT run silently gets a RoBERTa
   template, in two-template mode); PromptBERT defaults template 2 to ''. We never rely on
   those defaults: a prompt run names its family and gets that family's pair (or explicit
   strings). ``template2=None`` gives single-template mode (both views use template 1, as
   PromptBERT with an empty template 2). Related: ``--enable_hardneg`` cannot be parsed by
   transformers 4.2.1 (only ``--no_enable_hardneg`` exists; effective default True), so the
   objective's ``hard_negatives`` key is set explicitly per run (false for prompt-RoBERTa-base).
3. **RoBERTa position offset.** The sentence pass lets RoBERTa number positions from
   padding_idx + 1 = 2, but the original denoising pass passes explicit positions from 0, so
   for RoBERTa the δ rows sit 2 positions lower than the sentence rows they are subtracted
   from (BERT numbers both from 0). ``roberta_position_offset="original"`` (the default)
   reproduces this, because it is what trained the released numbers;
   ``"fixed"`` starts the δ positions at padding_idx + 1 like the sentence pass. BERT is
   unaffected by the flag.
4. **Constant-δ bug in evaluation_prompt.py.** With ``--mask_embedding_sentence_delta`` that
   script builds its 128 δ rows with *unshifted* positions, so one length-independent vector
   is subtracted from every sentence (PromptBERT fixed this in 093e343; ClusterNS copied the
   pre-fix code). ``run_prompt.sh`` never passes the flag, so the faithful final-test
   protocol is ``mode="raw"`` (no δ at all). Whenever we denoise at evaluation
   (``mode="denoised"``, the dev-selection protocol) δ is shifted per sentence length, as in
   training and in ``sentemb_forward``; the buggy constant-δ variant is not offered. Dev
   sentences longer than 127 tokens, which would index out of range in the original, get
   extra δ rows (rows are independent in eval mode, so the first 128 are unchanged).
5. **Family detection.** The original picks the backbone with a substring test on
   ``--model_name_or_path`` ("roberta" in the path → RoBERTa, else "bert" → BERT), which
   misfires on local paths (a folder named ``my-roberta-distilled-bert``, or one naming
   neither). :func:`detect_family` uses the model config's ``model_type`` (or the tokenizer
   class, or the ``config.json`` in the tokenizer's folder) and refuses anything that is not
   BERT or RoBERTa.
6. **Other guards (no effect on valid inputs).** The two templates' prefix lengths must be
   equal (the original shifts both templates' δ rows by template 1's prefix length; the
   guard raises instead of silently mis-shifting). The identity τ = [BOS] + P_ns + S_ns +
   [EOS] is checked for *both* templates (the original asserts it for template 1 only). The
   [MASK] state is taken by index (1 + |P_ns| + n + mask offset), not by token equality, so a
   training sentence that contains the literal mask string pools the template's [MASK]
   instead of breaking the batch (the original would fail); in ``raw`` mode the *last* mask
   token of each row is used, which is the template's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from clusterns.config import PROMPT_DEFAULTS
from clusterns.poolers import PROMPT_POOLER
from clusterns.model.encoder import MLPHead, check_fits

__all__ = [
    "TEMPLATES", "FAMILIES", "PROTOCOLS", "POSITION_OFFSET_MODES", "PROMPT_CONFIG_FILE",
    "Template", "detect_family", "template_pair", "sentence_only_ids", "assemble", "make_prompt_collate",
    "delta_position_ids", "sentence_position_ids", "denoise_position_offset", "check_prefix_lengths",
    "template_deltas", "PromptEncoder", "MaskEncoder", "format_test_sentence",
    "prompt_config", "save_prompt_config", "load_prompt_config",
]

# §1.1: (template 1 = view 1 and all evaluation, template 2 = view 2), per backbone family.
TEMPLATES: dict[str, tuple[str, str]] = {
    "bert": ('*cls*_This_sentence_of_"*sent_0*"_means*mask*.*sep+*',
             '*cls*_This_sentence_:_"*sent_0*"_means*mask*.*sep+*'),
    "roberta": ("*cls*_This_sentence_:_'_*sent_0*_'_means*mask*.*sep+*",
                "*cls*_The_sentence_:_'_*sent_0*_'_means*mask*.*sep+*"),
}
FAMILIES = tuple(TEMPLATES)
# Evaluation protocols: raw = evaluation_prompt.py as run (final test), denoised = sentemb_forward
# with delta (dev selection), spliced = sentemb_forward without delta.
PROTOCOLS = ("raw", "denoised", "spliced")
POSITION_OFFSET_MODES = ("original", "fixed")
PROMPT_CONFIG_FILE = "clusterns_prompt.json"
PROMPT_CONFIG_FORMAT = 1
_MODEL_TYPES = {"bert": "bert", "roberta": "roberta"}


# ------------------------------------------------------------------------------------------------
# Family detection


def _family_from_model_type(model_type: str | None, where: str) -> str:
    family = _MODEL_TYPES.get(str(model_type))
    if family is None:
        raise ValueError(f"prompt-based ClusterNS supports BERT and RoBERTa backbones; {where} has "
                         f"model_type {model_type!r}")
    return family


def _family_from_dir(path: Path) -> str | None:
    cfg = path / "config.json"
    if not cfg.is_file():
        return None
    return _family_from_model_type(json.loads(cfg.read_text()).get("model_type"), str(cfg))


def detect_family(obj: Any) -> str:
    """``"bert"`` or ``"roberta"`` from a config, a model, a tokenizer or a model folder.

    Order: a family name itself; a folder (its ``config.json`` ``model_type``); anything with a
    ``model_type`` (a config) or a ``config`` (a model); a tokenizer, by its class (``Roberta*``
    / ``Bert*``), else by the ``config.json`` in the folder it was loaded from. Never a
    substring of a path (the original's test; see "Faithfulness choices" 5). Raises ValueError
    for other backbones or when nothing tells.
    """
    if isinstance(obj, str) and obj in FAMILIES:
        return obj
    if isinstance(obj, (str, Path)):
        family = _family_from_dir(Path(obj))
        if family is None:
            raise ValueError(f"cannot tell the backbone family of {obj!s}: no config.json there "
                             f"(give one of {', '.join(FAMILIES)} explicitly)")
        return family
    if hasattr(obj, "model_type"):
        return _family_from_model_type(obj.model_type, type(obj).__name__)
    config = getattr(obj, "config", None)
    if config is not None and hasattr(config, "model_type"):
        return _family_from_model_type(config.model_type, type(obj).__name__)
    names = [c.__name__ for c in type(obj).__mro__]
    if any(n.startswith("Roberta") for n in names):
        return "roberta"
    if any(n.startswith("Bert") for n in names):
        return "bert"
    source = getattr(obj, "name_or_path", None)
    if source and Path(source).is_dir():
        family = _family_from_dir(Path(source))
        if family is not None:
            return family
    raise ValueError(f"cannot tell whether {type(obj).__name__} is a BERT or RoBERTa tokenizer/model; "
                     f"pass family= one of {', '.join(FAMILIES)}")


# ------------------------------------------------------------------------------------------------
# Templates


def _split_template(template: str, mask_token: str) -> tuple[str, str]:
    """§1.2 steps 1-3: substitutions, split at the sentence, ``_`` -> space (no stripping)."""
    if " " in template:
        raise ValueError(f"template {template!r} contains a literal space; write spaces as '_'")
    if template.count("*sent_0*") != 1:
        raise ValueError(f"template {template!r} must contain *sent_0* exactly once")
    if template.count("*mask*") != 1:
        raise ValueError(f"template {template!r} must contain *mask* exactly once")
    if template.index("*mask*") < template.index("*sent_0*"):
        raise ValueError(f"template {template!r}: *mask* must follow *sent_0* (denoising shifts the suffix)")
    text = (template.replace("*mask*", mask_token).replace("*sep+*", "").replace("*cls*", "")
            .replace("*sent_0*", " "))
    prefix, suffix = text.split(" ")
    return prefix.replace("_", " "), suffix.replace("_", " ")


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


@dataclass(frozen=True)
class Template:
    """A parsed PromptBERT template (§1.2) for one tokenizer.

    ``prefix_ids`` = [BOS] + P_ns, ``suffix_ids`` = S_ns + [EOS], ``tau`` = the template-only
    sequence encode(P + S) with special tokens (= [BOS] + P_ns + S_ns + [EOS], checked).
    ``mask_offset`` is the [MASK]'s index inside S_ns; ``family`` the tokenizer's family.
    """

    template: str
    family: str
    mask_token: str
    prefix_text: str
    suffix_text: str
    prefix_ids: tuple[int, ...]
    suffix_ids: tuple[int, ...]
    prefix_ns: tuple[int, ...]
    suffix_ns: tuple[int, ...]
    tau: tuple[int, ...]
    mask_id: int
    bos_id: int
    eos_id: int
    pad_id: int

    @classmethod
    def from_string(cls, template: str, tokenizer, family: str | None = None) -> "Template":
        """Parse ``template`` with ``tokenizer`` (family detected from it unless given).

        RoBERTa: the prefix text is ``.strip()``-ed (§1.2 step 4); BERT keeps the leading space
        (its tokenizer ignores it). Raises ValueError when the template is malformed or the
        tokenizer does not reproduce τ = [BOS] + P_ns + S_ns + [EOS].
        """
        family = detect_family(family if family is not None else tokenizer)
        mask_token, mask_id = tokenizer.mask_token, tokenizer.mask_token_id
        if mask_token is None or mask_id is None:
            raise ValueError(f"{type(tokenizer).__name__} has no mask token; a prompt model needs one")
        if tokenizer.pad_token_id is None:
            raise ValueError(f"{type(tokenizer).__name__} has no pad token")
        specials = _ids(tokenizer, "", True)
        if len(specials) != 2:
            raise ValueError(f"the tokenizer encodes '' as {specials}; expected [BOS, EOS]")
        bos, eos = specials
        prefix_text, suffix_text = _split_template(template, mask_token)
        if family == "roberta":
            prefix_text = prefix_text.strip()
        prefix_ids = _ids(tokenizer, prefix_text, True)[:-1]
        suffix_ids = _ids(tokenizer, suffix_text, True)[1:]
        p_ns = _ids(tokenizer, prefix_text, False)
        s_ns = _ids(tokenizer, suffix_text, False)
        tau = _ids(tokenizer, prefix_text + suffix_text, True)
        show = lambda ids: tokenizer.convert_ids_to_tokens(list(ids))  # noqa: E731
        problems = []
        if prefix_ids != [bos] + p_ns:
            problems.append(f"prefix ids {show(prefix_ids)} != [BOS] + P_ns {show([bos] + p_ns)}")
        if suffix_ids != s_ns + [eos]:
            problems.append(f"suffix ids {show(suffix_ids)} != S_ns + [EOS] {show(s_ns + [eos])}")
        if tau != [bos] + p_ns + s_ns + [eos]:
            problems.append(f"template-only ids {show(tau)} != [BOS] + P_ns + S_ns + [EOS] "
                            f"{show([bos] + p_ns + s_ns + [eos])} (|τ| = {len(tau)}, "
                            f"|P_ns| + |S_ns| + 2 = {len(p_ns) + len(s_ns) + 2})")
        if s_ns.count(mask_id) != 1 or mask_id in p_ns:
            problems.append(f"the mask token must occur once, in the suffix: P_ns {show(p_ns)}, S_ns {show(s_ns)}")
        if problems:
            raise ValueError(f"template {template!r} does not tokenize consistently with "
                             f"{type(tokenizer).__name__} ({family}): " + "; ".join(problems))
        return cls(template=template, family=family, mask_token=mask_token, prefix_text=prefix_text,
                   suffix_text=suffix_text, prefix_ids=tuple(prefix_ids), suffix_ids=tuple(suffix_ids),
                   prefix_ns=tuple(p_ns), suffix_ns=tuple(s_ns), tau=tuple(tau), mask_id=int(mask_id),
                   bos_id=int(bos), eos_id=int(eos), pad_id=int(tokenizer.pad_token_id))

    @property
    def length(self) -> int:
        """T = |τ| = number of template tokens in every assembled row (10 for all TEMPLATES)."""
        return len(self.tau)

    @property
    def mask_offset(self) -> int:
        """Index of the [MASK] inside S_ns (2 for all TEMPLATES)."""
        return self.suffix_ns.index(self.mask_id)

    @property
    def tau_mask_index(self) -> int:
        """Index of the [MASK] in τ (the n = 0 row)."""
        return 1 + len(self.prefix_ns) + self.mask_offset

    def mask_index(self, n: int) -> int:
        """0-based [MASK] index in an assembled row with n sentence tokens (n + 7 = L - 3 here)."""
        return self.tau_mask_index + n

    @property
    def tail(self) -> int:
        """Distance of the [MASK] from the row's end: index = L - tail (3 for all TEMPLATES)."""
        return len(self.suffix_ids) - self.mask_offset


def template_pair(tokenizer, family: str | None = None, templates: Sequence[str | None] | None = None
                  ) -> tuple[Template, Template | None]:
    """Parse (template 1, template 2) for ``tokenizer``: the family's :data:`TEMPLATES` pair by
    default; ``templates`` overrides them (template 2 ``None`` or '' = single-template mode)."""
    family = detect_family(family if family is not None else tokenizer)
    t1, t2 = templates if templates is not None else TEMPLATES[family]
    first = Template.from_string(t1, tokenizer, family)
    second = Template.from_string(t2, tokenizer, family) if t2 else None
    if second is not None:
        check_prefix_lengths(first, second)
    return first, second


def check_prefix_lengths(template1: Template, template2: Template) -> None:
    """Refuse two templates whose prefixes differ in length (the original shifts both templates'
    δ rows by template 1's prefix length, which is only right when they are equal)."""
    if len(template1.prefix_ns) != len(template2.prefix_ns):
        raise ValueError(
            f"template prefixes differ in length ({len(template1.prefix_ns)} tokens in {template1.template!r}, "
            f"{len(template2.prefix_ns)} in {template2.template!r}); the original denoising shifts both by "
            "template 1's prefix length, so such a pair would be mis-denoised. Use templates with equal prefixes")


# ------------------------------------------------------------------------------------------------
# Token assembly (training layout and the dev-evaluation splice)


def sentence_only_ids(tokenizer, sentences: Sequence[str], max_len: int | None = 32) -> list[list[int]]:
    """Each sentence tokenized alone, **without** special tokens, cut to its first ``max_len``
    tokens (None: no cut). This is what a prompt run's tokenized cache stores (§1.3).

    RoBERTa: the first word gets no ``Ġ`` (it is tokenized alone), as in the original training.
    """
    sentences = list(sentences)
    if not sentences:
        return []
    if max_len is None:
        enc = tokenizer(sentences, add_special_tokens=False, verbose=False)
    else:
        enc = tokenizer(sentences, add_special_tokens=False, truncation=True, max_length=int(max_len))
    return [list(x) for x in enc["input_ids"]]


def _row(sentence: Sequence[int], template: Template, max_len: int | None) -> list[int]:
    sent = list(sentence) if max_len is None else list(sentence)[:max_len]
    return list(template.prefix_ids) + sent + list(template.suffix_ids)


def _pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max((len(r) for r in rows), default=0)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
    return ids, mask


def assemble(sentence_ids_list: Sequence[Sequence[int]], template: Template,
             max_len: int | None = None) -> tuple[Tensor, Tensor]:
    """[BOS] + P_ns + sent[:max_len] + S_ns + [EOS] per sentence, right-padded to the longest row.

    ``sentence_ids_list`` holds sentence-only ids (:func:`sentence_only_ids`); ``max_len`` cuts
    the *sentence* tokens only (None: no cut, the dev-evaluation splice), so the template is
    always intact. Returns ``(input_ids, attention_mask)``; row i has n_i = min(len, max_len)
    sentence tokens and its [MASK] at ``template.mask_index(n_i)``.
    """
    return _pad([_row(s, template, max_len) for s in sentence_ids_list], template.pad_id)


def make_prompt_collate(template1: Template, template2: Template | None = None, max_len: int | None = 32):
    """Collate for prompt training: B cached sentence-only id lists -> the 2B training rows.

    Returns ``{"input_ids", "attention_mask", "lengths"}`` with rows [:B] = view 1 (template 1)
    and rows [B:] = view 2 (template 2; template 1 again when ``template2`` is None), right-padded
    to the longest of the 2B rows, and ``lengths`` = each row's sentence length n (after the
    ``max_len`` cut). Feed the whole dict to :class:`PromptEncoder` (``model(**batch)``).
    """
    second = template2 or template1
    if second.pad_id != template1.pad_id:
        raise ValueError("the two templates come from tokenizers with different pad ids")
    if template2 is not None:
        check_prefix_lengths(template1, template2)

    def collate(batch: list[list[int]]) -> dict[str, Tensor]:
        sents = [list(s) if max_len is None else list(s)[:max_len] for s in batch]
        rows = [_row(s, template1, None) for s in sents] + [_row(s, second, None) for s in sents]
        ids, mask = _pad(rows, template1.pad_id)
        lengths = torch.tensor([len(s) for s in sents] * 2, dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "lengths": lengths}

    return collate


# ------------------------------------------------------------------------------------------------
# Template denoising


def _padding_idx(backbone) -> int:
    emb = getattr(backbone, "embeddings", None)
    idx = getattr(emb, "padding_idx", None)
    if idx is None:
        idx = backbone.config.pad_token_id
    return int(idx)


def denoise_position_offset(backbone, mode: str = "original") -> int:
    """First position id of the δ rows for ``backbone``.

    BERT: 0 (its sentence pass numbers positions from 0 as well). RoBERTa: ``"original"`` -> 0,
    as the original denoising pass (2 below the sentence pass, which RoBERTa numbers from
    padding_idx + 1); ``"fixed"`` -> padding_idx + 1 (= 2), matching the sentence pass.
    """
    if mode not in POSITION_OFFSET_MODES:
        raise ValueError(f"unknown roberta_position_offset {mode!r}; choose one of {', '.join(POSITION_OFFSET_MODES)}")
    if detect_family(backbone) == "roberta" and mode == "fixed":
        return _padding_idx(backbone) + 1
    return 0


def delta_position_ids(template: Template, rows: int, prefix_len: int | None = None,
                       position_offset: int = 0) -> Tensor:
    """Position ids of the R δ rows (§2): p_j = j for j <= prefix_len (BOS and prefix), p_j = j + ℓ
    for the suffix and EOS of row ℓ; all plus ``position_offset``. ``prefix_len`` defaults to
    |P_ns| of ``template``. Shape (rows, T), long."""
    prefix_len = len(template.prefix_ns) if prefix_len is None else int(prefix_len)
    j = torch.arange(template.length, dtype=torch.long)
    shift = torch.arange(rows, dtype=torch.long).unsqueeze(1) * (j > prefix_len).long().unsqueeze(0)
    return j.unsqueeze(0) + shift + int(position_offset)


def sentence_position_ids(input_ids: Tensor, attention_mask: Tensor, family: str, padding_idx: int = 1) -> Tensor:
    """The position ids the backbone itself gives right-padded rows (no explicit positions):
    BERT 0, 1, 2, ...; RoBERTa padding_idx + 1, padding_idx + 2, ... on non-pad tokens and
    padding_idx on pads (transformers' ``create_position_ids_from_input_ids``). For checks."""
    family = detect_family(family)
    if family == "bert":
        return torch.arange(input_ids.shape[1], dtype=torch.long).expand_as(input_ids)
    keep = input_ids.ne(padding_idx).long()
    return torch.cumsum(keep, dim=1) * keep + padding_idx


def template_deltas(backbone, template: Template, rows: int, prefix_len_from: Template | None = None,
                    position_offset: int = 0) -> Tensor:
    """δ_t(ℓ) for ℓ = 0..rows-1: last-layer hidden state at the [MASK] of R copies of τ_t whose
    suffix/EOS positions are shifted by ℓ (:func:`delta_position_ids`), all-ones attention,
    default token types. Returns (rows, H).

    Runs in whatever mode the caller set: in training dropout is on and gradient flows into the
    backbone (no ``no_grad`` here); wrap it in ``torch.no_grad()`` / ``inference_mode()`` at
    evaluation. ``prefix_len_from`` is the template whose prefix length sets the shift (the
    original uses template 1's for both templates); it must equal ``template``'s, else
    ValueError. ``position_offset``: see :func:`denoise_position_offset`.
    """
    if rows < 1:
        raise ValueError(f"need at least one δ row, got {rows}")
    ref = prefix_len_from or template
    if ref is not template:
        check_prefix_lengths(ref, template)
    device = _param_device(backbone)
    ids = torch.tensor(template.tau, dtype=torch.long, device=device).expand(rows, -1)
    pos = delta_position_ids(template, rows, len(ref.prefix_ns), position_offset).to(device)
    out = backbone(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=pos, return_dict=True)
    return out.last_hidden_state[:, template.tau_mask_index]


def _param_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


# ------------------------------------------------------------------------------------------------
# The training module


class PromptEncoder(nn.Module):
    """Prompt-based sentence encoder with the training loop's call interface.

    ``forward(input_ids, attention_mask, lengths=None)`` takes rows assembled by
    :func:`make_prompt_collate` / :func:`assemble` (right-padded; ``lengths`` = sentence tokens n
    per row, else n = attention_mask.sum - T).

    * ``train()`` mode: 2N rows = [view 1 (template 1); view 2 (template 2)]; h = last-layer
      state at each row's [MASK]; with ``denoise`` h̃ = h - δ_t(n) where δ_1, δ_2 are recomputed
      every forward by :func:`template_deltas` (``delta_rows`` = 50 rows, dropout on, with
      gradient); z = MLP(h̃) (dense + tanh, N(0, 0.02), zero bias). Returns z (2N, H).
    * ``eval()`` mode: every row is template 1; returns h̃ (``denoise``: δ_1 with
      max(``eval_delta_rows``, n_max + 1) rows) or h; never the MLP. Grad mode is the caller's.

    ``template2=None``: single-template mode (both views use template 1, one δ pass).
    """

    pooler = PROMPT_POOLER
    eval_pooler = PROMPT_POOLER

    def __init__(self, backbone: nn.Module, template1: Template, template2: Template | None = None, *,
                 denoise: bool = PROMPT_DEFAULTS["denoise"], delta_rows: int = PROMPT_DEFAULTS["delta_rows"],
                 eval_delta_rows: int = PROMPT_DEFAULTS["eval_delta_rows"],
                 roberta_position_offset: str = PROMPT_DEFAULTS["roberta_position_offset"],
                 max_len: int | None = 32, mlp: bool = True) -> None:
        super().__init__()
        family = detect_family(backbone)
        for t in (template1, template2):
            if t is not None and t.family != family:
                raise ValueError(f"template {t.template!r} was parsed for a {t.family} tokenizer but the backbone is {family}")
        if template2 is not None:
            check_prefix_lengths(template1, template2)
        if denoise and max_len is not None and max_len >= delta_rows:
            raise ValueError(f"delta_rows ({delta_rows}) must exceed max_len ({max_len}): δ(n) is needed for n <= max_len")
        self.backbone = backbone
        self.family = family
        self.template1, self.template2 = template1, template2
        self.denoise = bool(denoise)
        self.delta_rows, self.eval_delta_rows = int(delta_rows), int(eval_delta_rows)
        self.roberta_position_offset = roberta_position_offset
        self.position_offset = denoise_position_offset(backbone, roberta_position_offset)
        self.max_len = max_len
        self.mlp = MLPHead(backbone.config.hidden_size) if mlp else None

    @property
    def eval_protocol(self) -> str:
        """The dev-selection protocol matching this model (what ``sentemb_forward`` would do)."""
        return "denoised" if self.denoise else "spliced"

    def deltas(self, template: Template, rows: int) -> Tensor:
        """δ rows for ``template`` with this model's backbone and position offset."""
        return template_deltas(self.backbone, template, rows, prefix_len_from=self.template1,
                               position_offset=self.position_offset)

    def mask_states(self, input_ids: Tensor, attention_mask: Tensor, lengths: Tensor | None = None,
                    token_type_ids: Tensor | None = None) -> Tensor:
        """h̃ (or h without ``denoise``) for every row, in the current mode's row layout (no MLP)."""
        n_rows = input_ids.shape[0]
        if self.training:
            if n_rows % 2:
                raise ValueError(f"training batches hold 2B rows (view 1 then view 2); got {n_rows} rows")
            half = n_rows // 2
            second = self.template2 or self.template1
            plan = [(self.template1, 0, half), (second, half, n_rows)]
            if second is self.template1:
                plan = [(self.template1, 0, n_rows)]
        else:
            plan = [(self.template1, 0, n_rows)]
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "return_dict": True}
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        last = self.backbone(**kwargs).last_hidden_state
        total = attention_mask.sum(dim=1)
        states = []
        for template, lo, hi in plan:
            n = lengths[lo:hi].to(last.device) if lengths is not None else total[lo:hi] - template.length
            idx = n + template.tau_mask_index
            h = last[lo:hi].gather(1, idx.view(-1, 1, 1).expand(-1, 1, last.shape[-1])).squeeze(1)
            if self.denoise:
                if self.training:
                    rows = self.delta_rows
                else:
                    rows = max(self.eval_delta_rows, int(n.max()) + 1) if n.numel() else self.eval_delta_rows
                delta = self.deltas(template, rows)
                h = h - delta.index_select(0, n)
            states.append(h)
        return torch.cat(states, dim=0) if len(states) > 1 else states[0]

    def forward(self, input_ids: Tensor, attention_mask: Tensor, lengths: Tensor | None = None,
                token_type_ids: Tensor | None = None) -> Tensor:
        """Training: z = MLP(h̃) for the 2B rows. Evaluation: h̃ (or h) of template 1, no MLP."""
        h = self.mask_states(input_ids, attention_mask, lengths, token_type_ids)
        if self.training and self.mlp is not None:
            return self.mlp(h)
        return h

    def mask_encoder(self, tokenizer, protocol: str | None = None) -> "MaskEncoder":
        """The :class:`MaskEncoder` of this model's backbone and template 1 for dev selection
        (``protocol`` defaults to :attr:`eval_protocol`)."""
        return MaskEncoder(self.backbone, tokenizer, self.template1, protocol or self.eval_protocol,
                           delta_rows=self.eval_delta_rows, roberta_position_offset=self.roberta_position_offset)

    def config_dict(self, test_protocol: str = "raw") -> dict:
        """:func:`prompt_config` for exporting this model (final test protocol ``test_protocol``)."""
        return prompt_config(self.family, (self.template1.template, self.template2.template if self.template2 else None),
                             test_protocol, dev_protocol=self.eval_protocol, delta_rows=self.eval_delta_rows,
                             roberta_position_offset=self.roberta_position_offset, max_seq_length=self.max_len)


# ------------------------------------------------------------------------------------------------
# Evaluation embedders


def format_test_sentence(template: str, sentence: str, mask_token: str) -> str:
    """The final-test input text of ``evaluation_prompt.py`` (§1.5): template with ``*mask*`` ->
    mask token, ``_`` -> space, ``*sep+*``/``*cls*`` deleted; the sentence gets a final "." unless
    it is empty or ends in . ? " '; substituted for ``*sent 0*``; the whole string stripped."""
    text = template.replace("*mask*", mask_token).replace("_", " ").replace("*sep+*", "").replace("*cls*", "")
    if sentence and sentence[-1] not in ".?\"'":
        sentence = sentence + "."
    return text.replace("*sent 0*", sentence).strip()


def _as_template(template, tokenizer) -> Template:
    if isinstance(template, Template):
        return template
    if isinstance(template, str) and template in FAMILIES:
        return Template.from_string(TEMPLATES[template][0], tokenizer, template)
    if isinstance(template, str):
        return Template.from_string(template, tokenizer)
    raise TypeError(f"expected a Template, a template string or a family name, got {type(template).__name__}")


class MaskEncoder:
    """Template 1's [MASK] embedding with one of :data:`PROTOCOLS`, batch by batch: the batch
    encoder the embedding runtime (:class:`clusterns.evaluation.embedding.Embedder`) runs for the
    prompt pooler (eval mode, no gradient, no MLP, length-sorted batches are the runtime's).

    ``raw``: the string-level template (:func:`format_test_sentence`), tokenized with special
    tokens and batch padding, no truncation; the last-layer state at the row's (last) mask token;
    no δ. ``denoised``: sentence tokens (no special tokens, no truncation) spliced into [BOS] +
    P_ns + s + S_ns + [EOS]; [MASK] state minus δ_1(n) with max(``delta_rows``, n_max + 1) rows,
    computed once per call (rows are independent in eval mode, so this equals per-batch
    recomputation). ``spliced``: the same splice without δ.

    ``max_length`` (None: no cut, the STS protocol) cuts each *sentence* to its first
    ``max_length`` tokens, tokenized alone, before the template goes around it, so the template
    is always whole (the clustering protocol's 128-token cut). ``raw`` cuts the sentence string at
    the end of that token, then formats it.
    """

    def __init__(self, backbone, tokenizer, template, protocol: str = PROMPT_DEFAULTS["test_protocol"], *,
                 delta_rows: int = PROMPT_DEFAULTS["eval_delta_rows"],
                 roberta_position_offset: str = PROMPT_DEFAULTS["roberta_position_offset"],
                 max_length: int | None = None) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown prompt protocol {protocol!r}; choose one of {', '.join(PROTOCOLS)}")
        if roberta_position_offset not in POSITION_OFFSET_MODES:
            raise ValueError(f"unknown roberta_position_offset {roberta_position_offset!r}")
        self.template = _as_template(template, tokenizer)
        if detect_family(backbone) != self.template.family:
            raise ValueError(f"template parsed for {self.template.family} but the backbone is {detect_family(backbone)}")
        self.model, self.tokenizer, self.protocol = backbone, tokenizer, protocol
        self.delta_rows, self.roberta_position_offset = int(delta_rows), roberta_position_offset
        self.max_length = None if max_length is None else int(max_length)
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be a positive number of tokens, got {max_length}")
        self.hidden_size = backbone.config.hidden_size
        self._delta: Tensor | None = None

    @classmethod
    def from_config(cls, backbone, tokenizer, config: Mapping[str, Any] | None = None,
                    protocol: str | None = None, max_length: int | None = None) -> "MaskEncoder":
        """From a ``clusterns_prompt.json`` content (None: the backbone family's template pair with
        the default protocol, as for released prompt checkpoints); ``protocol`` overrides the
        stored test protocol; ``max_length`` cuts the sentences."""
        if config is None:
            family = detect_family(backbone)
            config = prompt_config(family, TEMPLATES[family])
        template = Template.from_string(config["template"], tokenizer, config["family"])
        return cls(backbone, tokenizer, template, protocol or config["protocol"], delta_rows=config["delta_rows"],
                   roberta_position_offset=config["roberta_position_offset"], max_length=max_length)

    def prepare(self, texts: list[str]) -> tuple[list, list[int]]:
        if self.protocol == "raw":
            if self.max_length is not None:
                texts = self._cut_strings(texts)
            items = [format_test_sentence(self.template.template, s, self.template.mask_token) for s in texts]
            return items, [len(ids) for ids in self.tokenizer(items, verbose=False)["input_ids"]]
        items = sentence_only_ids(self.tokenizer, texts, max_len=self.max_length)
        return items, [len(ids) for ids in items]

    def _cut_strings(self, texts: list[str]) -> list[str]:
        """Each text up to the end of its ``max_length``-th token (tokenized alone)."""
        if not getattr(self.tokenizer, "is_fast", False):
            raise ValueError("cutting prompt inputs needs a fast tokenizer (character offsets)")
        enc = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        return [t if len(spans) <= self.max_length else t[:spans[self.max_length - 1][1]]
                for t, spans in zip(texts, enc["offset_mapping"])]

    def setup(self, lengths: list[int], device: torch.device) -> None:
        t = self.template
        longest = max(lengths, default=0)
        if self.protocol != "raw":  # lengths are sentence tokens; the row adds the template
            longest += len(t.prefix_ids) + len(t.suffix_ids)
        fix = ("cut the sentences (the clustering stage's max_length)" if self.max_length is None
               else "lower max_length") + " or use a backbone with more positions"
        check_fits(longest, self.model, self.tokenizer, fix)
        self._delta = None
        if self.protocol == "denoised":
            offset = denoise_position_offset(self.model, self.roberta_position_offset)
            rows = max(self.delta_rows, max(lengths) + 1)
            self._delta = template_deltas(self.model, self.template, rows, position_offset=offset).float()

    def encode(self, items: list, device: torch.device) -> Tensor:
        t = self.template
        if self.protocol == "raw":
            enc = self.tokenizer(items, padding=True, return_tensors="pt")
            enc = {k: v.to(device) for k, v in enc.items()}
            last = self.model(**enc, return_dict=True).last_hidden_state
            ids = enc["input_ids"]
            where = torch.arange(ids.shape[1], device=device).expand_as(ids)
            pos = torch.where(ids == t.mask_id, where, torch.full_like(where, -1)).max(dim=1).values
            if bool((pos < 0).any()):
                raise ValueError("a formatted sentence lost its mask token (truncated by the tokenizer?)")
            return last[torch.arange(len(items), device=device), pos].float()
        ids, mask = assemble(items, t)
        ids, mask = ids.to(device), mask.to(device)
        last = self.model(input_ids=ids, attention_mask=mask, return_dict=True).last_hidden_state
        n = torch.tensor([len(x) for x in items], dtype=torch.long, device=device)
        h = last[torch.arange(len(items), device=device), n + t.tau_mask_index].float()
        return h if self._delta is None else h - self._delta.index_select(0, n)


# ------------------------------------------------------------------------------------------------
# Export metadata


def prompt_config(family: str, templates: Sequence[str | None], protocol: str = PROMPT_DEFAULTS["test_protocol"], *,
                  dev_protocol: str = "denoised", delta_rows: int = PROMPT_DEFAULTS["eval_delta_rows"],
                  roberta_position_offset: str = PROMPT_DEFAULTS["roberta_position_offset"],
                  max_seq_length: int | None = 32) -> dict:
    """The ``clusterns_prompt.json`` content for an exported prompt model.

    ``protocol`` is the test-time embedding (``raw`` = the paper's evaluation_prompt.py run),
    ``dev_protocol`` the one used for checkpoint selection; ``templates`` = (template 1,
    template 2 or None). The evaluator embeds with template 1.
    """
    family = detect_family(family)
    t1, t2 = (list(templates) + [None])[:2]
    for p in (protocol, dev_protocol):
        if p not in PROTOCOLS:
            raise ValueError(f"unknown prompt protocol {p!r}; choose one of {', '.join(PROTOCOLS)}")
    if roberta_position_offset not in POSITION_OFFSET_MODES:
        raise ValueError(f"unknown roberta_position_offset {roberta_position_offset!r}")
    if not isinstance(t1, str) or not t1:
        raise ValueError("prompt_config needs template 1 as a string")
    return {"format": PROMPT_CONFIG_FORMAT, "pooler": PROMPT_POOLER, "family": family, "template": t1,
            "template2": t2 or None, "protocol": protocol, "dev_protocol": dev_protocol,
            "delta_rows": int(delta_rows), "roberta_position_offset": roberta_position_offset,
            "max_seq_length": max_seq_length}


def save_prompt_config(model_dir: str | Path, config: Mapping[str, Any]) -> Path:
    """Write ``config`` (from :func:`prompt_config`) as ``model_dir/clusterns_prompt.json``."""
    from clusterns.utils.files import write_json_atomic

    path = Path(model_dir) / PROMPT_CONFIG_FILE
    write_json_atomic(path, _validated(dict(config), str(path)))
    return path


def _validated(cfg: dict, where: str) -> dict:
    required = {"format", "pooler", "family", "template", "protocol"}
    missing = required - set(cfg)
    if missing:
        raise ValueError(f"{where}: missing keys {sorted(missing)}")
    if cfg["format"] != PROMPT_CONFIG_FORMAT or cfg["pooler"] != PROMPT_POOLER:
        raise ValueError(f"{where}: unsupported prompt config (format {cfg['format']!r}, pooler {cfg['pooler']!r})")
    optional = {k: cfg[k] for k in ("dev_protocol", "delta_rows", "roberta_position_offset", "max_seq_length")
                if k in cfg}  # files of older versions lack some: the defaults apply
    return prompt_config(cfg["family"], (cfg["template"], cfg.get("template2")), cfg["protocol"], **optional)


def load_prompt_config(model_dir: str | Path) -> dict | None:
    """``model_dir/clusterns_prompt.json`` validated, or None when the model is not a prompt model."""
    path = Path(model_dir) / PROMPT_CONFIG_FILE
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e})") from None
    return _validated(cfg, str(path))
