"""Framework overhead of training: Ray Train + DeepSpeed vs a plain PyTorch loop.

Same model, batch, loss and optimizer; the batches are tensors already in memory, so the
figure measures what the framework costs (process group, DeepSpeed engine, Ray Train
reporting), not data loading. Rows: plain loop (1 process), Ray Train + DeepSpeed with 1
worker, and with 2 workers (data parallel, gloo on CPU).

    python bench/train_throughput.py [--steps 40] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import print_table, write_results  # noqa: E402
from reidscale.config import load_config  # noqa: E402
from reidscale.models.reid import build_reid_model  # noqa: E402
from reidscale.train.config import TrainJobConfig  # noqa: E402
from reidscale.train.engine import deepspeed_config, make_optimizer  # noqa: E402
from reidscale.train.recipes import compute_loss  # noqa: E402
from reidscale.train.job import omp_env  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo" / "train.yaml"
NUM_CLASSES = 200


def _batches(cfg: TrainJobConfig, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    p, k = cfg.train.p, cfg.train.k
    labels = torch.arange(p).repeat_interleave(k)
    return [(torch.randn(p * k, 3, cfg.transform.height, cfg.transform.width, generator=g),
             (labels + i * p) % NUM_CLASSES) for i in range(n)]


def _timed(step, batches, warmup: int) -> float:
    for images, labels in batches[:warmup]:
        step(images, labels)
    t0 = time.perf_counter()
    for images, labels in batches[warmup:]:
        step(images, labels)
    return sum(len(lbl) for _, lbl in batches[warmup:]) / (time.perf_counter() - t0)


def plain_loop(cfg: TrainJobConfig, steps: int, warmup: int, threads: int) -> float:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_reid_model(cfg.model, cfg.transform, NUM_CLASSES)
    optimizer = make_optimizer(model, cfg)

    def step(images, labels):
        loss, _ = compute_loss(model, images, labels, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return _timed(step, _batches(cfg, steps + warmup, 0), warmup)


def _ray_worker(config: dict) -> None:
    import deepspeed
    import ray.train

    cfg = config["cfg"]
    torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    model = build_reid_model(cfg.model, cfg.transform, NUM_CLASSES)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=make_optimizer(model, cfg),
                                           config=deepspeed_config(cfg, "fp32"), dist_init_required=False)
    rank = ray.train.get_context().get_world_rank()

    def step(images, labels):
        loss, _ = compute_loss(engine, images, labels, cfg)
        engine.backward(loss)
        engine.step()

    rate = _timed(step, _batches(cfg, config["steps"] + config["warmup"], rank), config["warmup"])
    # Ray Train V2 keeps metrics only with checkpoints; a file per rank is simpler here
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps({"images_per_s": rate}))


def ray_deepspeed(cfg: TrainJobConfig, workers: int, steps: int, warmup: int, threads: int, storage: str) -> list[float]:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    out = Path(storage, f"{workers}w")
    out.mkdir(parents=True, exist_ok=True)
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"cfg": cfg, "steps": steps, "warmup": warmup, "threads": threads, "out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=False,
                                               resources_per_worker={"CPU": threads}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=ray.train.RunConfig(name=f"bench-{workers}w", storage_path=storage,
                                       worker_runtime_env=omp_env(threads)),
    )
    trainer.fit()
    return [json.loads((out / f"rank{r}.json").read_text())["images_per_s"] for r in range(workers)]


def main() -> None:
    import tempfile

    import ray

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the 1-process rows")
    args = parser.parse_args()
    cfg = load_config(TrainJobConfig, CONFIG)
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    storage = tempfile.mkdtemp(prefix="bench-train-")

    plain = plain_loop(cfg, args.steps, args.warmup, args.threads)
    one = sum(ray_deepspeed(cfg, 1, args.steps, args.warmup, args.threads, storage))
    two = sum(ray_deepspeed(cfg, 2, args.steps, args.warmup, max(1, args.threads // 2), storage))
    rows = [
        {"setup": f"plain PyTorch loop, 1 process, {args.threads} threads", "images/s": f"{plain:.1f}", "vs plain": "1.00"},
        {"setup": f"Ray Train + DeepSpeed, 1 worker, {args.threads} threads", "images/s": f"{one:.1f}",
         "vs plain": f"{one / plain:.2f}"},
        {"setup": f"Ray Train + DeepSpeed, 2 workers × {max(1, args.threads // 2)} thread", "images/s": f"{two:.1f}",
         "vs plain": f"{two / plain:.2f}"},
    ]
    print_table(rows)
    batch = cfg.train.p * cfg.train.k
    write_results("train_throughput", {
        "model": "demo tiny ViT (configs/demo/train.yaml)", "batch_per_worker": batch,
        "image": [cfg.transform.height, cfg.transform.width], "steps": args.steps, "warmup": args.warmup,
        "plain_images_per_s": plain, "ray_deepspeed_1w_images_per_s": one, "ray_deepspeed_2w_images_per_s": two,
        "ratio_1w_vs_plain": one / plain, "ratio_2w_vs_plain": two / plain,
    })


if __name__ == "__main__":
    main()
