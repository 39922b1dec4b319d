"""The pieces of the training loop of :mod:`clusterns.train`: the data order and batches (data),
checkpoints and the state they carry (checkpoint), the per-step and per-evaluation logs (logs),
and the model selection on STS-B dev (selection)."""


class TrainingError(RuntimeError):
    """A run cannot go on (bad input or a diverged loss); the message says why and what to do."""
