# STS test-set evaluation (SentEval "all" setting) of trained runs and of the untrained backbones.


rule evaluate_base:
    input:
        model=lambda w: backbone_dir(w.backbone),
        senteval="resources/senteval",
        code=src("sts", "encoder", "prompt"),
    output:
        report("results/base/{backbone}/sts_test.json", category="Evaluation", subcategory="base"),
    params:
        pooler=lambda w: eval_pooler(w.backbone),
        batch=evaluation("batch_size", 128),
        dtype=evaluation("dtype", "fp32"),
    threads: 2
    log:
        "results/logs/evaluate/base_{backbone}.log",
    shell:
        "OMP_NUM_THREADS={threads} python -m clusterns.sts --model {input.model} --pooler {params.pooler} "
        "--senteval {input.senteval} --mode test --batch-size {params.batch} --dtype {params.dtype} "
        "--output {output} > {log} 2>&1"


rule evaluate:
    input:
        model="results/runs/{method}/{backbone}/seed{seed}/model",
        senteval="resources/senteval",
        code=src("sts", "encoder", "prompt"),
    output:
        "results/runs/{method}/{backbone}/seed{seed}/sts_test.json",
    params:
        pooler=run_eval_pooler,
        batch=evaluation("batch_size", 128),
        dtype=evaluation("dtype", "fp32"),
    threads: 2
    log:
        "results/logs/evaluate/{method}_{backbone}_seed{seed}.log",
    shell:
        "OMP_NUM_THREADS={threads} python -m clusterns.sts --model {input.model} --pooler {params.pooler} "
        "--senteval {input.senteval} --mode test --batch-size {params.batch} --dtype {params.dtype} "
        "--output {output} > {log} 2>&1"


rule evaluate_released:
    input:
        model=lambda w: released_dir(w.name),
        senteval="resources/senteval",
        code=src("sts", "encoder", "prompt"),
    output:
        report("results/released/{name}/sts_test.json", category="Evaluation", subcategory="released"),
    params:
        pooler=lambda w: RELEASED[w.name]["pooler"],
        batch=evaluation("batch_size", 128),
        dtype=evaluation("dtype", "fp32"),
    threads: 2
    log:
        "results/logs/evaluate/released_{name}.log",
    shell:
        "OMP_NUM_THREADS={threads} python -m clusterns.sts --model {input.model} --pooler {params.pooler} "
        "--senteval {input.senteval} --mode test --batch-size {params.batch} --dtype {params.dtype} "
        "--output {output} > {log} 2>&1"
