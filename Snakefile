# Entry point so that `snakemake` works from the project root; the workflow lives in workflow/.
include: "workflow/Snakefile"


# Snakemake takes the default target from this file only (an include keeps its own), so the
# workflow's `all` is named here once more.
localrules:
    default,


rule default:
    default_target: True
    input:
        rules.all.input,
