# Downloads (upstream URL or mirror), verification, unpacking, backbones. These rules list no
# `code` input: what they produce is fixed by its source (checksums, sizes, line counts, pinned
# revisions in the config), and rerunning them after a change in clusterns.data would rerun
# every job of the grid.


rule fetch_wiki:
    output:
        "resources/data/wiki1m_for_simcse.txt",
    log:
        "results/logs/data/fetch_wiki.log",
    conda:
        "../envs/data.yaml"
    params:
        url=CONFIG["data"]["wiki"]["url"],
        mirror=mirror_arg(),
        args=source_args("wiki"),
    shell:
        "python -m clusterns.data fetch --url {params.url} --output {output} {params.mirror} {params.args} > {log} 2>&1"


use rule fetch_wiki as fetch_senteval with:
    output:
        "resources/data/senteval.tar",
    log:
        "results/logs/data/fetch_senteval.log",
    params:
        url=CONFIG["data"]["senteval"]["url"],
        args=source_args("senteval"),


rule unpack_senteval:
    input:
        "resources/data/senteval.tar",
    output:
        directory("resources/senteval"),
    log:
        "results/logs/data/unpack_senteval.log",
    conda:
        "../envs/data.yaml"
    shell:
        "python -m clusterns.data unpack --archive {input} --output {output} > {log} 2>&1"


rule fetch_backbone:
    output:
        directory("resources/models/{backbone}"),
    log:
        "results/logs/data/fetch_backbone_{backbone}.log",
    conda:
        "../envs/data.yaml"
    params:
        model=lambda w: backbone_cfg(w.backbone)["model"],
        revision=lambda w: revision_arg(backbone_cfg(w.backbone)),
    shell:
        "python -m clusterns.data backbone --model {params.model} {params.revision} --output {output} > {log} 2>&1"


use rule fetch_backbone as fetch_released with:
    output:
        directory("resources/released/{name}"),
    log:
        "results/logs/data/fetch_released_{name}.log",
    params:
        model=lambda w: RELEASED[w.name]["model"],
        revision=lambda w: revision_arg(RELEASED[w.name]),
