"""``normkit compare``: train one small CNN per norm and batch size and see which norms survive
small batches (Wu & He, 2018, Group Normalization, Fig. 1).

The data are scikit-learn's 8x8 handwritten digits (``load_digits`` ships with the package; no
download) or the user's images. Every run sees the same number of training samples (a fixed
number of epochs); the learning rate of AdamW scales with the square root of the batch size,
the rule for adaptive optimizers (Malladi et al., 2022), so that batch sizes differ in how many
samples each statistic and each step sees, not in how much data they learn from. Validation
runs the model in eval mode: BatchNorm normalizes with its running statistics, and that is
where small batches hurt it: it trained on the statistics of a couple of images, and meets
the population's at test time.

Scanned digits are uniform in contrast and brightness, photographs are not, and the
difference matters here: two digits have nearly the population's statistics, two photographs
do not. By default the digits get a random contrast and brightness per image (``exposure``),
in training and validation alike, as natural images have.

Runs are independent and seeded (the split, the initialization, the data order and the
exposure depend only on the seed), so they can go to worker processes in any order with the
same results.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "BATCH_SIZES",
    "NORMS",
    "Data",
    "Setup",
    "SmallCNN",
    "load_data",
    "make_norm",
    "run_compare",
    "verdict",
]

NORMS: tuple[str, ...] = ("BatchNorm", "GroupNorm", "LayerNorm2d", "InstanceNorm", "RMSNorm2d", "none")
BATCH_SIZES: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
# GroupNorm: four channels per group (Wu & He's default, G = 32, needs 32 channels or more; these
# layers have 16 to 64).
CHANNELS_PER_GROUP = 4


def make_norm(kind: str, channels: int) -> nn.Module:
    """The normkit module for ``kind`` (one of :data:`NORMS`) over ``channels`` channels."""
    import normkit

    if kind == "BatchNorm":
        return normkit.BatchNorm2d(channels)
    if kind == "GroupNorm":
        return normkit.GroupNorm(max(1, channels // CHANNELS_PER_GROUP), channels)
    if kind == "InstanceNorm":
        return normkit.InstanceNorm2d(channels, affine=True)
    if kind == "LayerNorm2d":
        return normkit.LayerNorm2d(channels)
    if kind == "RMSNorm2d":
        return normkit.RMSNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; choose from {', '.join(NORMS)}")


class SmallCNN(nn.Module):
    """Conv-norm-ReLU blocks at full, 1/2 and 1/4 resolution (8x8, 4x4 and two at 2x2 for the
    digits), global average pooling, a linear classifier. As in a ResNet's last stage, the late
    layers see few pixels, so a batch statistic there averages few values (batch x 4 for the
    digits). Convolutions followed by a norm have no bias: the norm's bias replaces it."""

    def __init__(self, in_channels: int, num_classes: int, norm: str, width: int = 16) -> None:
        super().__init__()
        bias = norm == "none"
        c1, c2, c3 = width, 2 * width, 4 * width

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=bias), make_norm(norm, cout), nn.ReLU()]

        self.features = nn.Sequential(
            *block(in_channels, c1), nn.MaxPool2d(2, ceil_mode=True),
            *block(c1, c2), nn.MaxPool2d(2, ceil_mode=True),
            *block(c2, c3), *block(c3, c3),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(c3, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


@dataclass
class Data:
    """Images ``x`` (N, C, H, W) and integer labels ``y``; each seed draws its own stratified
    train/validation split, so that the runs of several seeds also average over validation sets."""

    name: str
    x: np.ndarray  # float32
    y: np.ndarray  # int64
    num_classes: int
    val_fraction: float = 0.2
    limit: int | None = None  # keep this many training images (quick runs)

    def split(self, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``x_train, y_train, x_val, y_val`` for ``seed``, standardized per channel with the
        training images' mean and standard deviation."""
        rng = np.random.default_rng(seed)
        val = np.zeros(len(self.y), dtype=bool)
        for label in np.unique(self.y):  # each class split in the same proportion
            idx = rng.permutation(np.flatnonzero(self.y == label))
            val[idx[: max(1, round(len(idx) * self.val_fraction))]] = True
        train = rng.permutation(np.flatnonzero(~val))[: self.limit]
        mean = self.x[train].mean(axis=(0, 2, 3), keepdims=True)
        std = self.x[train].std(axis=(0, 2, 3), keepdims=True) + 1e-6
        return (self.x[train] - mean) / std, self.y[train], (self.x[val] - mean) / std, self.y[val]


def load_data(path: str | None = None, *, val_fraction: float = 0.2, limit: int | None = None) -> Data:
    """scikit-learn's digits (``path`` None) or ``path``, an ``.npz`` with ``x`` of shape
    (N, H, W) or (N, C, H, W) and integer labels ``y``."""
    if path is None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x, y, name = digits.images, digits.target, "digits (scikit-learn, 8x8)"
    else:
        with np.load(path) as f:
            if "x" not in f or "y" not in f:
                raise ValueError(f"{path}: needs arrays 'x' (N, H, W) or (N, C, H, W) and 'y' (N,); has {sorted(f)}")
            x, y, name = f["x"], f["y"], os.path.basename(path)
    x = np.asarray(x, dtype=np.float32)
    x = x[:, None] if x.ndim == 3 else x
    y = np.asarray(y)
    if x.ndim != 4 or y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"x must be (N, H, W) or (N, C, H, W) and y (N,) integer labels; got x {x.shape}, "
                         f"y {y.shape} {y.dtype}")
    return Data(name, x, y.astype(np.int64), int(y.max()) + 1, val_fraction, limit)


@dataclass(frozen=True)
class Setup:
    epochs: int = 3
    base_lr: float = 5e-3  # AdamW's at base_batch; lr = base_lr * sqrt(batch / base_batch)
    base_batch: int = 64
    weight_decay: float = 1e-4
    exposure: bool = True  # a random contrast and brightness per image (training and validation)
    width: int = 16
    backend: str = "torch"  # normkit's backend for the norms
    curve_points: int = 24  # points of each training-loss curve


EXPOSURE_CONTRAST = 3.0  # contrast log-uniform in [1/3, 3]
EXPOSURE_BRIGHTNESS = 2.0  # brightness uniform in [-2, 2], in standard deviations of the data


def _exposure(x: Tensor, gen: torch.Generator) -> Tensor:
    """Each image ``x * a + b`` with its own contrast ``a`` and brightness ``b``."""
    shape = (len(x),) + (1,) * (x.dim() - 1)
    a = torch.exp((torch.rand(shape, generator=gen) * 2 - 1) * math.log(EXPOSURE_CONTRAST))
    b = (torch.rand(shape, generator=gen) * 2 - 1) * EXPOSURE_BRIGHTNESS
    return x * a + b


def _one_cycle(t: float, warmup: float = 0.15) -> float:
    """The learning-rate factor at fraction ``t`` of training: linear warm-up, cosine decay."""
    if t < warmup:
        return t / warmup
    return 0.5 * (1 + math.cos(math.pi * (t - warmup) / (1 - warmup)))


@torch.no_grad()
def _adamw_step(params: list[Tensor], grads: list[Tensor], m: list[Tensor], v: list[Tensor], step: int, lr: float,
                weight_decay: float) -> None:
    """torch.optim.AdamW's update (betas 0.9, 0.999; eps 1e-8), on all tensors at once (its
    ``foreach`` path). Written out because torch.optim imports torch._dynamo on first use,
    which costs each worker process seconds."""
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(m, grads, 1 - beta1)
    torch._foreach_mul_(v, beta2)
    torch._foreach_addcmul_(v, grads, grads, 1 - beta2)
    denom = torch._foreach_sqrt(torch._foreach_div(v, 1 - beta2**step))
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, m, denom, -lr / (1 - beta1**step))


def _train_one(data: Data, norm: str, batch: int, seed: int, setup: Setup) -> dict[str, Any]:
    """One run; returns validation accuracy and loss, the training-loss curve and the time."""
    torch.set_num_threads(1)  # tiny convolutions: threads cost more than they give; runs go in parallel instead
    start = time.perf_counter()
    torch.manual_seed(seed)
    x_train, y_train, x_val, y_val = data.split(seed)
    model = SmallCNN(x_train.shape[1], data.num_classes, norm, setup.width)
    x, y = torch.from_numpy(x_train), torch.from_numpy(y_train)
    steps_per_epoch = len(x) // batch  # the last, partial batch is dropped: every step sees `batch` samples
    total = steps_per_epoch * setup.epochs
    lr = setup.base_lr * math.sqrt(batch / setup.base_batch)
    params = list(model.parameters())
    m, v = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params]
    gen = torch.Generator().manual_seed(seed)
    every = max(1, len(x) * setup.epochs // setup.curve_points)  # samples per curve point
    curve_samples, curve_loss, seen, bucket, step = [], [], 0, [], 0
    model.train()
    for _ in range(setup.epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(steps_per_epoch):
            idx = order[i * batch:(i + 1) * batch]
            xb = _exposure(x[idx], gen) if setup.exposure else x[idx]
            loss = nn.functional.cross_entropy(model(xb), y[idx])
            grads = list(torch.autograd.grad(loss, params))
            step += 1
            _adamw_step(params, grads, m, v, step, lr * _one_cycle(step / total), setup.weight_decay)
            seen += len(idx)
            bucket.append(loss.item())
            if seen // every > len(curve_samples):
                curve_samples.append(seen)
                curve_loss.append(statistics.fmean(bucket))
                bucket = []
    model.eval()
    with torch.no_grad():
        xv = torch.from_numpy(x_val)
        xv = _exposure(xv, torch.Generator().manual_seed(10_000 + seed)) if setup.exposure else xv
        logits = model(xv)
        yv = torch.from_numpy(y_val)
        accuracy = (logits.argmax(1) == yv).double().mean().item()
        val_loss = nn.functional.cross_entropy(logits, yv).item()
    return {"norm": norm, "batch": batch, "seed": seed, "accuracy": accuracy,
            "val_loss": val_loss if math.isfinite(val_loss) else None, "lr": lr, "steps": total,
            "curve": {"samples": curve_samples, "loss": curve_loss}, "seconds": time.perf_counter() - start}


def _job(args: tuple[Data, str, int, int, Setup]) -> dict[str, Any]:
    import normkit

    # An explicit backend: "auto" would look for Triton at every call of every norm.
    with normkit.use_backend(args[-1].backend):
        return _train_one(*args)


def verdict(accuracy: dict[str, dict[str, dict[str, Any]]], batch_sizes: Sequence[int]) -> dict[str, Any]:
    """Whether these numbers show Wu & He's trend, from the largest batch to the smallest:
    BatchNorm's accuracy falls by more than the noise, GroupNorm's does not, and BatchNorm's
    fall exceeds GroupNorm's by more than the noise.

    A change is the mean over seeds of a paired difference (a seed fixes the split, the
    initialization and the data order, so the pair differs only in the batch size); its noise
    is twice its standard error over seeds, and at least one percentage point. With one seed
    there is no standard error: the changes are reported, and no verdict is given
    (``shows_trend`` None).
    """
    if not {"BatchNorm", "GroupNorm"} <= set(accuracy) or len(batch_sizes) < 2:
        return {"shows_trend": None, "text": "Cannot tell: needs BatchNorm, GroupNorm and two batch sizes or more."}
    small, large = str(min(batch_sizes)), str(max(batch_sizes))

    def falls(norm: str) -> list[float]:
        pairs = zip(accuracy[norm][large]["runs"], accuracy[norm][small]["runs"], strict=True)
        return [100 * (a - b) for a, b in pairs]

    def mean_and_noise(d: list[float]) -> tuple[float, float]:
        se = statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else math.nan
        return statistics.fmean(d), max(1.0, 2 * se) if len(d) > 1 else math.nan

    bn, gn = falls("BatchNorm"), falls("GroupNorm")
    (bn_fall, bn_noise), (gn_fall, gn_noise) = mean_and_noise(bn), mean_and_noise(gn)
    excess, excess_noise = mean_and_noise([b - g for b, g in zip(bn, gn, strict=True)])
    gap = 100 * (accuracy["GroupNorm"][small]["mean"] - accuracy["BatchNorm"][small]["mean"])
    seeds = len(bn)

    def change(name: str, d: float, noise: float) -> str:
        moved = (f"{name}'s accuracy {'falls' if d > 0 else 'rises'} by {abs(d):.1f} points" if abs(d) >= 0.05
                 else f"{name}'s accuracy does not change")
        if math.isnan(noise):
            return moved
        return f"{moved}, {'beyond' if abs(d) > noise else 'within'} the noise (+-{noise:.1f})"

    detail = (f"from batch {large} to batch {small} {change('BatchNorm', bn_fall, bn_noise)} and "
              f"{change('GroupNorm', gn_fall, gn_noise)}; at batch {small} GroupNorm is {abs(gap):.1f} points "
              f"{'above' if gap >= 0 else 'below'} BatchNorm")
    if seeds < 2:
        shows = None
        text = (f"No verdict from one seed: the noise cannot be estimated, so no change can be told from it "
                f"(run --seeds 3 or more). In this run {detail}.")
    else:
        shows = bn_fall > bn_noise and gn_fall <= gn_noise and excess > excess_noise
        if shows:
            head = "Yes, this run shows Wu & He's trend (BatchNorm worse at small batches, GroupNorm not)"
        elif bn_fall <= bn_noise:
            head = "No, this run does not show Wu & He's trend: BatchNorm does not fall beyond the noise"
        elif gn_fall > gn_noise:
            head = "No, this run does not show Wu & He's trend: GroupNorm falls too"
        else:
            head = ("No, this run does not show Wu & He's trend: "
                    "BatchNorm's fall is not beyond GroupNorm's by more than the noise")
        text = f"{head}, over {seeds} seeds: {detail}."
    numbers = {"batchnorm_fall": bn_fall, "batchnorm_noise": bn_noise, "groupnorm_fall": gn_fall,
               "groupnorm_noise": gn_noise, "excess_fall": excess, "excess_noise": excess_noise,
               "gap_at_smallest_batch": gap}
    # JSON has no NaN: a noise that one seed cannot estimate is null
    return {"shows_trend": shows, "text": text, "seeds": seeds,
            **{k: None if math.isnan(v) else v for k, v in numbers.items()}}


def run_compare(
    norms: Sequence[str] = NORMS,
    batch_sizes: Sequence[int] = BATCH_SIZES,
    seeds: Sequence[int] = (0, 1, 2),
    *,
    data: Data | None = None,
    setup: Setup = Setup(),
    workers: int | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train every (norm, batch size, seed); aggregate accuracy (mean, std over seeds) and the
    mean training-loss curves; judge the trend (:func:`verdict`)."""
    for norm in norms:
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; choose from {', '.join(NORMS)}")
    data = data or load_data()
    workers = workers if workers is not None else min(2, os.cpu_count() or 1)
    # the longest runs (smallest batches: most steps) first, so the workers finish together
    jobs = [(data, norm, b, s, setup) for b in sorted(batch_sizes) for norm in norms for s in seeds]
    start = time.perf_counter()
    runs: list[dict[str, Any]] = []
    if workers <= 1:
        threads = torch.get_num_threads()
        try:
            for job in jobs:
                runs.append(_job(job))
                if progress:
                    progress(runs[-1])
        finally:
            torch.set_num_threads(threads)
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            for future in as_completed([pool.submit(_job, job) for job in jobs]):
                runs.append(future.result())
                if progress:
                    progress(runs[-1])

    accuracy: dict[str, dict[str, dict[str, Any]]] = {}
    curves: dict[str, dict[str, dict[str, list[float]]]] = {}
    for norm in norms:
        for b in batch_sizes:
            group = sorted((r for r in runs if r["norm"] == norm and r["batch"] == b), key=lambda r: r["seed"])
            accs = [r["accuracy"] for r in group]
            accuracy.setdefault(norm, {})[str(b)] = {
                "mean": statistics.fmean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "runs": accs}
            length = min(len(r["curve"]["loss"]) for r in group)
            curves.setdefault(norm, {})[str(b)] = {
                "samples": group[0]["curve"]["samples"][:length],
                "loss": [statistics.fmean(r["curve"]["loss"][i] for r in group) for i in range(length)]}
    return {
        "dataset": data.name, "train_size": len(data.split(0)[1]), "val_size": len(data.split(0)[3]),
        "norms": list(norms), "batch_sizes": list(batch_sizes), "seeds": list(seeds),
        "setup": {**setup.__dict__, "optimizer": "AdamW",
                  "lr_rule": f"lr = {setup.base_lr} * sqrt(batch / {setup.base_batch}), "
                             "15% linear warm-up, cosine decay",
                  "exposure_range": {"contrast": [1 / EXPOSURE_CONTRAST, EXPOSURE_CONTRAST],
                                     "brightness": [-EXPOSURE_BRIGHTNESS, EXPOSURE_BRIGHTNESS]}},
        "accuracy": accuracy, "loss_curves": curves, "verdict": verdict(accuracy, batch_sizes),
        "runs": [{k: v for k, v in r.items() if k != "curve"} for r in runs],
        "workers": workers, "elapsed_s": time.perf_counter() - start,
    }
