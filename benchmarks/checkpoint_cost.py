"""What the per-epoch checkpoint costs: seconds to write it to the run's artifacts, against the epoch's time.

It trains real epochs through ``experiment.train`` (the same path as ``tlexp train``, into a temporary
SQLite store) and times every ``RunLogger.save_checkpoint`` call (``torch.save`` of model, optimizer,
best weights and RNG states, then ``log_artifact``).

    nice .venv/bin/python benchmarks/checkpoint_cost.py --model efficientnet_lite0 --image-size 64 --epochs 2
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        os.environ.setdefault("TLEXP_CACHE_DIR", os.path.join(tmp, "cache"))
        os.chdir(tmp)
        from tlexp import experiment, tracking
        from tlexp.config import TrainConfig

        seconds: list[float] = []
        sizes: list[int] = []
        real = tracking.RunLogger.save_checkpoint

        def timed(self: tracking.RunLogger) -> bool:
            t0 = time.perf_counter()
            saved = real(self)
            seconds.append(time.perf_counter() - t0)
            sizes.append(len(pickle.dumps(self._checkpoint)))
            return saved

        tracking.RunLogger.save_checkpoint = timed  # type: ignore[method-assign]
        config = TrainConfig(model=args.model, strategy="scratch", data=args.data, image_size=args.image_size,
                             epochs=args.epochs)
        summary = experiment.train(config)
    epochs = [row["epoch_time_s"] for row in summary.history]
    print(f"model {args.model}, {args.data} at {args.image_size}px, {args.epochs} epochs")
    print(f"epoch time (s): {', '.join(f'{e:.1f}' for e in epochs)}")
    print(f"checkpoint writes: {len(seconds)}, seconds each: {', '.join(f'{s:.3f}' for s in seconds)}, "
          f"size {max(sizes) / 1e6:.1f} MB")
    share = statistics.mean(seconds) / statistics.mean(epochs)
    print(f"checkpoint cost: {statistics.mean(seconds):.3f} s per epoch = {share:.2%} of the mean epoch time")


if __name__ == "__main__":
    main()
