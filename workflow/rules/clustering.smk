# Short-text clustering (the paper's Table 6) of trained runs, of the untrained backbones and of
# released checkpoints, and one table. The eight sets come from `clustering.datasets` (upstream
# URL, sha256, lines, classes), fetched like every other download (verified, atomic, mirror).


use rule fetch_wiki as fetch_clustering with:
    output:
        "resources/data/clustering/{file}",
    log:
        "results/logs/data/fetch_clustering_{file}.log",
    params:
        url=lambda w: clustering_dataset(w.file)["url"],
        args=lambda w: clustering_source_args(w.file),


rule cluster_eval:
    input:
        model="results/runs/{method}/{backbone}/seed{seed}/model",
        data=clustering_files(),
        code=stage_sources("cluster_eval"),
    output:
        "results/runs/{method}/{backbone}/seed{seed}/clustering.json",
    log:
        "results/logs/clustering/{method}_{backbone}_seed{seed}.log",
    conda:
        "../envs/evaluation.yaml"
    threads: 2
    params:
        pooler=lambda w: clustering_pooler(run_eval_pooler(w)),
        args=clustering_args(),
        batch=CONFIG["evaluation"]["batch_size"],
        dtype=CONFIG["evaluation"]["dtype"],
    shell:
        "OMP_NUM_THREADS={threads} python -m clusterns.cluster_eval --model {input.model} --pooler {params.pooler} "
        "--data resources/data/clustering {params.args} --batch-size {params.batch} --dtype {params.dtype} "
        "--output {output} > {log} 2>&1"


use rule cluster_eval as cluster_eval_base with:
    input:
        model=lambda w: backbone_dir(w.backbone),
        data=clustering_files(),
        code=stage_sources("cluster_eval"),
    output:
        "results/base/{backbone}/clustering.json",
    log:
        "results/logs/clustering/base_{backbone}.log",
    params:
        pooler=lambda w: clustering_pooler(eval_pooler(w.backbone)),


use rule cluster_eval as cluster_eval_released with:
    input:
        model=lambda w: released_dir(w.name),
        data=clustering_files(),
        code=stage_sources("cluster_eval"),
    output:
        "results/released/{name}/clustering.json",
    log:
        "results/logs/clustering/released_{name}.log",
    params:
        pooler=lambda w: clustering_pooler(RELEASED[w.name]["pooler"]),


rule clustering_table:
    input:
        results=[row["path"] for row in clustering_rows()],
        code=stage_sources("cluster_eval"),
    output:
        report(
            "results/tables/clustering.md",
            category="Tables",
            caption="../report/clustering.rst",
        ),
        "results/tables/clustering.csv",
        "results/tables/clustering.tex",
    log:
        "results/logs/clustering/table.log",
    conda:
        "../envs/evaluation.yaml"
    params:
        labels=[row["label"] for row in clustering_rows()],
        kinds=[row["kind"] for row in clustering_rows()],
    shell:
        "python -m clusterns.cluster_eval table --inputs {input.results} --labels {params.labels:q} "
        "--kinds {params.kinds} --out-dir results/tables > {log} 2>&1"
