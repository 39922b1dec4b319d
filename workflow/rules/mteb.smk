# MTEB (the mteb package) on every run, base backbone and released checkpoint, beside the
# SentEval-protocol scores in one table. Off by default: MTEB reads its data from the Hugging
# Face Hub (`mteb.local_stsb: true` builds its STSBenchmark from SentEval's file instead).


rule mteb:
    input:
        model="results/runs/{method}/{backbone}/seed{seed}/model",
        senteval="resources/senteval",
        code=stage_sources("mteb_eval"),
    output:
        "results/runs/{method}/{backbone}/seed{seed}/mteb.json",
    log:
        "results/logs/mteb/{method}_{backbone}_seed{seed}.log",
    conda:
        "../envs/evaluation.yaml"
    threads: 2
    params:
        pooler=run_eval_pooler,
        args=mteb_args(),
        batch=CONFIG["evaluation"]["batch_size"],
        dtype=CONFIG["evaluation"]["dtype"],
    shell:
        "OMP_NUM_THREADS={threads} python -m clusterns.mteb_eval --model {input.model} --pooler {params.pooler} "
        "{params.args} --batch-size {params.batch} --dtype {params.dtype} --output {output} > {log} 2>&1"


use rule mteb as mteb_base with:
    input:
        model=lambda w: backbone_dir(w.backbone),
        senteval="resources/senteval",
        code=stage_sources("mteb_eval"),
    output:
        "results/base/{backbone}/mteb.json",
    log:
        "results/logs/mteb/base_{backbone}.log",
    params:
        pooler=lambda w: eval_pooler(w.backbone),


use rule mteb as mteb_released with:
    input:
        model=lambda w: released_dir(w.name),
        senteval="resources/senteval",
        code=stage_sources("mteb_eval"),
    output:
        "results/released/{name}/mteb.json",
    log:
        "results/logs/mteb/released_{name}.log",
    params:
        pooler=lambda w: RELEASED[w.name]["pooler"],


rule mteb_table:
    input:
        results=[row["mteb"] for row in mteb_rows()],
        sts=[row["sts"] for row in mteb_rows()],
        code=stage_sources("mteb_eval"),
    output:
        md="results/tables/mteb.md",
        csv="results/tables/mteb.csv",
    log:
        "results/logs/mteb/table.log",
    conda:
        "../envs/evaluation.yaml"
    params:
        labels=[row["label"] for row in mteb_rows()],
    shell:
        "python -m clusterns.mteb_eval table --inputs {input.results} --labels {params.labels:q} "
        "--sts {input.sts} --out-dir results/tables > {log} 2>&1"
