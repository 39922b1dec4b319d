# One tokenized cache per backbone and max length, shared by every method and seed.


rule tokenize:
    input:
        text="resources/data/wiki1m_for_simcse.txt",
        model=lambda w: backbone_dir(w.backbone),
        code=src("tokenize"),
    output:
        directory("resources/tokenized/{backbone}/L{maxlen}"),
    threads: 2
    log:
        "results/logs/tokenize/{backbone}_L{maxlen}.log",
    shell:
        "python -m clusterns.tokenize --model {input.model} --input {input.text} --max-length {wildcards.maxlen} "
        "--output {output} --num-proc {threads} > {log} 2>&1"
