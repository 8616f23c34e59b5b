"""Per-worker memory of the ID classifier at 100k / 1M identities: linear vs Partial FC.

For each (identities C, dimension D, per-worker batch B) and classifier, one training step
(forward, cross-entropy, backward, AdamW step: what ``train/loop.py`` does to the head) runs
on CPU in its own process (``run_isolated``), and the bytes of the class centres, their
gradient, the AdamW state and the logits tensor are *measured* from the live tensors, with
the process's peak RSS and the step time.

Layouts per worker, for N data-parallel workers:
- ``linear``: the BoT classifier, replicated on every worker (DeepSpeed data parallel, ZeRO 0).
  Measured at N=1; the same bytes at any N (every worker holds the same tensors).
- ``partial_fc (replicated)``: Partial FC as reidscale trains it (``reid.build_classifier``):
  every worker holds all centres and scores its own batch against its positives + 10% of
  the classes. Measured at N=1; the same at any N.
- ``partial_fc (sharded)``: the paper's layout, ``models/sharded_fc.ShardedPartialFC``
  (centres split over N ranks, global batch all-gathered, each rank scoring B·N rows against
  its positives + r·C/N sampled centres, exact distributed softmax, its own AdamW).
  **Measured** for ``--workers`` (default N=1 and N=2: N gloo processes on 127.0.0.1, each
  reporting its own tensors, peak RSS and step time); *computed* with
  ``classifier.memory_bytes`` for 8 and 64, and the formula is printed beside the measured rows.
- ``prompts``: CLIP-ReID's per-identity state sharded the same way
  (``models/sharded_prompts.py``): per rank the prompt tokens (C/N × n_ctx × 512), their dense
  gradient, Adam's 2 states and the stage-1 text features (C/N × 512). **Measured** for
  ``--workers`` at ``--prompt-classes`` (2 stage-1 steps of ``sharded_supervised_contrastive``
  + Adam on N gloo ranks, a 1-layer 512-wide text tower); the text-feature table is allocated
  at its size, not computed (C/N prompts through the text tower is hours on one CPU thread).
  *Computed* with ``sharded_prompts.prompt_memory_bytes`` for 1..64 workers at every
  ``--prompt-classes`` and 1M, beside the measured rows. N=1 is also the replicated layout.

    python bench/partial_fc_memory.py [--classes 100000 1000000] [--dim 512] [--batch 64]
        [--layouts replicated sharded prompts] [--workers 1 2] [--prompt-classes 100000]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import print_table, run_isolated, write_results  # noqa: E402

WORLDS = (1, 8, 64)
SAMPLE_RATE = 0.1


def one_step(kind: str, num_classes: int, dim: int, batch: int) -> dict:
    """One fwd/bwd/AdamW step of a classifier head on CPU; bytes of its tensors, step time."""
    import torch
    import torch.nn.functional as F

    from reidscale.models.classifier import LinearClassifier, PartialFC, sampled_targets
    from reidscale.models.sharded_fc import ShardedPartialFC  # noqa: F401 (the sharded ranks' imports, for the floor)

    torch.manual_seed(0)
    torch.set_num_threads(1)  # a shared 2-core machine
    if kind == "floor":  # the same imports, no step: what the peak RSS includes anyway
        return {}
    if kind == "linear":
        head = LinearClassifier(dim, num_classes)
    else:
        head = PartialFC(dim, num_classes, sample_rate=SAMPLE_RATE)
    # the loop's optimizer: AdamW, centres in the decay group for linear, exempt for Partial FC
    wd = 5e-4 if kind == "linear" else 0.0
    opt = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=wd, foreach=False)
    feat = torch.randn(batch, dim, requires_grad=True)
    labels = torch.randint(0, num_classes, (batch // 4,)).repeat_interleave(4)  # P×K: K=4
    times = []
    for _ in range(2):  # the first step also allocates the optimizer state
        t0 = time.perf_counter()
        logits = head(feat, labels)
        targets = labels if kind == "linear" else sampled_targets(labels)
        loss = F.cross_entropy(logits.float(), targets)
        opt.zero_grad(set_to_none=False)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    nbytes = lambda t: t.numel() * t.element_size()
    state = sum(nbytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0)
    return {
        "centres": nbytes(head.weight),
        "gradient": nbytes(head.weight.grad),
        "optimizer_state": state,
        "logits": nbytes(logits),
        "logits_shape": list(logits.shape),
        "step_s": round(times[-1], 3),
    }


def sharded_rank(rank: int, world: int, port: int, num_classes: int, dim: int, batch: int, out: dict) -> None:
    """One rank of the sharded head: 2 fwd/bwd/AdamW steps; its tensors' bytes, peak RSS, step time."""
    import resource

    import torch
    import torch.distributed as dist

    from reidscale.models.sharded_fc import ShardedPartialFC, head_optimizer

    torch.set_num_threads(1)  # a shared 2-core machine: one thread per rank
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    head = ShardedPartialFC(dim, num_classes, sample_rate=SAMPLE_RATE, seed=0, rank=rank, world=world)
    opt = head_optimizer(head, "adamw", lr=1e-3)
    g = torch.Generator().manual_seed(rank)
    feat = torch.randn(batch, dim, generator=g, requires_grad=True)
    labels = torch.randint(0, num_classes, (batch // 4,), generator=g).repeat_interleave(4)  # P×K: K=4
    times = []
    for step in range(2):  # the first step also allocates the optimizer state
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        o = head(feat, labels, step=step)
        opt.zero_grad(set_to_none=False)
        o.loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    nbytes = lambda t: t.numel() * t.element_size()
    state = sum(nbytes(v) for v in opt.state[head.weight].values() if torch.is_tensor(v) and v.dim() > 0)
    out[rank] = {"centres": nbytes(head.weight), "gradient": nbytes(head.weight.grad), "optimizer_state": state,
                 # the logits tensor of the step: (global batch) x (columns this shard scored), fp32
                 "logits": batch * world * o.columns * 4, "logits_shape": [batch * world, o.columns],
                 "step_s": round(times[-1], 3),
                 "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if world > 1:
        dist.destroy_process_group()


def prompt_rank(rank: int, world: int, port: int, num_classes: int, dim: int, batch: int, out: dict) -> None:
    """One rank of CLIP-ReID's sharded stage 1: 2 steps; its identity tensors' bytes, peak RSS, step time."""
    import resource

    import torch
    import torch.distributed as dist

    from reidscale.losses.sharded_image_text import sharded_supervised_contrastive
    from reidscale.models.backbone import ModelConfig
    from reidscale.models.prompt_learner import Stage1Model, TextTower, build_clip
    from reidscale.models.sharded_prompts import ShardedPromptLearner, prompt_optimizer

    torch.set_num_threads(1)  # a shared 2-core machine: one thread per rank
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    # ViT-B-16's text width and projection (512), one layer: the per-identity tensors are full size
    clip = build_clip(ModelConfig(width=32, layers=1, heads=2, patch_size=8, embed_dim=dim), (32, 16),
                      text_width=PROMPT_TOKEN_DIM, text_layers=1, text_heads=8)
    prompts = ShardedPromptLearner(num_classes, clip.token_embedding, n_ctx=PROMPT_N_CTX, seed=0, rank=rank,
                                   world=world)
    stage1 = Stage1Model(prompts, TextTower(clip))
    opt = prompt_optimizer(prompts, lr=3.5e-4, weight_decay=1e-4)
    g = torch.Generator().manual_seed(rank)
    times = []
    for _ in range(2):  # the first step also allocates the optimizer state
        feat = torch.randn(batch, dim, generator=g)
        labels = torch.randint(0, num_classes, (batch,), generator=g)  # stage 1: random images, K=1
        if world > 1:
            dist.barrier()
        t0 = time.perf_counter()
        i2t, t2i = sharded_supervised_contrastive(feat, labels, stage1, prompts.lo, prompts.hi)
        opt.zero_grad(set_to_none=False)
        (i2t + t2i).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    # what stage 2 keeps: this range's text features (allocated at size; see the module docstring)
    text_features = torch.zeros(prompts.hi - prompts.lo, dim)
    nbytes = lambda t: t.numel() * t.element_size()
    state = sum(nbytes(v) for v in opt.state[prompts.ctx].values() if torch.is_tensor(v) and v.dim() > 0)
    out[rank] = {"prompts": nbytes(prompts.ctx), "gradient": nbytes(prompts.ctx.grad), "optimizer_state": state,
                 "text_features": nbytes(text_features), "step_s": round(times[-1], 3),
                 "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if world > 1:
        dist.destroy_process_group()


def _sharded_entry(rank, world, port, num_classes, dim, batch, out, fn=sharded_rank):
    fn(rank, world, port, num_classes, dim, batch, out)


def measure_sharded(num_classes: int, dim: int, batch: int, world: int, fn=sharded_rank) -> list[dict]:
    """``world`` spawned processes (gloo on 127.0.0.1) running ``fn``, one result dict per rank."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.get_context("spawn").Manager() as manager:
        out = manager.dict()
        mp.spawn(_sharded_entry, args=(world, port, num_classes, dim, batch, out, fn), nprocs=world, join=True)
        return [dict(out[r]) for r in range(world)]


PROMPT_N_CTX, PROMPT_TOKEN_DIM = 4, 512  # CLIP-ReID's 4 identity tokens, ViT-B-16's text width
PROMPT_KEYS = ("prompts", "gradient", "optimizer_state", "text_features")


def prompt_rows(classes: list[int], workers: list[int], dim: int, batch: int) -> tuple[list[dict], list[dict]]:
    """(table rows, JSON records) of the sharded CLIP-ReID identity state: measured at ``workers``
    for each of ``classes``, the formula for 1..64 workers and at 1M beside them."""
    from reidscale.models.sharded_prompts import prompt_memory_bytes

    rows, records = [], []
    for c in sorted(set(classes) | {1_000_000}):
        measured = {}
        for n in workers if c in classes else ():
            print(f"measuring sharded CLIP-ReID prompts at {c:,} identities on {n} ranks ...", flush=True)
            load = os.getloadavg()[0]
            floor = max(r["peak_rss"] for r in measure_sharded(8 * n, dim, batch, n, fn=prompt_rank))
            per_rank = measure_sharded(c, dim, batch, n, fn=prompt_rank)
            worst = max(per_rank, key=lambda r: r["peak_rss"])
            measured[n] = {**worst, "rss_above_floor": worst["peak_rss"] - floor, "floor": floor,
                           "step_s": max(r["step_s"] for r in per_rank), "load_1min": round(load, 2),
                           "per_rank": per_rank}
        for n in sorted(set(measured) | {1, 2, 8, 64}):
            formula = prompt_memory_bytes(c, n, n_ctx=PROMPT_N_CTX, token_dim=PROMPT_TOKEN_DIM, text_dim=dim)
            m = measured.get(n)
            values = {k: m[k] for k in PROMPT_KEYS} if m else formula
            source = f"measured ({n} gloo processes, largest rank)" if m else "formula (sharded_prompts.prompt_memory_bytes)"
            total = sum(values.values())
            records.append({"identities": c, "layout": "clipreid prompts (sharded)", "workers": n,
                            "n_ctx": PROMPT_N_CTX, "token_dim": PROMPT_TOKEN_DIM, "text_dim": dim,
                            **{f"{k}_bytes": v for k, v in values.items()}, "total_bytes": total,
                            "formula_total_bytes": sum(formula.values()),
                            "peak_rss_above_floor_bytes": m["rss_above_floor"] if m else None,
                            "step_s": m["step_s"] if m else None, "load_1min": m["load_1min"] if m else None,
                            "source": source, **({"per_rank": m["per_rank"]} if m else {})})
            rows.append({"identities": f"{c:,}", "layout": "clipreid prompts (sharded)", "N": n,
                         "prompts MiB": mib(values["prompts"]), "grad MiB": mib(values["gradient"]),
                         "Adam MiB": mib(values["optimizer_state"]), "text feat MiB": mib(values["text_features"]),
                         "total MiB": mib(total), "formula MiB": mib(sum(formula.values())),
                         "peak RSS - floor MiB": mib(m["rss_above_floor"]) if m else "",
                         "step s": m["step_s"] if m else "", "load": m["load_1min"] if m else "", "source": source})
    return rows, records


PROMPT_NOTE = ("bytes per worker (largest rank), fp32, Adam (2 states) over the prompt tokens; text_features = the "
               "stage-1 table kept for stage 2 (allocated at size); peak_rss_above_floor = the rank's peak RSS minus "
               "the peak of the same ranks running the step at 8·N identities; step_s the slowest rank's 2nd step")


def mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64, help="images per worker per step (P×K)")
    ap.add_argument("--layouts", nargs="+", default=["replicated", "sharded"],
                    choices=["replicated", "sharded", "prompts"],
                    help="replicated: linear + replicated Partial FC (N=1); sharded: ShardedPartialFC on N ranks; "
                         "prompts: CLIP-ReID's sharded prompts + text features on N ranks")
    ap.add_argument("--prompt-classes", type=int, nargs="+", default=[100_000],
                    help="identities of the measured prompt rows (1M x 4 x 512 with Adam does not fit at N=1 here)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="N for the measured sharded rows")
    args = ap.parse_args()

    from reidscale.models.classifier import memory_bytes

    if args.layouts == ["prompts"]:
        rows, records = prompt_rows(args.prompt_classes, args.workers, args.dim, args.batch)
        print_table(rows)
        print(f"wrote {write_results('partial_fc_memory_prompts', {'note': PROMPT_NOTE, 'results': records})}")
        return
    _, floor = run_isolated(one_step, "floor", 1, args.dim, args.batch)
    rows, records = [], []
    for c in args.classes:
        measured = {}
        kinds = ("linear", "partial_fc") if "replicated" in args.layouts else ()
        for kind in kinds:
            print(f"measuring {kind} at {c:,} x {args.dim} ...", flush=True)
            out, peak = run_isolated(one_step, kind, c, args.dim, args.batch)
            out["peak_rss"] = peak
            out["rss_above_floor"] = peak - floor
            measured[kind] = out
        sharded = {}
        if "sharded" in args.layouts:
            for n in args.workers:
                print(f"measuring sharded partial_fc at {c:,} x {args.dim} on {n} ranks ...", flush=True)
                load = os.getloadavg()[0]
                # the floor of this process layout (spawned ranks, gloo): the same step at N·8 identities
                rank_floor = max(r["peak_rss"] for r in measure_sharded(8 * n, args.dim, args.batch, n))
                per_rank = measure_sharded(c, args.dim, args.batch, n)
                worst = max(per_rank, key=lambda r: r["peak_rss"])
                sharded[n] = {**worst, "rss_above_floor": worst["peak_rss"] - rank_floor, "floor": rank_floor,
                              "step_s": max(r["step_s"] for r in per_rank), "load_1min": round(load, 2),
                              "per_rank": per_rank}
        plan = [(layout, kind) for layout, kind in (("linear", "linear"), ("partial_fc (replicated)", "partial_fc"))
                if kind in measured]
        if "sharded" in args.layouts:
            plan.append(("partial_fc (sharded)", None))
        for layout, kind in plan:
            worlds = WORLDS if kind is not None else sorted(set(args.workers) | set(WORLDS))
            for n in worlds:
                f = memory_bytes(c, args.dim, args.batch, sample_rate=SAMPLE_RATE, world=n)
                formula = {"centres": f["centres"], "gradient": f["gradient"],
                           "optimizer_state": f["optimizer_state"], "logits": f["logits"] // 3}
                load = None
                if kind is not None:  # the same tensors on every worker: measured at N=1
                    m = measured[kind]
                    source = "measured" if n == 1 else "measured at N=1 (replicated: same at any N)"
                    values = {k: m[k] for k in ("centres", "gradient", "optimizer_state", "logits")}
                    peak, step = m["rss_above_floor"], m["step_s"]
                elif n in sharded:  # the largest rank's tensors (ranks differ by at most one row)
                    m = sharded[n]
                    values = {k: m[k] for k in ("centres", "gradient", "optimizer_state", "logits")}
                    source = f"measured ({n} gloo processes, largest rank)"
                    peak, step, load = m["rss_above_floor"], m["step_s"], m["load_1min"]
                else:
                    # memory_bytes counts logits x3 (logits, softmax, gradient); the tensor itself is a third
                    values, source = formula, "formula (classifier.memory_bytes)"
                    peak = step = None
                total = sum(values.values())
                formula_total = sum(formula.values())
                records.append({"identities": c, "dim": args.dim, "batch_per_worker": args.batch,
                                "layout": layout, "workers": n, "sample_rate": SAMPLE_RATE if kind != "linear" else 1.0,
                                **{f"{k}_bytes": v for k, v in values.items()}, "total_bytes": total,
                                "formula_total_bytes": formula_total,
                                "peak_rss_above_import_floor_bytes": peak, "step_s": step, "load_1min": load,
                                "source": source,
                                **({"per_rank": sharded[n]["per_rank"]} if kind is None and n in sharded else {})})
                rows.append({"identities": f"{c:,}", "layout": layout, "N": n,
                             "centres MiB": mib(values["centres"]), "grad MiB": mib(values["gradient"]),
                             "AdamW MiB": mib(values["optimizer_state"]), "logits MiB": f"{values['logits'] / 2**20:,.1f}",
                             "total MiB": mib(total),
                             "formula MiB": mib(formula_total) if kind is None else "",
                             "peak RSS - floor MiB": mib(peak) if peak else "",
                             "step s": step if step is not None else "", "load": load if load is not None else "",
                             "source": source})
    print_table(rows)
    if "prompts" in args.layouts:  # other columns: a table of its own
        more_rows, more_records = prompt_rows(args.prompt_classes, args.workers, args.dim, args.batch)
        print_table(more_rows)
        records += more_records
    path = write_results("partial_fc_memory", {
        "note": "bytes per worker, fp32, AdamW (2 states); logits = the logits tensor of one step; "
                "peak_rss_above_import_floor = the measuring process's peak RSS minus that of a "
                "process with the same imports and no step (sharded rows: minus the peak of the same ranks "
                "running the step at 8·N identities); sharded rows: the largest rank, step_s the slowest",
        "import_floor_rss_bytes": floor, "results": records})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
