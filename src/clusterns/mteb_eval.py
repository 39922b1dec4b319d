"""Stage entry point: ``python -m clusterns.mteb_eval`` scores a model on MTEB tasks
(:mod:`clusterns.evaluation.mteb_eval`)."""

from clusterns.evaluation.mteb_eval import main

if __name__ == "__main__":
    raise SystemExit(main())
