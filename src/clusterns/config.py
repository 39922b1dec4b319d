"""The run grid: expands a validated config into runs with fully resolved hyperparameters.

Precedence for a run's settings (later wins): ``training`` defaults → the method's entry in
``methods`` (objective keys) → the backbone's training keys → the run entry's ``training`` /
``objective`` overrides. The JSON-schema check (workflow/schemas/config.schema.yaml) runs first;
this module adds the cross-key checks a schema cannot express.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

SCHEMA = Path(__file__).resolve().parents[2] / "workflow" / "schemas" / "config.schema.yaml"

# Training keys every run carries (defaults; the schema lists the same keys).
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
}


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
        """Everything the trainer needs, as one JSON-able dict (a rule ``param``)."""
        hp = {
            "method": self.method,
            "backbone": self.backbone,
            "seed": self.seed,
            "pooler": backbone_cfg.get("pooler", "cls"),
            "eval_pooler": backbone_cfg.get("eval_pooler") or _default_eval_pooler(backbone_cfg.get("pooler", "cls")),
            "training": self.training,
            "objective": self.objective,
        }
        if self.prompt is not None:  # prompt-based method: the [MASK] state of a template is the embedding
            hp.update(pooler="mask", eval_pooler="mask", prompt=self.prompt)
        return hp


def _default_eval_pooler(pooler: str) -> str:
    return "cls_before_pooler" if pooler == "cls" else pooler


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
    from clusterns.objective_config import ObjectiveConfig, ObjectiveConfigError

    methods = config.get("methods", {})
    backbones = config.get("backbones", {})
    training_defaults = _merge(TRAINING_DEFAULTS, config.get("training"))
    seeds_default = config.get("seeds", [42])
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
        training = _merge(training_defaults, method_cfg.get("training"), bb.get("training"), entry.get("training"))
        objective = _merge(method_cfg.get("objective"), entry.get("objective"), objective_extra)
        try:
            ObjectiveConfig.from_dict(objective).validate(training["batch_size"])
        except ObjectiveConfigError as e:
            raise ConfigError(f"config key {label} ({method}/{entry['backbone']}): {e}") from None
        if training["gpus"] > 0 and training["batch_size"] % training["gpus"]:
            raise ConfigError(f"config key {label}.training.batch_size: global batch {training['batch_size']} is not "
                              f"divisible by gpus={training['gpus']}; choose a multiple")
        prompt = method_cfg.get("prompt")
        if prompt is not None and prompt.get("delta_rows", 50) <= training["max_seq_length"] and prompt.get("denoise", True):
            raise ConfigError(f"config key methods.{entry['method']}.prompt.delta_rows must exceed "
                              f"max_seq_length ({training['max_seq_length']}): one denoising row per sentence length")
        for seed in entry.get("seeds") or seeds_default:
            runs.append(Run(method, entry["backbone"], int(seed), group, training, objective, sweep,
                            None if prompt is None else dict(prompt)))

    for i, entry in enumerate(config.get("runs", [])):
        method = entry["method"]
        add(method, entry, entry.get("group") or methods.get(method, {}).get("group", "main"), f"runs[{i}]")
    for i, sweep in enumerate(config.get("sweeps") or []):
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
