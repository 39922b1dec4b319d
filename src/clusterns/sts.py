"""Stage entry point: ``python -m clusterns.sts`` runs the STS evaluator (:mod:`clusterns.evaluation.sts`)."""

from clusterns.evaluation.sts import main

if __name__ == "__main__":
    raise SystemExit(main())
