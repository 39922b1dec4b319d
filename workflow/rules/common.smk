# Helpers shared by the rules: the run grid, paths of inputs, and the package sources each
# stage runs (declared as inputs so that a code change reruns exactly the affected jobs).
import sys
from pathlib import Path

ROOT = Path(workflow.current_basedir).parents[1]  # the project root (this file is workflow/rules/common.smk)
sys.path.insert(0, str(ROOT / "src"))  # a checkout works without `pip install -e`

from clusterns import config as cfg
from clusterns.data import resolve_local_backbone

SRC = ROOT / "src" / "clusterns"
PAPER_RESULTS = str(ROOT / "config" / "paper_results.csv")

try:
    RUNS = cfg.expand_runs(config)
except cfg.ConfigError as e:
    raise WorkflowError(str(e)) from None

RUN_INDEX = {(r.method, r.backbone, str(r.seed)): r for r in RUNS}
BACKBONES = list(config["backbones"])
MIRROR = config.get("mirror")  # CLUSTERNS_MIRROR is read (and wins) in the stage itself


wildcard_constraints:
    backbone=r"[A-Za-z0-9][A-Za-z0-9_.\-]*",
    method=r"[a-z0-9][a-z0-9_.\-]*",
    seed=r"\d+",
    maxlen=r"\d+",
    fmt=r"[LS]",


def src(*modules):
    """Package source files a rule runs (inputs: editing one reruns that stage)."""
    return [str(SRC / f"{m}.py") for m in ("__init__", "files", "provenance") + modules]


def run_of(w):
    try:
        return RUN_INDEX[(w.method, w.backbone, w.seed)]
    except KeyError:
        raise WorkflowError(f"no run {w.method}/{w.backbone}/seed{w.seed} in the config's grid") from None


def backbone_cfg(name):
    return config["backbones"][name]


def backbone_dir(name):
    """A local folder or package model is used as is; a hub id is fetched to resources/models/."""
    local = resolve_local_backbone(backbone_cfg(name)["model"])
    return str(local) if local is not None else f"resources/models/{name}"


RELEASED = config.get("released") or {}


def released_dir(name):
    """A released checkpoint: a local folder is used as is; a hub id is fetched to resources/released/."""
    local = resolve_local_backbone(RELEASED[name]["model"])
    return str(local) if local is not None else f"resources/released/{name}"


def eval_pooler(name):
    b = backbone_cfg(name)
    pooler = b.get("pooler", "cls")
    return b.get("eval_pooler") or ("cls_before_pooler" if pooler == "cls" else pooler)


def tokenized_dir(run):
    """L<len>: full sequences with special tokens; S<len>: sentence tokens only (prompt runs)."""
    fmt = "S" if run.prompt is not None else "L"
    return f"resources/tokenized/{run.backbone}/{fmt}{run.training['max_seq_length']}"


def run_eval_pooler(w):
    return run_of(w).hparams(backbone_cfg(w.backbone))["eval_pooler"]


def evaluation(key, default):
    return config.get("evaluation", {}).get(key, default)


TABLES = ["main", "ablation", "paired"]
PLOTS = ["avg_sts", "training_curves"]


def manifest():
    """What the report is about: every run of the grid (present or not), the base rows, labels."""
    return {
        "runs": [{"method": r.method, "backbone": r.backbone, "seed": r.seed, "dir": r.dir, "group": r.group,
                  **({"sweep": r.sweep} if r.sweep else {})} for r in RUNS],
        "base": [{"backbone": b, "path": f"results/base/{b}/sts_test.json"} for b in BACKBONES]
        if evaluation("base", True) else [],
        "released": [{"method": v["method"], "backbone": v["backbone"], "path": f"results/released/{k}/sts_test.json"}
                     for k, v in RELEASED.items()],
        "paired": config.get("report", {}).get("paired", []),
        "ablation_reference": config.get("report", {}).get("ablation_reference", "clusterns"),
        "labels": {"methods": {m: v.get("label", m) for m, v in config["methods"].items()},
                   "backbones": {b: v.get("label", b) for b, v in config["backbones"].items()}},
    }


def plot_names():
    names = list(PLOTS) if config.get("report", {}).get("plots", True) else []
    if names and any(r.group == "sweep" for r in RUNS):
        names.append("sensitivity")
    return names


def report_targets():
    return [f"results/tables/{t}.{ext}" for t in TABLES for ext in ("md", "csv", "tex")] + [
        f"results/plots/{p}.{ext}" for p in plot_names() for ext in ("png", "pdf")
    ]


def final_targets():
    """What `snakemake` with no target builds: every run evaluated, tables, plots."""
    targets = [f"{r.dir}/sts_test.json" for r in RUNS]
    if evaluation("base", True):
        targets += [f"results/base/{b}/sts_test.json" for b in BACKBONES]
    targets += [f"results/released/{name}/sts_test.json" for name in RELEASED]
    targets += report_targets()
    if config.get("transfer", {}).get("enabled", False):
        targets += ["results/tables/transfer.md", "results/tables/transfer.csv"]
    return targets
