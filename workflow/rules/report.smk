# Tables (mean ± std over seeds beside the published numbers), paired comparison, plots.
# `snakemake partial_report` builds the same tables and plots from whatever runs exist now.


localrules:
    report_manifest,


rule report_manifest:
    output:
        "results/report/manifest.json",
    log:
        "results/logs/report/manifest.log",
    conda:
        "../envs/report.yaml"
    params:
        manifest=lambda w: cfg.dumps(manifest()),
    shell:
        "printf '%s\\n' {params.manifest:q} > {output} 2> {log}"


rule tables:
    input:
        manifest="results/report/manifest.json",
        paper=PAPER_RESULTS,
        runs=run_files("sts_test.json"),
        base=base_scores(),
        released=released_scores(),
        code=stage_sources("report"),
    output:
        [
            (
                report(
                    f"results/tables/{t}.{ext}",
                    category="Tables",
                    caption=f"../report/{t}.rst",
                )
                if ext == "md"
                else f"results/tables/{t}.{ext}"
            )
            for t in TABLES
            for ext in ("md", "csv", "tex")
        ],
    log:
        "results/logs/report/tables.log",
    conda:
        "../envs/report.yaml"
    shell:
        "python -m clusterns.report tables --manifest {input.manifest} --paper {input.paper} "
        "--out-dir results/tables > {log} 2>&1"


rule plots:
    input:
        manifest="results/report/manifest.json",
        paper=PAPER_RESULTS,
        runs=run_files("sts_test.json", "train_log.csv", "eval_log.csv", "run.json"),
        base=base_scores(),
        code=stage_sources("report"),
    output:
        [
            report(
                f"results/plots/{p}.png",
                category="Plots",
                caption=f"../report/{p}.rst",
            )
            for p in plot_names()
        ]
        + [f"results/plots/{p}.pdf" for p in plot_names()],
    log:
        "results/logs/report/plots.log",
    conda:
        "../envs/report.yaml"
    shell:
        "python -m clusterns.report plots --manifest {input.manifest} --paper {input.paper} "
        "--out-dir results/plots > {log} 2>&1"


rule partial_report:
    """Tables and plots from the runs that exist now (missing seeds marked); always reruns."""
    input:
        manifest="results/report/manifest.json",
        paper=PAPER_RESULTS,
    log:
        "results/logs/report/partial.log",
    conda:
        "../envs/report.yaml"
    shell:
        "(python -m clusterns.report tables --manifest {input.manifest} --paper {input.paper} --out-dir results/partial/tables"
        " && python -m clusterns.report plots --manifest {input.manifest} --paper {input.paper} --out-dir results/partial/plots)"
        " > {log} 2>&1 && cat results/partial/tables/main.md"
