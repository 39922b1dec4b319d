"""The transfer tasks' classifier: logistic regression trained as SentEval's PyTorch classifier.

:func:`fit_logreg` and :func:`train_jobs` fit one Linear layer on the mean cross-entropy the way
SentEval's ``MLP`` with ``nhid=0`` does: the Linear initialised under ``torch.manual_seed(1111)``,
a fresh ``numpy`` RandomState(1111) for the 5 % validation split and the per-pass shuffles,
mini-batches with the last partial one kept, Adam/RMSprop with torch's default hyper-parameters
and coupled ``weight_decay = reg`` on weight and bias, ``epoch_size`` passes between validation
checks, early stopping with SentEval's never-reset ``tenacity`` counter, ``max_epoch`` 200, the
best model restored. It runs on CPU or CUDA (``device``).

Faithfulness notes
------------------
1. Fits are independent (each reseeds), so :func:`train_jobs` trains a set of them side by side
   as one bank of models (batched matrix products). Each model has its own rows, shuffles,
   weight decay, optimizer state and stopping, and its arithmetic is that of a lone fit
   (gradients of the batch-mean cross-entropy written out; Adam/RMSprop updates as torch.optim's
   single-tensor code); the tests check it against a literal SentEval training loop. Only the
   wall time changes (an order of magnitude in ``test`` mode on CPU).
2. The global RNGs are not touched: the Linear is initialised inside ``torch.random.fork_rng`` and
   shuffles come from a private ``numpy.random.RandomState(1111)``, which gives the same streams
   as SentEval's global reseeding.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from clusterns.evaluation.transfer.folds import SEED

__all__ = ["VALIDATION_SPLIT", "OPTIMIZERS", "ClassifierSettings", "LogRegFit", "FitJob", "train_jobs", "fit_logreg",
           "classifier_threads"]

VALIDATION_SPLIT = 0.05
# Torch's defaults, spelled out.
OPTIMIZERS: dict[str, dict] = {
    "adam": {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8},
    "rmsprop": {"lr": 1e-2, "alpha": 0.99, "eps": 1e-8},
}


@dataclass(frozen=True)
class ClassifierSettings:
    """SimCSE's ``params['classifier']`` plus the fold count (``kfold``) of one mode."""

    optim: str
    batch_size: int
    tenacity: int
    epoch_size: int
    kfold: int
    max_epoch: int = 200


@dataclass
class LogRegFit:
    """A trained logistic regression (the best checkpoint on its validation data)."""

    reg: float
    weight: "object"  # torch.Tensor (C, D), CPU
    bias: "object"  # torch.Tensor (C,), CPU
    best_val: float  # validation accuracy of the kept model, in [0, 1]
    epochs: int  # passes over the training data when training stopped

    def predict(self, X, device: str = "cpu", chunk: int = 65536) -> np.ndarray:
        import torch

        X = torch.as_tensor(np.asarray(X, dtype=np.float32))
        w, b = self.weight.to(device), self.bias.to(device)
        with torch.no_grad():
            out = [torch.nn.functional.linear(X[i:i + chunk].to(device), w, b).argmax(1).cpu()
                   for i in range(0, len(X), chunk)]
        return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.int64)

    def score(self, X, y, device: str = "cpu") -> float:
        """Accuracy in [0, 1] (SentEval's ``correct / n``)."""
        y = np.asarray(y)
        return int((self.predict(X, device) == y).sum()) / len(y)


@dataclass(frozen=True)
class FitJob:
    """One SentEval classifier fit on rows of a shared feature matrix.

    ``train`` rows in training order; early stopping on the ``val`` rows, or (``val=None``) on
    the first ``validation_split`` of a RandomState(seed) permutation of ``train``.
    """

    train: np.ndarray
    reg: float
    val: np.ndarray | None = None


class _Optimizer:
    """Adam / RMSprop with coupled weight decay for a bank of J models, one row each.

    The update of each model is torch.optim.Adam's / RMSprop's single-tensor update with
    ``weight_decay = reg`` of that model; a model whose ``active`` flag is off this step is left
    exactly as it is (parameters, moments and step count), as an optimizer that is not stepped.
    """

    def __init__(self, name: str, params: list, regs, device):
        import torch

        if name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r}; choose adam or rmsprop")
        self.name, self.hp = name, OPTIMIZERS[name]
        self.params = params
        self.wd = [torch.as_tensor(np.asarray(regs), dtype=p.dtype, device=device).view(-1, *[1] * (p.dim() - 1))
                   for p in params]
        self.sq = [torch.zeros_like(p) for p in params]
        self.avg = [torch.zeros_like(p) for p in params] if name == "adam" else None
        self.steps = np.zeros(len(regs), dtype=np.int64)

    def keep(self, rows) -> None:
        """Drop the models not in ``rows`` (they stopped training)."""
        self.params[:] = [p[rows] for p in self.params]
        self.wd = [w[rows] for w in self.wd]
        self.sq = [s[rows] for s in self.sq]
        if self.avg is not None:
            self.avg = [a[rows] for a in self.avg]
        self.steps = self.steps[rows.cpu().numpy() if hasattr(rows, "cpu") else rows]

    def step(self, grads: list, active) -> None:
        import torch

        act_np = active.cpu().numpy()
        self.steps = self.steps + act_np
        if self.name == "adam":
            beta1, beta2 = self.hp["betas"]
            steps = np.maximum(self.steps, 1).astype(np.float64)
            step_size = torch.as_tensor(self.hp["lr"] / (1 - beta1 ** steps), dtype=self.params[0].dtype)
            bc2_sqrt = torch.as_tensor(np.sqrt(1 - beta2 ** steps), dtype=self.params[0].dtype)
        for i, (p, g) in enumerate(zip(self.params, grads)):
            shape = (-1,) + (1,) * (p.dim() - 1)
            mask = active.view(shape)
            g = g + self.wd[i] * p
            if self.name == "adam":
                avg = self.avg[i].lerp(g, 1 - beta1)
                sq = self.sq[i] * beta2 + (1 - beta2) * g * g
                denom = sq.sqrt() / bc2_sqrt.to(p.device).view(shape) + self.hp["eps"]
                new = p - step_size.to(p.device).view(shape) * avg / denom
                self.avg[i] = torch.where(mask, avg, self.avg[i])
            else:
                sq = self.sq[i] * self.hp["alpha"] + (1 - self.hp["alpha"]) * g * g
                new = p - self.hp["lr"] * g / (sq.sqrt() + self.hp["eps"])
            self.sq[i] = torch.where(mask, sq, self.sq[i])
            p.copy_(torch.where(mask, new, p))


def train_jobs(X, y, jobs: Sequence[FitJob], nclasses: int, settings: ClassifierSettings, *,
               device: str = "cpu", seed: int = SEED, dtype=None) -> list[LogRegFit]:
    """Run SentEval classifier fits (``MLP`` with ``nhid=0``) on rows of ``X``; one result per job.

    Every fit starts as SentEval's does after reseeding with ``seed``: the Linear(D, C) drawn
    under ``torch.manual_seed(seed)`` and a fresh ``RandomState(seed)`` for the validation split
    and the per-pass shuffles. Per pass, the training rows are visited in a new permutation in
    mini-batches of ``batch_size`` (last one partial); each step minimises the batch-mean
    cross-entropy with the mode's optimizer and ``weight_decay = reg``. After every
    ``epoch_size`` passes the validation accuracy is checked: a strictly better one keeps a copy
    of the model; otherwise, once ``tenacity`` earlier checks have failed to improve, the fit
    stops (the failure counter is never reset). At most ``max_epoch`` (+ one round) passes; the
    kept model is returned.

    The jobs are independent and are trained side by side as one bank (batched matrix
    products), each with its own data, shuffles, weight decay, optimizer state and stopping; a
    job whose pass has fewer batches than the longest skips the extra steps.

    ``dtype``: float32 (SentEval's, the default); float64 lets tests compare against a literal
    reference loop without float32 rounding deciding a tied validation prediction.
    """
    import torch

    dtype = dtype or torch.float32

    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    if X.ndim != 2 or len(X) != len(y):
        raise ValueError(f"X must be (n, d) with one label per row; got X {X.shape}, y {y.shape}")
    if len(y) and (y.min() < 0 or y.max() >= nclasses):
        raise ValueError(f"labels must lie in [0, {nclasses})")
    if not jobs:
        return []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        init = torch.nn.Linear(X.shape[1], nclasses)  # created on CPU, as SentEval's before .cuda()
    rngs, trains, vals = [], [], []
    for job in jobs:
        rng = np.random.RandomState(seed)  # = np.random.seed(seed), then the global draws of one fit
        train = np.asarray(job.train, dtype=np.int64)
        if job.val is None:
            perm = rng.permutation(len(train))
            cut = int(VALIDATION_SPLIT * len(train))
            train, val = train[perm[cut:]], train[perm[:cut]]
        else:
            val = np.asarray(job.val, dtype=np.int64)
        if len(train) == 0 or len(val) == 0:
            raise ValueError(f"too few examples to fit: {len(train)} to train on, {len(val)} to validate on")
        rngs.append(rng)
        trains.append(train)
        vals.append(val)
    dev = torch.device(device)
    vals_t = [torch.from_numpy(v).to(dev) for v in vals]
    X_t, y_t = torch.from_numpy(X).to(device=dev, dtype=dtype), torch.from_numpy(y).to(dev)
    J, bs = len(jobs), settings.batch_size
    W = init.weight.detach().to(device=dev, dtype=dtype).expand(J, -1, -1).clone()  # (J, C, D)
    b = init.bias.detach().to(device=dev, dtype=dtype).expand(J, -1).clone()  # (J, C)
    params = [W, b]
    opt = _Optimizer(settings.optim, params, [j.reg for j in jobs], dev)
    ids = list(range(J))  # the job of each bank row
    best = [-1.0] * J
    kept: list = [None] * J
    strikes = [0] * J
    stopped_at = [0] * J
    nepoch = 0
    with torch.no_grad():
        while ids and nepoch <= settings.max_epoch:
            W, b = params
            n_rows = [len(trains[j]) for j in ids]
            steps = -(-max(n_rows) // bs)
            for _ in range(settings.epoch_size):
                order = np.zeros((len(ids), steps * bs), dtype=np.int64)
                valid = np.zeros((len(ids), steps * bs), dtype=np.float32)
                for r, j in enumerate(ids):
                    order[r, :n_rows[r]] = trains[j][rngs[j].permutation(n_rows[r])]
                    valid[r, :n_rows[r]] = 1.0
                order_t, valid_t = torch.from_numpy(order).to(dev), torch.from_numpy(valid).to(dev, dtype)
                for s in range(steps):
                    idx, mask = order_t[:, s * bs:(s + 1) * bs], valid_t[:, s * bs:(s + 1) * bs]
                    count = mask.sum(1)  # rows in this step's batch, per job (0: the job's pass is over)
                    xb = X_t[idx]  # (J, B, D)
                    logits = torch.baddbmm(b.unsqueeze(1), xb, W.transpose(1, 2))  # (J, B, C)
                    g = torch.softmax(logits, dim=2)
                    g.scatter_add_(2, y_t[idx].unsqueeze(2), -torch.ones_like(mask).unsqueeze(2))
                    g = g * (mask / count.clamp(min=1).unsqueeze(1)).unsqueeze(2)  # d(mean CE)/d logits
                    opt.step([torch.bmm(g.transpose(1, 2), xb), g.sum(1)], count > 0)
            nepoch += settings.epoch_size
            still = []
            for r, j in enumerate(ids):
                acc = _accuracy(X_t[vals_t[j]], y_t[vals_t[j]], W[r], b[r])
                if acc > best[j]:
                    best[j] = acc
                    kept[j] = (W[r].cpu().clone(), b[r].cpu().clone())
                    still.append(r)
                elif strikes[j] >= settings.tenacity:
                    strikes[j] += 1
                    stopped_at[j] = nepoch
                else:
                    strikes[j] += 1
                    still.append(r)
            if len(still) < len(ids):
                rows = torch.as_tensor(still, dtype=torch.long, device=dev)
                opt.keep(rows)
                ids = [ids[r] for r in still]
    for j in ids:  # ran out of epochs
        stopped_at[j] = nepoch
    return [LogRegFit(float(job.reg), kept[j][0], kept[j][1], best[j], stopped_at[j]) for j, job in enumerate(jobs)]


def _accuracy(X, y, weight, bias, chunk: int = 65536) -> float:
    import torch

    correct = 0
    for i in range(0, len(X), chunk):
        pred = torch.nn.functional.linear(X[i:i + chunk], weight, bias).argmax(1)
        correct += int((pred == y[i:i + chunk]).sum().item())
    return correct / len(X)


def fit_logreg(X, y, nclasses: int, regs: Sequence[float], settings: ClassifierSettings, *,
               validation: tuple | None = None, validation_split: bool = False,
               device: str = "cpu", seed: int = SEED, dtype=None) -> list[LogRegFit]:
    """One fit per value in ``regs`` on all of (X, y), early-stopping on ``validation`` =
    (X_val, y_val), or with ``validation_split=True`` on SentEval's 5 % split of (X, y)."""
    X = np.asarray(X, dtype=np.float32)
    y = np.asarray(y, dtype=np.int64)
    if not regs:
        raise ValueError("fit_logreg needs at least one regularisation value")
    train = np.arange(len(X))
    if validation is not None:
        Xv, yv = np.asarray(validation[0], dtype=np.float32), np.asarray(validation[1], dtype=np.int64)
        val = np.arange(len(X), len(X) + len(Xv))
        X, y = np.concatenate([X, Xv.reshape(-1, X.shape[1])]), np.concatenate([y, yv])
    elif validation_split:
        val = None
    else:
        raise ValueError("fit_logreg needs validation data or validation_split=True")
    return train_jobs(X, y, [FitJob(train, float(reg), val) for reg in regs], nclasses, settings,
                      device=device, seed=seed, dtype=dtype)


@contextlib.contextmanager
def classifier_threads(device: str):
    """One intra-op thread for the classifier on CPU: its matrices are small, so threads only add
    overhead (a lot on a busy machine), and a fixed count keeps the arithmetic the same on every
    machine. The previous setting is restored."""
    import torch

    if torch.device(device).type != "cpu":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
