"""Framework overhead of training: Ray Train + DeepSpeed vs a plain PyTorch loop.

Same model, batch, loss and optimizer; the batches are tensors already in memory, so the
figure measures what the framework costs (process group, DeepSpeed engine, Ray Train and
the Ray processes beside it), not data loading. Ours: Ray Train + DeepSpeed with 1 worker, and
with 2 workers (data parallel, gloo on CPU), each against the plain loop (1 process,
``--threads`` threads) run right before or after it: ``--pairs`` interleaved pairs, the ratio
taken per pair and the median reported. The plain loop runs with no Ray on the machine; each
of our runs starts Ray the way training does (``init_ray``) and stops it afterwards.

    python bench/train_throughput.py [--steps 160] [--warmup 40] [--threads 2] [--pairs 5] [--diagnose]

``--diagnose`` splits the 1-worker gap into its layers, each run in the same pair as its plain
loop: the plain loop beside a synthetic background load of ``--background-cores`` (what Ray's
own processes take: CPU time alone, no Ray), the plain loop as a Ray task (Ray's processes and a
Ray worker process), the plain loop in a Ray Train worker (Ray Train's controller, actors and
worker threads), and ours (DeepSpeed on top).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import Periodic, print_table, run_isolated, wait_until_quiet, write_results  # noqa: E402
from reidscale.config import load_config  # noqa: E402
from reidscale.ray_runtime import init_ray, train_logging_config  # noqa: E402
from reidscale.models.reid import build_reid_model  # noqa: E402
from reidscale.train.config import TrainJobConfig  # noqa: E402
from reidscale.train.engine import build_engine, deepspeed_config, make_optimizer  # noqa: E402
from reidscale.train.recipes import compute_loss  # noqa: E402
from reidscale.train.job import omp_env  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo" / "train.yaml"
NUM_CLASSES = 200
# the CPU sampler's period; it runs during both sides of a pair, so both pay the same for it
CPU_SAMPLE_S = 0.5


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


# A process busy `cores` × 20 ms of every 20 ms (0.1 cores: 2 ms bursts; Ray's processes wake
# every 10 ms or more), to measure what background CPU alone costs the plain loop.
_BURNER = """
import sys, time
cores, period = float(sys.argv[1]), 0.02
while True:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < cores * period:
        pass
    time.sleep(period * (1 - cores))
"""


def plain_beside_load(cfg: TrainJobConfig, steps: int, warmup: int, threads: int, cores: float) -> float:
    burner = subprocess.Popen([sys.executable, "-c", _BURNER, str(cores)])
    try:
        return run_isolated(plain_loop, cfg, steps, warmup, threads)[0]
    finally:
        burner.kill()
        burner.wait()


@contextlib.contextmanager
def _private_ray():
    """Ray as training starts it (``init_ray``: loopback, its dashboard per ``REIDSCALE_RAY_DASHBOARD``,
    no preemption watcher), stopped on exit: an idle Ray takes 0.04-0.07 cores, which must not
    slow the plain loop's turn."""
    import ray

    init_ray(num_cpus=2, job_name="bench-train")
    try:
        yield
    finally:
        ray.shutdown()


def _trainer(loop, config: dict, workers: int, threads: int, storage: str, name: str):
    """The trainer training fits (``JobScopedTorchTrainer``), gloo, ``threads`` CPUs and OpenMP threads per worker."""
    import ray.train
    from ray.train.torch import TorchConfig

    from reidscale.train.trainer import JobScopedTorchTrainer

    return JobScopedTorchTrainer(
        loop, train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": threads}),
        torch_config=TorchConfig(backend="gloo"),
        run_config=ray.train.RunConfig(name=name, storage_path=storage, worker_runtime_env=omp_env(threads),
                                       logging_config=train_logging_config()),
    )


def plain_in_ray_task(cfg: TrainJobConfig, steps: int, warmup: int, threads: int) -> float:
    """The plain loop as a Ray task in a Ray started as training starts it: Ray without Ray Train."""
    import ray

    with _private_ray():
        task = ray.remote(num_cpus=threads, runtime_env=omp_env(threads))(plain_loop)
        return ray.get(task.remote(cfg, steps, warmup, threads))


def _plain_train_worker(config: dict) -> None:
    rate = plain_loop(config["cfg"], config["steps"], config["warmup"], config["threads"])
    Path(config["out"], "rank0.json").write_text(json.dumps({"images_per_s": rate}))


def plain_in_train_worker(cfg: TrainJobConfig, steps: int, warmup: int, threads: int, storage: str) -> float:
    """The plain loop (no DeepSpeed) in a 1-worker Ray Train run: Ray Train without DeepSpeed."""
    out = Path(storage, "plain-in-train")
    out.mkdir(parents=True, exist_ok=True)
    config = {"cfg": cfg, "steps": steps, "warmup": warmup, "threads": threads, "out": str(out)}
    with _private_ray():
        _trainer(_plain_train_worker, config, 1, threads, storage, "bench-plain-in-train").fit()
    return json.loads((out / "rank0.json").read_text())["images_per_s"]


def _ray_worker(config: dict) -> None:
    import ray.train

    cfg = config["cfg"]
    torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    model = build_reid_model(cfg.model, cfg.transform, NUM_CLASSES)
    # the engine exactly as training builds it (engine.build_engine), at a constant lr
    engine = build_engine(model, make_optimizer(model, cfg), lambda step: 1.0, deepspeed_config(cfg, "fp32"),
                          torch.device("cpu"))
    rank = ray.train.get_context().get_world_rank()

    def step(images, labels):
        loss, _ = compute_loss(engine, images, labels, cfg)
        engine.backward(loss)
        engine.step()

    batches = _batches(cfg, config["steps"] + config["warmup"], rank)
    start = time.time()  # wall clock, comparable with the driver's CPU samples
    rate = _timed(step, batches, config["warmup"])
    # Ray Train V2 keeps metrics only with checkpoints; a file per rank is simpler here
    Path(config["out"], f"rank{rank}.json").write_text(json.dumps({"images_per_s": rate, "start": start,
                                                                   "end": time.time()}))


def ray_deepspeed(cfg: TrainJobConfig, workers: int, steps: int, warmup: int, threads: int, storage: str) -> list[float]:
    out = Path(storage, f"{workers}w")
    out.mkdir(parents=True, exist_ok=True)
    config = {"cfg": cfg, "steps": steps, "warmup": warmup, "threads": threads, "out": str(out)}
    trainer = _trainer(_ray_worker, config, workers, threads, storage, f"bench-{workers}w")
    # CPU of every process, sampled during the fit (the training workers exit before it returns)
    history: list[tuple[float, dict]] = []
    with Periodic(lambda: history.append((time.time(), _cpu_seconds_by_process())), interval=CPU_SAMPLE_S):
        trainer.fit()
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(workers)]
    # who used the cores while every rank was in its timed steps (warm-up included: a margin)
    inside = [(t, snap) for t, snap in history if max(r["start"] for r in ranks) <= t <= min(r["end"] for r in ranks)]
    if len(inside) >= 2:
        (t0, first), (t1, last) = inside[0], inside[-1]
        # by pid: a Ray worker process takes its actor's name ("ray::RayTrainWorker") once it hosts one
        used = {pid: (name, cpu - first.get(pid, ("", cpu))[1]) for pid, (name, cpu) in last.items()}
        workers_cpu = sum(cpu for name, cpu in used.values() if "RayTrainWorker" in name)
        others = sum(cpu for _, cpu in used.values()) - workers_cpu
        by_name: dict[str, float] = {}
        for name, cpu in used.values():
            if "RayTrainWorker" not in name and cpu > 0:
                by_name[name] = by_name.get(name, 0.0) + cpu / (t1 - t0)
        top = dict(sorted(by_name.items(), key=lambda kv: -kv[1])[:8])
        _CPU_SHARES.append({"train_worker_cores": workers_cpu / (t1 - t0), "other_process_cores": others / (t1 - t0),
                            "other_cores_by_process": {name: round(c, 4) for name, c in top.items()}})
    else:
        _CPU_SHARES.append({"train_worker_cores": float("nan"), "other_process_cores": float("nan")})
    return [r["images_per_s"] for r in ranks]


_CPU_SHARES: list[dict] = []


def _cpu_seconds_by_process() -> dict[int, tuple[str, float]]:
    """pid → (command line, CPU seconds so far) of every process on the machine: who took the
    cores during a fit (the training workers, or Ray's controller, agents and helper actors)."""
    import psutil

    out = {}
    for proc in psutil.process_iter():
        try:
            times = proc.cpu_times()
            name = " ".join(proc.cmdline() or [proc.name() or ""])[:80]  # fresh: a worker renames itself
            out[proc.pid] = (name, times.user + times.system)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def main() -> None:
    import statistics
    import tempfile

    parser = argparse.ArgumentParser()
    # training's steady state: Ray Train starts helper actors during a run's first seconds, and
    # 5 warm-up + 80 steps (~7 s) measured 0.91 where 40 + 160 measured 0.94 in the same setup
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--warmup", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the 1-process rows")
    parser.add_argument("--pairs", type=int, default=5, help="interleaved (plain, ours) pairs per worker count")
    parser.add_argument("--diagnose", action="store_true", help="also the 1-worker gap's layers (module docstring)")
    parser.add_argument("--background-cores", type=float, default=0.1,
                        help="--diagnose: the synthetic background load, in cores (Ray's own processes took ~0.1)")
    args = parser.parse_args()
    if not 0 < args.background_cores < 1:
        parser.error(f"--background-cores {args.background_cores}: a share of one core, between 0 and 1")
    cfg = load_config(TrainJobConfig, CONFIG)
    storage = tempfile.mkdtemp(prefix="bench-train-")
    atexit.register(shutil.rmtree, storage, True)  # Ray Train's run folders: nothing to keep

    # The machine's speed drifts between runs (the plain loop alone moved 583 -> 680 images/s
    # between two runs): each ratio is taken within one pair, run back to back, and the pair's
    # order alternates so a drift within a pair favours neither side.
    pairs: dict[int, list[dict]] = {1: [], 2: []}
    for i in range(args.pairs):
        for workers in (1, 2):
            threads = args.threads if workers == 1 else max(1, args.threads // workers)
            runs = {}
            for side in (("plain", "ours") if i % 2 == 0 else ("ours", "plain")):
                wait_until_quiet()  # a finished fit's workers take seconds to exit
                # the plain loop in a fresh process: the driver keeps Ray Train's threads after a fit
                if side == "plain":
                    # the same CPU sampler as during ours, whose ~0.01 cores would otherwise
                    # count against ours alone
                    with Periodic(_cpu_seconds_by_process, interval=CPU_SAMPLE_S):
                        runs[side] = run_isolated(plain_loop, cfg, args.steps, args.warmup, args.threads)[0]
                else:
                    with _private_ray():
                        runs[side] = sum(ray_deepspeed(cfg, workers, args.steps, args.warmup, threads, storage))
            pairs[workers].append({**runs, "ratio": runs["ours"] / runs["plain"], **_CPU_SHARES[-1]})
            print(f"pair {i + 1}/{args.pairs}, {workers} worker(s): plain {runs['plain']:.1f}, "
                  f"ours {runs['ours']:.1f} images/s, ratio {runs['ours'] / runs['plain']:.3f}", flush=True)
            if args.diagnose and workers == 1:
                layers = {}
                for name, run in (("plain beside background load",
                                   lambda: plain_beside_load(cfg, args.steps, args.warmup, threads, args.background_cores)),
                                  ("plain loop as a Ray task", lambda: plain_in_ray_task(cfg, args.steps, args.warmup, threads)),
                                  ("plain loop in a Ray Train worker",
                                   lambda: plain_in_train_worker(cfg, args.steps, args.warmup, threads, storage))):
                    wait_until_quiet()
                    layers[name] = run() / runs["plain"]
                pairs[1][-1]["layers"] = layers
                print("  layers: " + ", ".join(f"{k} {v:.3f}" for k, v in layers.items()), flush=True)
    rows, summary = [], {}
    for workers, found in pairs.items():
        ratios = [p["ratio"] for p in found]
        threads = args.threads if workers == 1 else max(1, args.threads // workers)
        summary[f"{workers}w"] = {"pairs": found, "median_ratio": statistics.median(ratios),
                                  "min_ratio": min(ratios), "max_ratio": max(ratios)}
        rows.append({"setup": f"Ray Train + DeepSpeed, {workers} worker(s) × {threads} thread(s)",
                     "plain images/s (median)": f"{statistics.median(p['plain'] for p in found):.1f}",
                     "ours images/s (median)": f"{statistics.median(p['ours'] for p in found):.1f}",
                     "ratio per pair": " ".join(f"{r:.2f}" for r in ratios),
                     "cores: train workers / all other processes (median)":
                         f"{statistics.median(p['train_worker_cores'] for p in found):.2f} / "
                         f"{statistics.median(p['other_process_cores'] for p in found):.2f}",
                     "median ratio": f"{statistics.median(ratios):.3f}"})
    print_table(rows)
    if args.diagnose:
        names = list(pairs[1][0]["layers"])
        print_table([{"1 worker, vs the plain loop of the same pair": name,
                      "ratio per pair": " ".join(f"{p['layers'][name]:.2f}" for p in pairs[1]),
                      "median": f"{statistics.median(p['layers'][name] for p in pairs[1]):.3f}"}
                     for name in names] + [{"1 worker, vs the plain loop of the same pair": "ours (Ray Train + DeepSpeed)",
                                            "ratio per pair": " ".join(f"{p['ratio']:.2f}" for p in pairs[1]),
                                            "median": f"{summary['1w']['median_ratio']:.3f}"}])
    batch = cfg.train.p * cfg.train.k
    write_results("train_throughput", {
        "model": "demo tiny ViT (configs/demo/train.yaml)", "batch_per_worker": batch,
        "image": [cfg.transform.height, cfg.transform.width], "steps": args.steps, "warmup": args.warmup,
        "plain_threads": args.threads, "pairs": args.pairs, "results": summary,
        "background_cores": args.background_cores if args.diagnose else None,
    })


if __name__ == "__main__":
    main()
