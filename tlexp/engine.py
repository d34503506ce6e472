"""Pure-torch training and evaluation. Knows nothing of MLflow, the CLI or files.

Data arrive as tensors already decoded (``data.ImageData``); batches are cut
from them by index, moved to the device, and augmented there. Functions return
plain dicts of numbers.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

# (batch size, stats) where stats() -> (running loss, running acc); calling it synchronises with the device.
BatchCallback = Callable[[int, Callable[[], tuple[float, float]]], None]


@dataclass(frozen=True)
class DeviceSettings:
    """Where and how the model runs."""

    device: torch.device
    amp_dtype: torch.dtype | None = None  # autocast dtype, None = fp32
    channels_last: bool = False

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        # non_blocking host -> GPU copies never make the host wait for the GPU's queue; from pinned
        # memory they also overlap with compute. (A blocking copy would synchronise every batch.)
        x = x.to(self.device, non_blocking=self.device.type == "cuda")
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def synchronize(self) -> None:
        """Wait for the device's queued work (for honest timings; never inside the step loop)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def stage(self, images: torch.Tensor, *, max_fraction: float = 0.25) -> torch.Tensor:
        """Where a run keeps its decoded uint8 images: on the GPU when they fit in ``max_fraction`` of its
        free memory (no host-to-device copy per batch at all), else pinned host memory (asynchronous copies).
        Elsewhere they stay where they are.
        """
        if self.device.type != "cuda":
            return images
        free_bytes, _ = torch.cuda.mem_get_info(self.device)
        if images.numel() * images.element_size() <= max_fraction * free_bytes:
            return images.to(self.device)
        return images.pin_memory()


def resolve_device(name: str) -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an explicit choice must be available."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but no CUDA GPU is available here; use --device auto or cpu.")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("--device mps was requested but Apple MPS is not available here; use --device auto or cpu.")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: bf16 on CUDA GPUs that support it, fp32 (None) elsewhere unless asked."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[name]


def iterate_batches(images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, *, batch_size: int,
                    settings: DeviceSettings, transform: Callable[..., torch.Tensor] | None = None,
                    shuffle: bool = False, generator: torch.Generator | None = None,
                    transform_generator: torch.Generator | None = None
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (inputs, labels) on the device: index into the cached tensors, copy, transform there.

    ``images`` may be uint8 pictures (then ``transform`` makes floats) or cached features.
    ``generator`` drives the shuffle, ``transform_generator`` the augmentation (independent streams).
    """
    order = index[torch.randperm(len(index), generator=generator)] if shuffle else index
    # Index where the data live (one copy of the epoch's order, not one small copy per batch).
    order = order.to(images.device, non_blocking=True)
    label_order = labels.to(settings.device, non_blocking=True)[order.to(settings.device, non_blocking=True)]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        x = settings.to_device(_gather(images, idx))
        y = label_order[start:start + batch_size]
        if transform is not None:
            x = transform(x, transform_generator)
            if settings.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
        yield x, y


def _gather(images: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``images[idx]``; from pinned memory into pinned memory, so that the copy to the GPU can overlap."""
    if not images.is_pinned():
        return images[idx]
    out = torch.empty((len(idx),) + tuple(images.shape[1:]), dtype=images.dtype, pin_memory=True)
    return torch.index_select(images, 0, idx, out=out)


def train_one_epoch(model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
                    optimizer: torch.optim.Optimizer, *, settings: DeviceSettings,
                    scaler: torch.amp.GradScaler | None = None,
                    on_batch: BatchCallback | None = None) -> dict[str, float]:
    """One pass over ``batches``; returns loss, acc (fraction), samples, time_s, samples_per_s."""
    model.train()
    start = time.perf_counter()
    # Running sums stay on the device: a .item() per step would synchronise with the GPU every batch.
    loss_sum = torch.zeros((), device=settings.device)
    correct = torch.zeros((), device=settings.device, dtype=torch.long)
    seen = 0
    for x, y in batches:
        with settings.autocast():
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        n = y.shape[0]
        loss_sum += loss.detach() * n
        correct += (logits.argmax(1) == y).sum()
        seen += n
        if on_batch is not None:
            on_batch(n, lambda: (float(loss_sum) / seen, float(correct) / seen))
    elapsed = time.perf_counter() - start
    if seen == 0:
        raise ValueError("The training split is empty.")
    return {"loss": float(loss_sum) / seen, "acc": float(correct) / seen, "samples": seen,
            "time_s": elapsed, "samples_per_s": seen / elapsed if elapsed > 0 else float("inf")}


@torch.inference_mode()
def evaluate(model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]], *,
             settings: DeviceSettings) -> dict[str, object]:
    """Loss, accuracy and predictions over ``batches`` (model in eval mode, no autograd)."""
    model.eval()
    loss_sum = torch.zeros((), device=settings.device)
    preds, targets = [], []
    for x, y in batches:
        with settings.autocast():
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        preds.append(logits.argmax(1))
        targets.append(y)
    pred = torch.cat(preds).cpu()
    target = torch.cat(targets).cpu()
    n = len(target)
    return {"loss": float(loss_sum) / n, "acc": float((pred == target).float().mean()), "samples": n,
            "pred": pred, "target": target}


@torch.inference_mode()
def extract_features(body: Callable[[torch.Tensor], torch.Tensor],
                     batches: Iterator[tuple[torch.Tensor, torch.Tensor]], *,
                     settings: DeviceSettings) -> torch.Tensor:
    """Run the frozen body once over ``batches``: (N, F) float32 features, in batch order."""
    out = []
    for x, _ in batches:
        with settings.autocast():
            out.append(body(x).float())
    return torch.cat(out)


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) counts, rows = true class, columns = predicted class."""
    flat = target * num_classes + pred
    return torch.bincount(flat, minlength=num_classes * num_classes).view(num_classes, num_classes)
