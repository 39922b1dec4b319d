# One tokenized cache per backbone and max length, shared by every method and seed.


rule tokenize:
    input:
        text="resources/data/wiki1m_for_simcse.txt",
        model=lambda w: backbone_dir(w.backbone),
        code=stage_sources("tokenize"),
    output:
        directory("resources/tokenized/{backbone}/{fmt}{maxlen}"),
    log:
        "results/logs/tokenize/{backbone}_{fmt}{maxlen}.log",
    conda:
        "../envs/training.yaml"
    threads: 2
    params:
        sentence_only=lambda w: "--sentence-only" if w.fmt == "S" else "",
    shell:
        "python -m clusterns.tokenize --model {input.model} --input {input.text} --max-length {wildcards.maxlen} "
        "--output {output} --num-proc {threads} {params.sentence_only} > {log} 2>&1"
