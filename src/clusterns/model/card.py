"""The model card (``README.md`` of a model folder) a Hub reader expects: what the model is, how
it was trained, how it scores, how to load it, what to cite. Built from a run's ``run.json``
summary and, where computed, its evaluation results."""

from __future__ import annotations

import math
from typing import Any

from clusterns import poolers

__all__ = ["model_card", "CLUSTERNS_CITATION", "SIMCSE_CITATION", "PIPELINE_CITATION"]

CLUSTERNS_CITATION = """@inproceedings{deng-etal-2023-clustering,
  title = {Clustering-Aware Negative Sampling for Unsupervised Sentence Representation},
  author = {Deng, Jinghao and Wan, Fanqi and Yang, Tao and Quan, Xiaojun and Wang, Rui},
  booktitle = {Findings of the Association for Computational Linguistics: ACL 2023},
  year = {2023},
  pages = {8713--8729},
  url = {https://aclanthology.org/2023.findings-acl.555}
}"""
SIMCSE_CITATION = """@inproceedings{gao-etal-2021-simcse,
  title = {{SimCSE}: Simple Contrastive Learning of Sentence Embeddings},
  author = {Gao, Tianyu and Yao, Xingcheng and Chen, Danqi},
  booktitle = {Proceedings of the 2021 Conference on Empirical Methods in Natural Language Processing},
  year = {2021},
  pages = {6894--6910},
  url = {https://aclanthology.org/2021.emnlp-main.552}
}"""
PIPELINE_CITATION = """@software{clusterns_pipeline,
  title = {clusterns: a reproducible pipeline for ClusterNS and unsupervised SimCSE},
  year = {2026},
  note = {Snakemake workflow; the model was trained and evaluated with it}
}"""
STS_TASKS = ("STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark", "SICKRelatedness")
_STS_LABELS = {"STSBenchmark": "STS-B", "SICKRelatedness": "SICK-R"}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "–" if not math.isfinite(value) else f"{value:.2f}"
    return "–" if value is None else str(value)


def _table(header: list[str], row: list[Any]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            "| " + " | ".join(_fmt(v) for v in row) + " |"]


def _usage(summary: dict) -> list[str]:
    hp = summary["hparams"]
    pooler = hp["eval_pooler"]
    if poolers.is_prompt(pooler):
        prompt = hp.get("prompt") or {}
        return [
            "This is a **prompt-based** model: its embedding is the last-layer state at the [MASK] of a",
            "PromptBERT template (the template and protocol are in `clusterns_prompt.json`).",
            "sentence-transformers cannot express that pooling (it would mean-pool), so embed it with the",
            "pipeline's evaluator, which reads the template from the folder:",
            "",
            "```bash",
            "python -m clusterns.sts --model PATH --senteval SENTEVAL_DIR --output sts.json",
            "```",
            "",
            "or with transformers directly (the test protocol `raw`): fill the template of",
            "`clusterns_prompt.json` (`*mask*` → the mask token, `_` → space, `*sep+*`/`*cls*` removed, the",
            "sentence with a final period in place of `*sent_0*`), encode, and take the last hidden state at",
            "the mask token:",
            "",
            "```python",
            "import json, torch",
            "from transformers import AutoModel, AutoTokenizer",
            "from clusterns.model.prompt import format_test_sentence",
            "cfg = json.load(open('PATH/clusterns_prompt.json'))",
            "tok, model = AutoTokenizer.from_pretrained('PATH'), AutoModel.from_pretrained('PATH').eval()",
            "text = format_test_sentence(cfg['template'], 'A man is playing a guitar', tok.mask_token)",
            "enc = tok([text], return_tensors='pt')",
            "with torch.no_grad():",
            "    last = model(**enc).last_hidden_state[0]",
            "embedding = last[(enc['input_ids'][0] == tok.mask_token_id).nonzero()[-1, 0]]",
            "```",
            "",
            f"Template denoising: `{'on' if prompt.get('denoise', True) else 'off'}` in training; the test "
            "protocol uses the raw [MASK] state.",
        ]
    what = "the last-layer [CLS] state" if pooler == "cls_before_pooler" else f"the `{pooler}` pooler"
    lines = [f"The embedding is {what} (no pooler layer, no training MLP), cosine similarity.", ""]
    if pooler in ("cls_before_pooler", "avg"):
        lines += ["```python", "from sentence_transformers import SentenceTransformer",
                  "model = SentenceTransformer('PATH')",
                  "embeddings = model.encode(['A man is playing a guitar.', 'Someone plays an instrument.'])",
                  "print(model.similarity(embeddings[0], embeddings[1]))", "```", ""]
    lines += ["With the pipeline's evaluator (SentEval STS protocol):", "", "```bash",
              "python -m clusterns.sts --model PATH --senteval SENTEVAL_DIR --output sts.json", "```"]
    return lines


def model_card(summary: dict, sts: dict | None = None, transfer: dict | None = None,
               clustering: dict | None = None, base_model: str | None = None) -> str:
    """``README.md`` for the model of a finished run (``summary``: its ``run.json``)."""
    hp, eff = summary["hparams"], summary.get("effective", {})
    tr, obj = hp["training"], hp["objective"]
    method, backbone, seed = hp["method"], hp["backbone"], hp["seed"]
    clustering_on = (obj.get("kmeans") or 0) > 0
    base = base_model or summary.get("model_source", backbone)
    tags = ["sentence-transformers", "sentence-similarity", "feature-extraction", "simcse"]
    if clustering_on:
        tags.append("clusterns")
    front = ["---", "library_name: sentence-transformers", "pipeline_tag: sentence-similarity",
             "tags:", *[f"- {t}" for t in tags], "datasets:", "- princeton-nlp/datasets-for-simcse",
             "language:", "- en", "---", ""]
    title = f"# {method} on {backbone} (seed {seed})"
    lines = [*front, title, "",
             ("Unsupervised sentence embeddings trained with **ClusterNS** (clustering-aware negative "
              "sampling, Deng et al., Findings of ACL 2023)" if clustering_on else
              "Unsupervised sentence embeddings trained with **unsupervised SimCSE** (Gao et al., EMNLP 2021)")
             + ", by the clusterns reproduction pipeline.", "",
             "## Training", "",
             f"- base model: `{base}`",
             f"- method: `{method}`; objective: " + ", ".join(f"`{k}: {v}`" for k, v in sorted(obj.items())),
             f"- data: `wiki1m_for_simcse.txt` ({summary.get('data', {}).get('sentences', '?')} sentences, sha256 "
             f"`{summary.get('data', {}).get('source_sha256', '?')}`), max length {tr['max_seq_length']} tokens",
             f"- seed {seed}; {summary['steps']} of {summary['total_steps']} steps"
             + (" (early stop)" if summary.get("stopped_early") else "")
             + f", global batch {summary['global_batch']} on {summary['processes']} process(es), lr {tr['lr']}, "
               f"{tr['optimizer']}, linear decay, gradient clip {tr['max_grad_norm']}",
             f"- precision: {eff.get('mixed_precision', summary.get('mixed_precision'))}"
             + (f"; centroids {eff.get('centroid_tensor_dtype')} ({eff.get('centroid_update')})"
                if clustering_on else ""),
             f"- selected checkpoint: step {summary.get('best_step')} (STS-B dev "
             f"{_fmt(summary.get('best_stsb_dev'))})" if summary.get("best_step") else
             "- no dev selection: the final model",
             f"- evaluation pooler: `{hp['eval_pooler']}`", ""]
    lines += ["## Evaluation", ""]
    if sts is None:
        lines += ["Not evaluated yet in this folder: the run's `sts_test.json` holds the STS test scores "
                  "(the release folder's card shows them).", ""]
    else:
        lines += ["STS test, Spearman × 100 (SentEval \"all\" setting, as SimCSE and ClusterNS report):", "",
                  *_table([_STS_LABELS.get(t, t) for t in STS_TASKS] + ["Avg."],
                          [sts.get(t) for t in STS_TASKS] + [sts.get("avg")]), ""]
    if transfer is not None:
        tasks = [t for t in ("MR", "CR", "SUBJ", "MPQA", "SST2", "TREC", "MRPC") if t in transfer]
        mode = transfer.get("meta", {}).get("mode")
        lines += [f"SentEval transfer tasks, accuracy × 100 (mode {mode}"
                  + (", subsampled" if transfer.get("meta", {}).get("subsampled") else "") + "):", "",
                  *_table(tasks + ["Avg."], [transfer.get(t) for t in tasks] + [transfer.get("avg")]), ""]
    if clustering is not None:
        sets = list(clustering.get("details", {}))
        lines += ["Short-text clustering, ACC × 100 (KMeans, mean over restarts"
                  + (", subsampled" if clustering.get("meta", {}).get("subsampled") else "") + "):", "",
                  *_table(sets + ["Avg."], [clustering.get(s) for s in sets] + [clustering.get("avg")]), ""]
    lines += ["## Usage", "", *_usage(summary), "",
              "## Citation", "", "```bibtex", CLUSTERNS_CITATION if clustering_on else SIMCSE_CITATION, "```", "",
              *(["```bibtex", SIMCSE_CITATION, "```", ""] if clustering_on else []),
              "and the pipeline:", "", "```bibtex", PIPELINE_CITATION, "```", ""]
    return "\n".join(lines)
