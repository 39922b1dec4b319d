# Helpers of the rules: the resolved config, the run grid, paths of inputs, and the package
# sources each stage runs (declared as inputs so that a code change reruns exactly the affected
# jobs). The rule files only wire these together.
import ast
import os
import sys
from functools import cache
from pathlib import Path

from snakemake.logging import logger

# The project root (this file is workflow/rules/common.smk) and its package sources. Paths given
# to the rules are relative to the working directory (see workdir_path), never absolute ones.
ROOT = Path(workflow.current_basedir).parents[1]
SRC_DIR = ROOT / "src"
sys.path.insert(0, str(SRC_DIR))  # the workflow itself works without `pip install -e`

from clusterns import config as cfg
from clusterns.data import resolve_local_backbone, upstream_basename

# Every job runs `python -m clusterns.<stage>` with this checkout's src/ first on PYTHONPATH (set
# here, so inherited by every job: local, in a conda env of workflow/envs/, or submitted with
# `sbatch --export=ALL`, where the job's Snakemake parses this file again). So a job runs exactly
# the files its `code` input lists, whether and however the package is installed; the conda envs
# hold the third-party packages only.
if os.environ.get("PYTHONPATH", "").split(os.pathsep)[0] != str(SRC_DIR):
    os.environ.update(
        PYTHONPATH=os.pathsep.join(
            p for p in (str(SRC_DIR), os.environ.get("PYTHONPATH")) if p
        )
    )

# The one home of defaults is clusterns.config: CONFIG is the validated config with every
# default filled in (cfg.resolve); nothing below falls back to a default of its own.
CONFIG = cfg.resolve(config)

try:
    RUNS = cfg.expand_runs(CONFIG)
except cfg.ConfigError as e:
    raise WorkflowError(str(e)) from None

RUN_INDEX = {(r.method, r.backbone, str(r.seed)): r for r in RUNS}
BACKBONES = list(CONFIG["backbones"])
RELEASED = CONFIG["released"]
MIRROR = CONFIG["mirror"]  # CLUSTERNS_MIRROR is read (and wins) in the stage itself
TABLES = ["main", "ablation", "paired"]
PLOTS = ["avg_sts", "training_curves"]


wildcard_constraints:
    backbone=r"[A-Za-z0-9][A-Za-z0-9_.\-]*",
    method=r"[a-z0-9][a-z0-9_.\-]*",
    seed=r"\d+",
    maxlen=r"\d+",
    fmt=r"[LS]",
    file=r"[^/]+",


# ------------------------------------------------------------------------------------------------
# Paths relative to the working directory
#
# Snakemake has already changed into the working directory (--directory, default: where it was
# started) when it parses this file, so os.getcwd() is the folder every relative path of a job is
# read from. Inputs named relative to it keep their names when a finished project is copied or
# moved (`cp -a`, same files and mtimes), so the copy is up to date; absolute names would differ
# and rerun every job.


def workdir_path(path):
    """``path`` relative to the working directory if it lies inside it, else absolute (e.g. a
    backbone of an installed package: site-packages, outside the project)."""
    path = os.path.abspath(path)
    cwd = os.getcwd()
    return (
        os.path.relpath(path, cwd) if os.path.commonpath([path, cwd]) == cwd else path
    )


def project_file(path):
    """A file of this project (``path`` relative to the project root), relative to the working
    directory (``../..`` when the working directory is elsewhere)."""
    return os.path.relpath(ROOT / path, os.getcwd())


PAPER_RESULTS = project_file("config/paper_results.csv")


# ------------------------------------------------------------------------------------------------
# The package sources of a stage: its import graph
#
# stage_sources("sts") is every file of src/ that `python -m clusterns.sts` can import: the stage
# module, then, transitively, every module named by an `import x.y` or `from x.y import z` anywhere
# in a module's body (top level, functions, branches: the whole syntax tree is walked), including
# `from package import module`, relative imports, and the `__init__.py` of every package on the
# way (Python runs them when importing a submodule). This cannot drift from the code: it is read
# from the code at every parse, so a module that a stage starts to import (or a new stage module)
# is an input as soon as the import is written, and one it stops importing no longer reruns it.
# Not seen: imports by a computed name (importlib.import_module(name)), which the package uses
# only for a backbone's Python package (clusterns.data), never for a module of its own.


@cache
def module_file(name):
    """The file under src/ of the dotted module ``name`` (a package: its __init__.py), or None
    when ``name`` is not a module of src/ (third-party, standard library, or an attribute).
    """
    base = SRC_DIR.joinpath(*name.split("."))
    # a package wins over a module of the same name, as in Python
    for path in (base / "__init__.py", base.with_suffix(".py")):
        if path.is_file():
            return path
    return None


@cache
def imported_names(name):
    """Every dotted name module ``name`` imports, anywhere in its body; ``from a.b import c``
    gives ``a.b`` and ``a.b.c`` (c may be a module)."""
    path = module_file(name)
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except SyntaxError as e:
        # the stage fails when it runs; the file itself stays an input
        logger.warning(f"cannot read the imports of {path}: {e}")
        return frozenset()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            parts = [] if node.level == 0 else package[: len(package) - node.level + 1]
            base = ".".join(parts + ([node.module] if node.module else []))
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names if a.name != "*")
    return frozenset(names)


def own_modules(dotted):
    """The modules of src/ that importing ``dotted`` runs: each of its prefixes that is one."""
    parts = dotted.split(".")
    prefixes = (".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return [m for m in prefixes if module_file(m) is not None]


def stage_sources(*stages):
    """Source files (relative to the working directory) that ``python -m clusterns.<stage>``
    imports, directly or indirectly, for each of ``stages``; a rule's ``code`` input."""
    seen = set()
    todo = [m for stage in stages for m in own_modules(f"clusterns.{stage}")]
    if not todo:
        raise WorkflowError(f"no stage module clusterns.{stages[0]} in {SRC_DIR}")
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(m for n in imported_names(name) for m in own_modules(n))
    return sorted(os.path.relpath(module_file(m), os.getcwd()) for m in seen)


# ------------------------------------------------------------------------------------------------
# Runs, backbones, released checkpoints


def run_of(w):
    try:
        return RUN_INDEX[(w.method, w.backbone, w.seed)]
    except KeyError:
        raise WorkflowError(
            f"no run {w.method}/{w.backbone}/seed{w.seed} in the config's grid"
        ) from None


def backbone_cfg(name):
    return CONFIG["backbones"][name]


def local_model(model, fetched):
    """A local folder or package model is used as is; a hub id is fetched to ``fetched``."""
    local = resolve_local_backbone(model)
    return workdir_path(local) if local is not None else fetched


def backbone_dir(name):
    return local_model(backbone_cfg(name)["model"], f"resources/models/{name}")


def released_dir(name):
    return local_model(RELEASED[name]["model"], f"resources/released/{name}")


def revision_arg(entry):
    """``--revision R`` for a backbone or released entry pinned to a hub revision."""
    return f"--revision {entry['revision']}" if entry["revision"] else ""


def mirror_arg():
    return f"--mirror {MIRROR}" if MIRROR else ""


def source_args(source):
    """Checks and cuts of a download (``data.<source>``): ``--sha256 ... --head N``, set ones only."""
    entry = CONFIG["data"][source]
    return " ".join(
        f"--{k} {v}" for k, v in entry.items() if k != "url" and v is not None
    )


def eval_pooler(name):
    return backbone_cfg(name)["eval_pooler"]


def tokenized_dir(run):
    """L<len>: full sequences with special tokens; S<len>: sentence tokens only (prompt runs)."""
    fmt = "S" if run.prompt is not None else "L"
    return f"resources/tokenized/{run.backbone}/{fmt}{run.training['max_seq_length']}"


def run_hparams(w):
    return cfg.dumps(run_of(w).hparams(backbone_cfg(w.backbone)))


def run_eval_pooler(w):
    return run_of(w).hparams(backbone_cfg(w.backbone))["eval_pooler"]


# ------------------------------------------------------------------------------------------------
# Evaluation, transfer, report


def run_files(*names):
    return [f"{r.dir}/{name}" for r in RUNS for name in names]


def base_scores():
    if not CONFIG["evaluation"]["base"]:
        return []
    return [f"results/base/{b}/sts_test.json" for b in BACKBONES]


def released_scores():
    return [f"results/released/{name}/sts_test.json" for name in RELEASED]


def transfer_max_examples():
    """``--max-examples N`` when ``transfer.max_examples`` is set (quick checks; rows marked subsampled)."""
    n = CONFIG["transfer"]["max_examples"]
    return f"--max-examples {n}" if n is not None else ""


def transfer_label(run):
    # a sweep's run (clusterns-kmeans16) has no entry of its own under methods
    method = CONFIG["methods"].get(run.method)
    return (
        f"{method['label'] if method else run.method} / "
        f"{backbone_cfg(run.backbone)['label']} / seed {run.seed}"
    )


def manifest():
    """What the report is about: every run of the grid (present or not), the base rows, labels."""
    return {
        "runs": [
            {
                "method": r.method,
                "backbone": r.backbone,
                "seed": r.seed,
                "dir": r.dir,
                "group": r.group,
                **({"sweep": r.sweep} if r.sweep else {}),
            }
            for r in RUNS
        ],
        "base": [
            {"backbone": b, "path": f"results/base/{b}/sts_test.json"}
            for b in BACKBONES
            if CONFIG["evaluation"]["base"]
        ],
        "released": [
            {
                "method": v["method"],
                "backbone": v["backbone"],
                "path": f"results/released/{name}/sts_test.json",
            }
            for name, v in RELEASED.items()
        ],
        "paired": CONFIG["report"]["paired"],
        "ablation_reference": CONFIG["report"]["ablation_reference"],
        "labels": {
            "methods": {m: v["label"] for m, v in CONFIG["methods"].items()},
            "backbones": {b: v["label"] for b, v in CONFIG["backbones"].items()},
        },
    }


def plot_names():
    names = list(PLOTS) if CONFIG["report"]["plots"] else []
    if names and any(r.group == "sweep" for r in RUNS):
        names.append("sensitivity")
    return names


def report_targets():
    return [
        f"results/tables/{t}.{ext}" for t in TABLES for ext in ("md", "csv", "tex")
    ] + [f"results/plots/{p}.{ext}" for p in plot_names() for ext in ("png", "pdf")]


# ------------------------------------------------------------------------------------------------
# Short-text clustering


CLUSTERING = CONFIG["clustering"]


def clustering_dataset(file):
    """The ``clustering.datasets`` entry whose upstream file is ``file``."""
    for entry in CLUSTERING["datasets"].values():
        if upstream_basename(entry["url"]) == file:
            return entry
    raise WorkflowError(f"no clustering dataset with the file {file} in the config")


def clustering_files():
    return [
        f"resources/data/clustering/{upstream_basename(d['url'])}"
        for d in CLUSTERING["datasets"].values()
    ]


def clustering_source_args(file):
    """The checks of a clustering download: its sha256 (when known) and line count."""
    entry = clustering_dataset(file)
    checks = {"sha256": entry.get("sha256"), "lines": entry["lines"]}
    return " ".join(f"--{k} {v}" for k, v in checks.items() if v is not None)


def clustering_args():
    """The evaluator's sets (``--set NAME FILE LINES CLASSES``), restarts and subsample."""
    sets = " ".join(
        f"--set {name} {upstream_basename(d['url'])} {d['lines']} {d['classes']}"
        for name, d in CLUSTERING["datasets"].items()
    )
    restarts = " ".join(str(r) for r in CLUSTERING["restarts"])
    cut = CLUSTERING["max_examples"]
    return f"{sets} --restarts {restarts} --max-length {CLUSTERING['max_length']}" + (
        f" --max-examples {cut}" if cut is not None else ""
    )


def clustering_pooler(own_pooler):
    """The official [CLS] state, or with ``clustering.pooler: run`` the row's own pooler."""
    return own_pooler if CLUSTERING["pooler"] == "run" else CLUSTERING["pooler"]


def clustering_rows():
    """The clustering table's inputs: every run (its seeds share a label), base, released."""
    label = (
        lambda m, b: f"{CONFIG['methods'][m]['label'] if m in CONFIG['methods'] else m} / {backbone_cfg(b)['label']}"
    )
    rows = [
        {
            "path": f"{r.dir}/clustering.json",
            "label": label(r.method, r.backbone),
            "kind": "run",
        }
        for r in RUNS
    ]
    if CONFIG["evaluation"]["base"]:
        rows += [
            {
                "path": f"results/base/{b}/clustering.json",
                "label": backbone_cfg(b)["label"],
                "kind": "base",
            }
            for b in BACKBONES
        ]
    rows += [
        {
            "path": f"results/released/{n}/clustering.json",
            "label": label(v["method"], v["backbone"]),
            "kind": "released",
        }
        for n, v in RELEASED.items()
    ]
    return rows


# ------------------------------------------------------------------------------------------------
# MTEB


def mteb_args():
    tasks = " ".join(CONFIG["mteb"]["tasks"])
    local = " --local-stsb resources/senteval" if CONFIG["mteb"]["local_stsb"] else ""
    return f"--tasks {tasks}{local}"


def mteb_rows():
    """The MTEB table's inputs (each with its sts_test.json): every run, base, released."""
    return [
        {
            "mteb": row["path"].replace("clustering.json", "mteb.json"),
            "sts": row["path"].replace("clustering.json", "sts_test.json"),
            "label": row["label"]
            + {"run": "", "base": " (base)", "released": " (released)"}[row["kind"]],
        }
        for row in clustering_rows()
    ]


# ------------------------------------------------------------------------------------------------
# Release folders and the Hub


def release_inputs(w):
    """What a run's release folder (model + card) is built from: the model, run.json and every
    evaluation the config computes for runs."""
    run = f"results/runs/{w.method}/{w.backbone}/seed{w.seed}"
    inputs = {
        "model": f"{run}/model",
        "summary": f"{run}/run.json",
        "sts": f"{run}/sts_test.json",
    }
    if CONFIG["transfer"]["enabled"]:
        inputs["transfer"] = f"{run}/transfer.json"
    if CLUSTERING["enabled"]:
        inputs["clustering"] = f"{run}/clustering.json"
    return inputs


def release_result_args(w, input):
    return " ".join(
        f"--{k} {input[k]}"
        for k in ("sts", "transfer", "clustering")
        if k in input.keys()
    )


def hub_repo_id(w):
    return CONFIG["release"]["repo_id"].format(
        method=w.method, backbone=w.backbone, seed=w.seed
    )


def final_targets():
    """What `snakemake` with no target builds: every run evaluated, tables, plots."""
    targets = run_files("sts_test.json") + base_scores() + released_scores()
    targets += report_targets()
    if CONFIG["transfer"]["enabled"]:
        targets += ["results/tables/transfer.md", "results/tables/transfer.csv"]
    if CLUSTERING["enabled"]:
        targets += [f"results/tables/clustering.{ext}" for ext in ("md", "csv", "tex")]
    if CONFIG["mteb"]["enabled"]:
        targets += ["results/tables/mteb.md", "results/tables/mteb.csv"]
    if CONFIG["release"]["enabled"]:
        targets += run_files("release")
    if CONFIG["release"]["push"]:
        targets += run_files("pushed.json")
    return targets
