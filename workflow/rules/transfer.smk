# SentEval transfer tasks (MR, CR, SUBJ, MPQA, SST2, TREC, MRPC) of trained runs, and one table.
# Mode: config `transfer: {mode: fast|test}` (fast = SimCSE's fasttest, 5-fold; test = 10-fold);
# `transfer.max_examples: N` subsamples every larger split (quick checks only).


rule transfer:
    input:
        model="results/runs/{method}/{backbone}/seed{seed}/model",
        senteval="resources/senteval",
        code=stage_sources("transfer"),
    output:
        "results/runs/{method}/{backbone}/seed{seed}/transfer.json",
    log:
        "results/logs/transfer/{method}_{backbone}_seed{seed}.log",
    conda:
        "../envs/evaluation.yaml"
    threads: 2
    params:
        pooler=run_eval_pooler,
        mode=CONFIG["transfer"]["mode"],
        max_examples=transfer_max_examples(),
        batch=CONFIG["evaluation"]["batch_size"],
        dtype=CONFIG["evaluation"]["dtype"],
    shell:
        "OMP_NUM_THREADS={threads} python -m clusterns.transfer --model {input.model} --pooler {params.pooler} "
        "--senteval {input.senteval} --mode {params.mode} --batch-size {params.batch} --dtype {params.dtype} "
        "{params.max_examples} --output {output} > {log} 2>&1"


rule transfer_table:
    input:
        runs=run_files("transfer.json"),
        code=stage_sources("transfer"),
    output:
        md="results/tables/transfer.md",
        csv="results/tables/transfer.csv",
    log:
        "results/logs/transfer/table.log",
    conda:
        "../envs/evaluation.yaml"
    params:
        labels=[transfer_label(r) for r in RUNS],
    shell:
        "python -m clusterns.transfer table --inputs {input.runs} --labels {params.labels:q} "
        "--out-dir results/tables > {log} 2>&1"
