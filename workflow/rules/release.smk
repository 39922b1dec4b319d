# The publishable folder of every run: its model files (hard links) and a model card with the
# run's settings and evaluation results; and, only with `release.push: true`, the upload to the
# Hugging Face Hub (token from HF_TOKEN).


rule release:
    input:
        unpack(release_inputs),
        code=stage_sources("release"),
    output:
        directory("results/runs/{method}/{backbone}/seed{seed}/release"),
    log:
        "results/logs/release/{method}_{backbone}_seed{seed}.log",
    conda:
        "../envs/report.yaml"
    params:
        run_dir="results/runs/{method}/{backbone}/seed{seed}",
        results=release_result_args,
    shell:
        "python -m clusterns.release build --run-dir {params.run_dir} --output {output} {params.results} > {log} 2>&1"


rule push:
    input:
        folder="results/runs/{method}/{backbone}/seed{seed}/release",
        code=stage_sources("release"),
    output:
        "results/runs/{method}/{backbone}/seed{seed}/pushed.json",
    log:
        "results/logs/release/push_{method}_{backbone}_seed{seed}.log",
    conda:
        "../envs/report.yaml"
    params:
        repo_id=hub_repo_id,
        private="--private" if CONFIG["release"]["private"] else "",
    shell:
        "python -m clusterns.release push --folder {input.folder} --repo-id {params.repo_id} {params.private} "
        "--record {output} > {log} 2>&1"
