"""`tlexp predict` against model-only inference, and the served model's latency.

    python benchmarks/bench_predict.py /work/shared/datasets/hymenoptera [--model MODEL] [--json out.json]

Without --model it first trains one tiny-budget run (EfficientNet-Lite0, transfer, 1 epoch, 224 px) into a
temporary SQLite store: throughput does not depend on how well the model learned. Then, in one process,
on the same files of ``DATA/val`` and the same batch size:

1. **tlexp predict**: ``predict.predict_files`` (what the command runs after loading the model): the image
   model reads each file, decodes, resizes and classifies it; images/s over all files, model load excluded;
2. **model only**: the same exported program on the same images already decoded to (3, S, S) tensors: the
   speed limit of inference alone;
3. **serving**: ``mlflow models serve -m MODEL --env-manager local`` on 127.0.0.1, then 20 POSTs of one
   base64 JPEG each to /invocations, one after another: median and p90 latency.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np
import torch

from tlexp.data import decode_image
from tlexp.predict import find_images, load_image_model, predict_files


def train_model(data: str, store: str) -> str:
    """One quick run in ``store``; returns its run id."""
    from tlexp.config import TrainConfig
    from tlexp.experiment import train

    summary = train(TrainConfig(data=data, model="efficientnet_lite0", strategy="transfer", epochs=1,
                                experiment="bench-predict", samples_per_class=10, device="cpu"))
    return summary.run_id


def model_only(python_model, files: list[str], batch_size: int) -> float:
    """Images/s of the exported program alone on pre-decoded images (decoding not timed)."""
    pixels = torch.from_numpy(np.stack([decode_image(f, python_model.image_size) for f in files]))
    with torch.inference_mode():
        python_model.module(pixels[:batch_size].float().div(255.0))  # warm-up
        start = time.perf_counter()
        for first in range(0, len(files), batch_size):
            logits = python_model.module(pixels[first:first + batch_size].float().div(255.0))
            torch.softmax(logits, dim=1).topk(min(3, logits.shape[1]), dim=1)
        return len(files) / (time.perf_counter() - start)


def serve_latency(model_uri: str, photo: str, requests: int = 20) -> list[float]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "PATH": os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])}
    server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager",
                               "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [
        [base64.b64encode(open(photo, "rb").read()).decode()]]}}).encode()
    url = f"http://127.0.0.1:{port}/invocations"

    def post() -> dict:
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())

    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                answer = post()  # also the warm-up request
                break
            except (ConnectionError, urllib.error.URLError):
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.5)
        print(f"served answer: {answer['predictions'][0]['label']}")
        times = []
        for _ in range(requests):
            start = time.perf_counter()
            post()
            times.append(time.perf_counter() - start)
        return times
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="an ImageFolder tree with a val/ folder (hymenoptera)")
    parser.add_argument("--model", help="a run id or models:/... (default: train one quick run)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", help="write the numbers here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model is None:
            os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
            os.environ["TLEXP_CACHE_DIR"] = os.path.join(tmp, "cache")
            args.model = train_model(args.data, tmp)
        files = find_images([os.path.join(args.data, "val")])
        start = time.perf_counter()
        loaded = load_image_model(args.model, device="cpu")
        load_s = time.perf_counter() - start
        python_model = loaded.unwrap_python_model()
        predict_files(loaded, files[:args.batch_size], batch_size=args.batch_size)  # warm-up
        result = predict_files(loaded, files, batch_size=args.batch_size)
        only = model_only(python_model, files, args.batch_size)
        from tlexp.tracking.models import image_model_uri

        times = serve_latency(image_model_uri(args.model), files[0])
    numbers = {
        "images": len(files), "batch_size": args.batch_size, "threads": torch.get_num_threads(),
        "image_size": python_model.image_size, "model_load_s": round(load_s, 2),
        "predict_images_per_s": round(result.images_per_s, 1), "model_only_images_per_s": round(only, 1),
        "ratio": round(result.images_per_s / only, 3),
        "serve_median_ms": round(1000 * statistics.median(times), 1),
        "serve_p90_ms": round(1000 * sorted(times)[int(0.9 * len(times)) - 1], 1),
    }
    print(json.dumps(numbers, indent=1))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(numbers, fh, indent=1)


if __name__ == "__main__":
    main()
