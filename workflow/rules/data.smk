# Downloads (upstream URL or mirror), verification, unpacking, backbones.


rule fetch_wiki:
    output:
        "resources/data/wiki1m_for_simcse.txt",
    params:
        url=config["data"]["wiki"]["url"],
        mirror=f"--mirror {MIRROR}" if MIRROR else "",
        args=" ".join(f"--{k} {v}" for k, v in config["data"]["wiki"].items() if k != "url" and v is not None),
    log:
        "results/logs/data/fetch_wiki.log",
    shell:
        "python -m clusterns.data fetch --url {params.url} --output {output} {params.mirror} {params.args} > {log} 2>&1"


rule fetch_senteval:
    output:
        "resources/data/senteval.tar",
    params:
        url=config["data"]["senteval"]["url"],
        mirror=f"--mirror {MIRROR}" if MIRROR else "",
        args=" ".join(f"--{k} {v}" for k, v in config["data"]["senteval"].items() if k != "url" and v is not None),
    log:
        "results/logs/data/fetch_senteval.log",
    shell:
        "python -m clusterns.data fetch --url {params.url} --output {output} {params.mirror} {params.args} > {log} 2>&1"


rule unpack_senteval:
    input:
        "resources/data/senteval.tar",
    output:
        directory("resources/senteval"),
    log:
        "results/logs/data/unpack_senteval.log",
    shell:
        "python -m clusterns.data unpack --archive {input} --output {output} > {log} 2>&1"


rule fetch_backbone:
    output:
        directory("resources/models/{backbone}"),
    params:
        model=lambda w: backbone_cfg(w.backbone)["model"],
        revision=lambda w: f"--revision {backbone_cfg(w.backbone)['revision']}" if backbone_cfg(w.backbone).get("revision") else "",
    log:
        "results/logs/data/fetch_backbone_{backbone}.log",
    shell:
        "python -m clusterns.data backbone --model {params.model} {params.revision} --output {output} > {log} 2>&1"


rule fetch_released:
    output:
        directory("resources/released/{name}"),
    params:
        model=lambda w: RELEASED[w.name]["model"],
        revision=lambda w: f"--revision {RELEASED[w.name]['revision']}" if RELEASED[w.name].get("revision") else "",
    log:
        "results/logs/data/fetch_released_{name}.log",
    shell:
        "python -m clusterns.data backbone --model {params.model} {params.revision} --output {output} > {log} 2>&1"
