"""Stage entry point: ``python -m clusterns.cluster_eval`` runs the short-text clustering evaluator
(:mod:`clusterns.evaluation.cluster_eval`)."""

from clusterns.evaluation.cluster_eval import main

if __name__ == "__main__":
    raise SystemExit(main())
