"""The seed notebook's training loop, re-implemented faithfully, for ``bench_train.py`` to measure tlexp against.

``ImageFolder`` + PIL transforms + ``DataLoader`` (2 workers), fp32, default memory format, ``.item()``
every step, transfer with BatchNorm left in training mode, as the notebook does. One deliberate
difference: the notebook's ``val_dataset.dataset.transform = val_transforms`` also switched off the
*training* augmentation (both subsets share one dataset); here the seed loop augments as the notebook
meant to, so that both sides do the same work.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

SEED = 42  # the notebook's seed
LR = 1e-3  # the notebook's learning rate


def steady(values: list[float]) -> float:
    """Mean over the epochs after the first (the first includes one-off warm-up); the only one if one."""
    return statistics.fmean(values[1:] if len(values) > 1 else values)


def _seed_loaders(root: str, data: Any, splits: Any, *, image_size: int, batch_size: int, mean: tuple, std: tuple,
                  num_workers: int, pin_memory: bool) -> tuple[Any, Any]:
    """The notebook's transforms and loaders, over exactly the images tlexp uses for train and val."""
    from torch.utils.data import DataLoader, Subset
    from torchvision import datasets, transforms

    train_tf = transforms.Compose([
        transforms.Resize((image_size, image_size)),
        transforms.RandomHorizontalFlip(p=0.5),
        transforms.RandomRotation(15),
        transforms.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.1),
        transforms.ToTensor(),
        transforms.Normalize(mean=mean, std=std),
    ])
    val_tf = transforms.Compose([
        transforms.Resize((image_size, image_size)),
        transforms.ToTensor(),
        transforms.Normalize(mean=mean, std=std),
    ])

    def subset(index: Any, transform: Any) -> Any:
        paths = [data.paths[i] for i in index.tolist()]
        top = {p.split("/", 1)[0] for p in paths}
        sub = top.pop() if len(top) == 1 and data.origin[int(index[0])] != "all" else ""
        folder = datasets.ImageFolder(os.path.join(root, sub), transform=transform)
        where = {os.path.relpath(p, root).replace(os.sep, "/"): i for i, (p, _) in enumerate(folder.samples)}
        return Subset(folder, [where[p] for p in paths])

    train = DataLoader(subset(splits.train, train_tf), batch_size=batch_size, shuffle=True,
                       num_workers=num_workers, pin_memory=pin_memory)
    val = DataLoader(subset(splits.val, val_tf), batch_size=batch_size, shuffle=False,
                     num_workers=num_workers, pin_memory=pin_memory)
    return train, val


def seed_train_epoch(model: Any, dataloader: Any, criterion: Any, optimizer: Any, device: Any) -> tuple[float, float]:
    """The notebook's ``train_epoch`` (without its tqdm bar)."""
    import torch

    model.train()
    running_loss, correct, total = 0.0, 0, 0
    for images, labels in dataloader:
        images, labels = images.to(device), labels.to(device)
        optimizer.zero_grad()
        outputs = model(images)
        loss = criterion(outputs, labels)
        loss.backward()
        optimizer.step()
        running_loss += loss.item() * images.size(0)
        _, predicted = torch.max(outputs, 1)
        total += labels.size(0)
        correct += (predicted == labels).sum().item()
    return running_loss / total, 100 * correct / total


def seed_validate_epoch(model: Any, dataloader: Any, criterion: Any, device: Any) -> tuple[float, float]:
    """The notebook's ``validate_epoch`` (without its tqdm bar)."""
    import torch

    model.eval()
    running_loss, correct, total = 0.0, 0, 0
    with torch.no_grad():
        for images, labels in dataloader:
            images, labels = images.to(device), labels.to(device)
            outputs = model(images)
            loss = criterion(outputs, labels)
            running_loss += loss.item() * images.size(0)
            _, predicted = torch.max(outputs, 1)
            total += labels.size(0)
            correct += (predicted == labels).sum().item()
    return running_loss / total, 100 * correct / total


@dataclass
class EpochTimes:
    train_s: list[float] = field(default_factory=list)
    val_s: list[float] = field(default_factory=list)
    epoch_s: list[float] = field(default_factory=list)
    train_samples: int = 0
    val_acc: list[float] = field(default_factory=list)

    @property
    def steady_train_samples_per_s(self) -> float:
        return self.train_samples / steady(self.train_s)


def run_seed_loop(strategy: str, *, root: str, data: Any, splits: Any, model_name: str, batch_size: int,
                  epochs: int, device: Any, num_workers: int = 2) -> EpochTimes:
    """Train ``strategy`` the notebook's way for ``epochs`` epochs and time each."""
    import torch
    from torch import nn

    from tlexp.models import build_model, get_spec

    torch.manual_seed(SEED)
    spec = get_spec(model_name)
    train_loader, val_loader = _seed_loaders(root, data, splits, image_size=data.image_size, batch_size=batch_size,
                                             mean=spec.mean, std=spec.std, num_workers=num_workers,
                                             pin_memory=device.type == "cuda")
    tl = build_model(model_name, num_classes=data.num_classes, pretrained=strategy != "scratch", head="mlp")
    model = nn.Sequential(tl.body, tl.head)  # the notebook normalises in its transforms
    if strategy == "transfer":
        for param in tl.body.parameters():  # the notebook freezes everything, then adds a new head
            param.requires_grad = False
        optimizer = torch.optim.Adam(tl.head.parameters(), lr=LR)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    model = model.to(device)
    criterion = nn.CrossEntropyLoss()
    out = EpochTimes(train_samples=len(splits.train))
    for _ in range(epochs):
        t0 = time.perf_counter()
        seed_train_epoch(model, train_loader, criterion, optimizer, device)
        t1 = time.perf_counter()
        _, val_acc = seed_validate_epoch(model, val_loader, criterion, device)
        t2 = time.perf_counter()
        out.train_s.append(t1 - t0)
        out.val_s.append(t2 - t1)
        out.epoch_s.append(t2 - t0)
        out.val_acc.append(val_acc / 100)
    return out
