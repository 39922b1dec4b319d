"""Export of a trained encoder: the HF model folder (no training MLP) plus the files that make it
describe itself (``clusterns_pooler.json``, ``clusterns_prompt.json`` for prompt models) and the
sentence-transformers module files."""

from __future__ import annotations

from pathlib import Path

from clusterns import poolers
from clusterns.model.encoder import input_limit
from clusterns.utils.files import write_json_atomic

__all__ = ["export_model"]

_ST_POOLING = {"cls_before_pooler": "pooling_mode_cls_token", "avg": "pooling_mode_mean_tokens"}


def export_model(backbone, tokenizer, out_dir: Path, eval_pooler: str, prompt_config: dict | None = None) -> None:
    """Save the encoder (no training MLP) in HF format plus sentence-transformers module files.

    ``SentenceTransformer(out_dir)`` then embeds with the evaluation pooler (CLS token for
    ``cls_before_pooler``, mean for ``avg``) and cosine similarity, without cutting any input the
    backbone can take; other poolers are not expressible there and are recorded in
    ``clusterns_pooler.json`` only (the model card says how to embed such a model).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    backbone.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    write_json_atomic(out_dir / poolers.POOLER_FILE, {"eval_pooler": eval_pooler})  # the model describes itself
    if prompt_config is not None:  # the template the [MASK] pooler embeds with
        from clusterns.model.prompt import save_prompt_config

        save_prompt_config(out_dir, prompt_config)
    mode = _ST_POOLING.get(eval_pooler)
    if mode is None:
        return
    hidden = backbone.config.hidden_size
    pooling = {k: False for k in ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
                                  "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens",
                                  "pooling_mode_lasttoken")}
    pooling.update({"word_embedding_dimension": hidden, mode: True})
    (out_dir / "1_Pooling").mkdir(exist_ok=True)
    write_json_atomic(out_dir / "1_Pooling" / "config.json", pooling)
    write_json_atomic(out_dir / "modules.json", [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ])
    write_json_atomic(out_dir / "sentence_bert_config.json", {"max_seq_length": input_limit(backbone, tokenizer),
                                                              "do_lower_case": False})
    write_json_atomic(out_dir / "config_sentence_transformers.json", {
        "__version__": _versions(), "model_type": "SentenceTransformer", "prompts": {}, "default_prompt_name": None,
        "similarity_fn_name": "cosine"})


def _versions() -> dict:
    from importlib import metadata

    out = {}
    for key, dist in (("sentence_transformers", "sentence-transformers"), ("transformers", "transformers"),
                      ("pytorch", "torch")):
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = None
    return out
