# SentEval transfer tasks (MR, CR, SUBJ, MPQA, SST2, TREC, MRPC) of trained runs, and one table.
# Mode: config `transfer: {mode: fast|test}` (fast = SimCSE's fasttest, 5-fold; test = 10-fold);
# `transfer.max_examples: N` subsamples every larger split (quick checks only).


def transfer_mode():
    return config.get("transfer", {}).get("mode", "fast")


def transfer_max_examples():
    """`--max-examples N` when `transfer.max_examples` is set (quick checks; rows marked subsampled)."""
    n = config.get("transfer", {}).get("max_examples")
    return f"--max-examples {n}" if n is not None else ""


def transfer_label(run):
    methods = config["methods"]
    backbones = config["backbones"]
    return (f"{methods[run.method].get('label', run.method)} / "
            f"{backbones[run.backbone].get('label', run.backbone)} / seed {run.seed}")


rule transfer:
    input:
        model="results/runs/{method}/{backbone}/seed{seed}/model",
        senteval="resources/senteval",
        code=src("transfer", "sts", "encoder", "prompt"),
    output:
        "results/runs/{method}/{backbone}/seed{seed}/transfer.json",
    params:
        pooler=run_eval_pooler,
        mode=lambda w: transfer_mode(),
        max_examples=lambda w: transfer_max_examples(),
        batch=evaluation("batch_size", 128),
        dtype=evaluation("dtype", "fp32"),
    threads: 2
    log:
        "results/logs/transfer/{method}_{backbone}_seed{seed}.log",
    shell:
        "OMP_NUM_THREADS={threads} python -m clusterns.transfer --model {input.model} --pooler {params.pooler} "
        "--senteval {input.senteval} --mode {params.mode} --batch-size {params.batch} --dtype {params.dtype} "
        "{params.max_examples} --output {output} > {log} 2>&1"


rule transfer_table:
    input:
        runs=[f"{r.dir}/transfer.json" for r in RUNS],
        code=src("transfer"),
    output:
        md="results/tables/transfer.md",
        csv="results/tables/transfer.csv",
    params:
        labels=[transfer_label(r) for r in RUNS],
    log:
        "results/logs/transfer/table.log",
    shell:
        "python -m clusterns.transfer table --inputs {input.runs} --labels {params.labels:q} "
        "--out-dir results/tables > {log} 2>&1"
