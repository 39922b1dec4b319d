"""Stage entry point: ``python -m clusterns.transfer`` runs the transfer-task evaluator
(:mod:`clusterns.evaluation.transfer`); ``python -m clusterns.transfer table`` makes its table."""

from clusterns.evaluation.transfer import main

if __name__ == "__main__":
    raise SystemExit(main())
