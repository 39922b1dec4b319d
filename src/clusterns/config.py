"""Every default of the configuration, and the run grid with fully resolved settings.

This module is the one home of defaults: the schema (workflow/schemas/config.schema.yaml) checks
types and values but sets none, :func:`resolve` fills every section from the ``*_DEFAULTS``
below (objective defaults: :class:`clusterns.method.settings.ObjectiveConfig`), and the stages
read resolved settings only. Precedence for a run's settings (later wins): ``training``
defaults → the method's ``training`` → the backbone's ``training`` → the run entry's
``training`` / ``objective`` overrides (objective: method → run → sweep value). This module
also adds the cross-key checks a schema cannot express. Torch-free: the workflow imports it.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"

from clusterns import poolers

# Training keys every run carries (the schema lists the same keys).
TRAINING_DEFAULTS = {
    "max_seq_length": 32,
    "epochs": 1,
    "max_steps": None,
    "batch_size": 64,
    "lr": 3e-5,
    "optimizer": "adamw",
    "dropout": None,
    "eval_steps": 125,
    "early_stop": 3,
    "eval_at_end": False,
    "max_grad_norm": 1.0,
    "save_steps": 125,
    "log_steps": 10,
    "mixed_precision": "fp16",
    "gpus": 1,
    "num_workers": 2,
    "eval_batch_size": 128,
    "packed": True,
    "report_to": "none",  # experiment tracking through accelerate: tensorboard, wandb, mlflow, ... (or all)
}
# A prompt method's settings (``methods.<name>.prompt``; ``{}`` = all of these).
PROMPT_DEFAULTS = {
    "templates": None,  # None: the backbone family's template pair
    "denoise": True,  # subtract the template-only [MASK] state in training and dev selection
    "delta_rows": 50,  # denoising rows in training (one per sentence length; must exceed max_seq_length)
    "eval_delta_rows": 128,  # denoising rows in dev selection
    "roberta_position_offset": "original",
    "test_protocol": "raw",  # final test embedding: raw [MASK] state of template 1 (evaluation_prompt.py)
}
BACKBONE_DEFAULTS = {"revision": None, "pooler": "cls", "eval_pooler": None, "training": {}}
METHOD_DEFAULTS = {"group": "main", "objective": {}, "training": {}, "prompt": None}
EVALUATION_DEFAULTS = {"batch_size": 128, "dtype": "fp32", "base": True}
TRANSFER_DEFAULTS = {"enabled": False, "mode": "fast", "max_examples": None}
REPORT_DEFAULTS = {"paired": [], "ablation_reference": "clusterns", "plots": True}
# MTEB (the mteb package) on every run, base backbone and released checkpoint: off by default
# (its data comes from the Hugging Face Hub). local_stsb builds its STSBenchmark from SentEval.
MTEB_DEFAULTS = {"enabled": False, "local_stsb": False,
                 "tasks": ["STS12", "STS13", "STS14", "STS15", "STS16", "STSBenchmark", "SICK-R", "BIOSSES"]}
# The publishable folder of every run (model files + model card with its results) and the
# optional upload to the Hugging Face Hub (off: nothing leaves the machine unless asked).
RELEASE_DEFAULTS = {"enabled": True, "push": False, "repo_id": "{method}-{backbone}-seed{seed}", "private": True}
# Short-text clustering (the paper's Table 6): the official protocol unless changed here.
CLUSTERING_DEFAULTS = {
    "enabled": False,
    "pooler": "cls_before_pooler",  # the official last-layer [CLS] state; "run": each row's own evaluation pooler
    "restarts": [0, 1, 2],  # KMeans random_state of each restart (the official script runs one unseeded KMeans)
    "max_examples": None,  # quick checks only: a seeded stratified subset per set (marked subsampled)
    "max_length": 128,  # truncation in tokens
    "datasets": {},  # name -> {url, sha256, lines, classes}
}
SOURCE_DEFAULTS = {"sha256": None, "size": None, "lines": None, "head": None}


class ConfigError(ValueError):
    """A user-fixable problem in the configuration; the message names the key."""


@dataclass(frozen=True)
class Run:
    """One training run of the grid: ``results/runs/{method}/{backbone}/seed{seed}``."""

    method: str
    backbone: str
    seed: int
    group: str
    training: dict = field(hash=False, compare=False)
    objective: dict = field(hash=False, compare=False)
    sweep: dict | None = field(default=None, hash=False, compare=False)
    prompt: dict | None = field(default=None, hash=False, compare=False)

    @property
    def dir(self) -> str:
        return f"results/runs/{self.method}/{self.backbone}/seed{self.seed}"

    def hparams(self, backbone_cfg: dict) -> dict:
        """Everything the trainer needs, as one JSON-able dict (a rule ``param``); ``backbone_cfg``
        is the backbone's entry of a :func:`resolve`-d config."""
        pooler = backbone_cfg.get("pooler", BACKBONE_DEFAULTS["pooler"])
        hp = {
            "method": self.method,
            "backbone": self.backbone,
            "seed": self.seed,
            "pooler": pooler,
            "eval_pooler": backbone_cfg.get("eval_pooler") or poolers.default_eval_pooler(pooler),
            "training": self.training,
            "objective": self.objective,
        }
        if self.prompt is not None:  # prompt-based method: the [MASK] state of a template is the embedding
            hp.update(pooler=poolers.PROMPT_POOLER, eval_pooler=poolers.PROMPT_POOLER, prompt=self.prompt)
        return hp


def _filled(defaults: dict, given: dict | None) -> dict:
    out = copy.deepcopy(defaults)
    out.update(copy.deepcopy(given or {}))
    return out


def resolve(config: dict) -> dict:
    """A copy of a (schema-valid) config with every default filled in; idempotent.

    Backbones get their resolved ``eval_pooler``, methods and backbones a ``label``, prompt
    methods the complete prompt settings, every optional section its defaults."""
    c = copy.deepcopy(config)
    c.setdefault("mirror", None)
    c["data"] = {k: _filled(SOURCE_DEFAULTS, v) for k, v in c.get("data", {}).items()}
    c["training"] = _filled(TRAINING_DEFAULTS, c.get("training"))
    backbones = {}
    for name, b in c.get("backbones", {}).items():
        b = _filled({**BACKBONE_DEFAULTS, "label": name}, b)
        b["eval_pooler"] = b["eval_pooler"] or poolers.default_eval_pooler(b["pooler"])
        backbones[name] = b
    c["backbones"] = backbones
    methods = {}
    for name, m in c.get("methods", {}).items():
        m = _filled({**METHOD_DEFAULTS, "label": name}, m)
        if m["prompt"] is not None:
            m["prompt"] = _filled(PROMPT_DEFAULTS, m["prompt"])
        methods[name] = m
    c["methods"] = methods
    c["runs"] = c.get("runs") or []
    c["seeds"] = c.get("seeds") or [42]
    c["sweeps"] = c.get("sweeps") or []
    c["released"] = {k: _filled({"revision": None}, v) for k, v in (c.get("released") or {}).items()}
    c["evaluation"] = _filled(EVALUATION_DEFAULTS, c.get("evaluation"))
    c["transfer"] = _filled(TRANSFER_DEFAULTS, c.get("transfer"))
    c["report"] = _filled(REPORT_DEFAULTS, c.get("report"))
    c["clustering"] = _filled(CLUSTERING_DEFAULTS, c.get("clustering"))
    c["release"] = _filled(RELEASE_DEFAULTS, c.get("release"))
    c["mteb"] = _filled(MTEB_DEFAULTS, c.get("mteb"))
    return c


def resolve_hparams(hp: dict) -> dict:
    """A run's settings (``run.json`` as the workflow writes it, or written by hand) with every
    default filled in and the objective validated; what the training stage reads."""
    from clusterns.method.settings import ObjectiveConfig

    hp = copy.deepcopy(hp)
    hp["training"] = _filled(TRAINING_DEFAULTS, hp.get("training"))
    hp["objective"] = ObjectiveConfig.from_dict(hp.get("objective")).to_dict()
    hp.setdefault("pooler", BACKBONE_DEFAULTS["pooler"])
    hp["eval_pooler"] = hp.get("eval_pooler") or poolers.default_eval_pooler(hp["pooler"])
    if hp.get("prompt") is not None:  # a prompt run embeds at its template's [MASK]
        hp["prompt"] = _filled(PROMPT_DEFAULTS, hp["prompt"])
        hp["pooler"] = hp["eval_pooler"] = poolers.PROMPT_POOLER
    return hp


def load(path: str | Path) -> dict:
    """Read a YAML config file (no validation)."""
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f) or {}


def validate_schema(config: dict) -> None:
    """JSON-schema validation with one message naming the offending key (for use outside Snakemake)."""
    import jsonschema

    schema = yaml.safe_load(SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(config), key=lambda e: list(e.absolute_path))
    if errors:
        e = errors[0]
        where = ".".join(str(p) for p in e.absolute_path) or "(top level)"
        raise ConfigError(f"config key {where}: {e.message}")


def _merge(*dicts: dict | None) -> dict:
    out: dict = {}
    for d in dicts:
        if d:
            out.update(copy.deepcopy(d))
    return out


def expand_runs(config: dict) -> list[Run]:
    """The grid: every ``runs`` entry × its seeds, plus the sweeps; checked for consistency."""
    from clusterns.method.settings import ObjectiveConfig, ObjectiveConfigError

    config = resolve(config)
    methods = config["methods"]
    backbones = config["backbones"]
    training_defaults = config["training"]
    seeds_default = config["seeds"]
    runs: list[Run] = []

    def add(method: str, entry: dict, group: str, label: str, sweep: dict | None = None, objective_extra=None):
        if entry["method"] not in methods:
            raise ConfigError(f"config key {label}.method: unknown method {entry['method']!r}; "
                              f"define it under 'methods' ({', '.join(methods) or 'none defined'})")
        if entry["backbone"] not in backbones:
            raise ConfigError(f"config key {label}.backbone: unknown backbone {entry['backbone']!r}; "
                              f"define it under 'backbones' ({', '.join(backbones) or 'none defined'})")
        bb = backbones[entry["backbone"]]
        method_cfg = methods[entry["method"]]
        training = _merge(training_defaults, method_cfg["training"], bb["training"], entry.get("training"))
        objective = _merge(method_cfg["objective"], entry.get("objective"), objective_extra)
        try:
            ObjectiveConfig.from_dict(objective).validate(training["batch_size"])  # its dataclass holds the defaults
        except ObjectiveConfigError as e:
            raise ConfigError(f"config key {label} ({method}/{entry['backbone']}): {e}") from None
        if training["gpus"] > 0 and training["batch_size"] % training["gpus"]:
            raise ConfigError(f"config key {label}.training.batch_size: global batch {training['batch_size']} is not "
                              f"divisible by gpus={training['gpus']}; choose a multiple")
        prompt = method_cfg["prompt"]
        if prompt is not None and prompt["delta_rows"] <= training["max_seq_length"] and prompt["denoise"]:
            raise ConfigError(f"config key methods.{entry['method']}.prompt.delta_rows must exceed "
                              f"max_seq_length ({training['max_seq_length']}): one denoising row per sentence length")
        for seed in entry.get("seeds") or seeds_default:
            runs.append(Run(method, entry["backbone"], int(seed), group, training, objective, sweep,
                            None if prompt is None else dict(prompt)))

    for i, entry in enumerate(config["runs"]):
        method = entry["method"]
        group = entry.get("group") or (methods[method]["group"] if method in methods else "main")
        add(method, entry, group, f"runs[{i}]")
    for i, sweep in enumerate(config["sweeps"]):
        for value in sweep["values"]:
            name = f"{sweep['method']}-{sweep['param']}{value}"
            add(name, sweep, "sweep", f"sweeps[{i}]", {"param": sweep["param"], "value": value, "method": sweep["method"]},
                {sweep["param"]: value})
    seen: set[tuple] = set()
    for r in runs:
        key = (r.method, r.backbone, r.seed)
        if key in seen:
            raise ConfigError(f"config key runs: {r.method}/{r.backbone}/seed{r.seed} appears twice")
        seen.add(key)
    return runs


def dumps(obj) -> str:
    """Stable JSON for rule params (a change in any value reruns the affected jobs)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))
