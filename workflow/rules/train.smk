# One training run = one `accelerate launch` on one node (GPUs leased by clusterns.launch, which
# runs clusterns.train: the code of both). Resume state lives in results/state/... (not an
# output: Snakemake deletes the outputs of a failed job, never this folder), so rerunning a
# killed job continues from its checkpoint.


rule train:
    input:
        data=lambda w: tokenized_dir(run_of(w)),
        model=lambda w: backbone_dir(w.backbone),
        senteval="resources/senteval",
        code=stage_sources("launch", "train"),
    output:
        model=directory("results/runs/{method}/{backbone}/seed{seed}/model"),
        train_log=report(
            "results/runs/{method}/{backbone}/seed{seed}/train_log.csv",
            category="Training logs",
        ),
        eval_log="results/runs/{method}/{backbone}/seed{seed}/eval_log.csv",
        run="results/runs/{method}/{backbone}/seed{seed}/run.json",
    log:
        "results/logs/train/{method}/{backbone}/seed{seed}.log",
    conda:
        "../envs/training.yaml"
    threads: 4
    resources:
        gpu=lambda w: run_of(w).training["gpus"],
    params:
        hp=run_hparams,
        run_dir="results/runs/{method}/{backbone}/seed{seed}",
        state_dir="results/state/{method}/{backbone}/seed{seed}",
    shell:
        "OMP_NUM_THREADS={threads} python -m clusterns.launch --gpus {resources.gpu} -- "
        "--hparams {params.hp:q} --data {input.data} --model {input.model} --senteval {input.senteval} "
        "--run-dir {params.run_dir} --state-dir {params.state_dir} > {log} 2>&1"
