# STS test-set evaluation (SentEval "all" setting) of trained runs, of the untrained backbones
# (base rows) and of released checkpoints: one rule, two variants that differ in model and pooler.


rule evaluate:
    input:
        model="results/runs/{method}/{backbone}/seed{seed}/model",
        senteval="resources/senteval",
        code=stage_sources("sts"),
    output:
        "results/runs/{method}/{backbone}/seed{seed}/sts_test.json",
    log:
        "results/logs/evaluate/{method}_{backbone}_seed{seed}.log",
    conda:
        "../envs/evaluation.yaml"
    threads: 2
    params:
        pooler=run_eval_pooler,
        batch=CONFIG["evaluation"]["batch_size"],
        dtype=CONFIG["evaluation"]["dtype"],
    shell:
        "OMP_NUM_THREADS={threads} python -m clusterns.sts --model {input.model} --pooler {params.pooler} "
        "--senteval {input.senteval} --mode test --batch-size {params.batch} --dtype {params.dtype} "
        "--output {output} > {log} 2>&1"


use rule evaluate as evaluate_base with:
    input:
        model=lambda w: backbone_dir(w.backbone),
        senteval="resources/senteval",
        code=stage_sources("sts"),
    output:
        report(
            "results/base/{backbone}/sts_test.json",
            category="Evaluation",
            subcategory="base",
        ),
    log:
        "results/logs/evaluate/base_{backbone}.log",
    params:
        pooler=lambda w: eval_pooler(w.backbone),


use rule evaluate as evaluate_released with:
    input:
        model=lambda w: released_dir(w.name),
        senteval="resources/senteval",
        code=stage_sources("sts"),
    output:
        report(
            "results/released/{name}/sts_test.json",
            category="Evaluation",
            subcategory="released",
        ),
    log:
        "results/logs/evaluate/released_{name}.log",
    params:
        pooler=lambda w: RELEASED[w.name]["pooler"],
