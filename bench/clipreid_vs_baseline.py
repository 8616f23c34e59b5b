"""CLIP-ReID (two stages) vs the single-stage baseline at equal epochs, on the demo's synthetic set.

CLIP-ReID's gain comes from a *pretrained* vision-language model: stage 1 learns identity
prompts that describe each identity in the text space the image encoder was aligned with.
With random towers there is no such space. No pretrained weights can be downloaded here, so
this bench makes one:

1. **Pre-train** the tiny CLIP the demo and tests use (``prompt_learner.build_clip``: the demo
   image tower + the default tiny text tower) contrastively on image-caption pairs of
   synthetic identities *disjoint* from the evaluation set: another generator seed draws
   other people seen by other cameras; the captions name each identity's attributes
   (``synthetic.caption``: colours, pattern, bag, build). None of the evaluation images or
   identities is seen. Saved as an open_clip-style state dict (safetensors) that the real
   loading path reads (``model.pretrained=<file>``).
2. **Train** with ``jobs/train_clipreid.py --config configs/demo/train.yaml`` (1 worker, equal
   stage-2 epochs): baseline (``recipe=baseline``; image tower from the checkpoint) and
   CLIP-ReID (``recipe=clipreid``; both towers from it), and both again from random init.
3. **Evaluate** each trained export on the query/gallery split with ``evaluate_reid`` (what
   ``jobs/evaluate.py`` scores with; embeddings by ``embed.embed_split_in_process``).

Writes runs under ``runs/clipreid_bench/`` (git-ignored), a table on stdout and
``bench/results/clipreid_vs_baseline.json``. A run whose ``models/trained`` exists is reused
(delete its directory to redo it).

    python bench/clipreid_vs_baseline.py [--epochs 10] [--stage1-epochs 40] [--pretrain-epochs 10]
                                         [--runs baseline_pretrained clipreid_pretrained ...]
                                         [--extra train.seed=1 --name-suffix _seed1]
    (docs/benchmarks.md, "CLIP-ReID vs baseline", has the runs measured and what was tuned)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from _common import print_table, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RUNS = ("baseline_random", "clipreid_random", "baseline_pretrained", "clipreid_pretrained")


def demo_configs():
    from reidscale.config import load_config
    from reidscale.train.config import TrainJobConfig

    return load_config(TrainJobConfig, REPO / "configs/demo/train.yaml")


# -- 1. contrastive pre-training on captioned synthetic identities --------------------------------------


def caption_set(num_identities: int, seed: int, height: int, width: int):
    """(JPEG bytes, identity, caption) of a synthetic set drawn with ``seed`` (all splits)."""
    from reidscale.data.sources.synthetic import SyntheticConfig, generate_captioned

    cfg = SyntheticConfig(num_identities=num_identities, seed=seed, height=height, width=width)
    images, ids, captions = [], [], {}
    for record, text in generate_captioned(cfg):
        images.append(record["image"])
        ids.append(record["identity"])
        captions[record["identity"]] = text
    return images, np.asarray(ids), captions


def pretrain_clip(out: Path, *, epochs: int, num_identities: int, seed: int, lr: float, batch: int) -> dict:
    """Pre-train the tiny CLIP on image-caption pairs; save its state dict to ``out``."""
    import open_clip
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from reidscale.data.transforms import decode_batch
    from reidscale.models.prompt_learner import CLIP_CONTEXT_LENGTH, build_clip
    from reidscale.train.schedule import lr_factor

    cfg = demo_configs()
    size = (cfg.transform.height, cfg.transform.width)
    c = cfg.clipreid
    torch.manual_seed(seed)
    torch.set_num_threads(1)  # 2 threads on a shared, oversubscribed 2-core machine ran 10x slower
    t0 = time.time()
    images, ids, captions = caption_set(num_identities, seed, 128, 64)
    print(f"pre-training set: {len(images)} images of {len(captions)} identities (seed {seed}), "
          f"{len(set(captions.values()))} distinct captions, rendered in {time.time() - t0:.0f} s", flush=True)
    # hold out 10% of the identities to check that image->caption retrieval generalises
    identities = np.array(sorted(captions))
    held = set(np.random.default_rng(seed).choice(identities, size=max(10, len(identities) // 10), replace=False).tolist())
    train_rows = np.array([i for i, x in enumerate(ids) if x not in held])
    test_rows = np.array([i for i, x in enumerate(ids) if x in held])
    tokens = {i: open_clip.tokenize([captions[i]], context_length=CLIP_CONTEXT_LENGTH)[0] for i in captions}
    clip = build_clip(cfg.model, size, text_width=c.text_width, text_layers=c.text_layers, text_heads=c.text_heads)
    optimizer = torch.optim.AdamW(clip.parameters(), lr=lr, weight_decay=0.1)
    by_id = {}
    for row in train_rows:
        by_id.setdefault(int(ids[row]), []).append(int(row))
    train_ids = np.array(sorted(by_id))
    steps_per_epoch = max(1, len(train_rows) // batch)
    total = steps_per_epoch * epochs
    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, total_steps=total, warmup_steps=steps_per_epoch, schedule="cosine"))
    rng = np.random.default_rng(seed + 1)
    step = 0
    for epoch in range(epochs):
        clip.train()
        losses = []
        for _ in range(steps_per_epoch):
            # distinct identities per batch, one image each: the in-batch negatives are other people
            chosen = rng.choice(train_ids, size=min(batch, len(train_ids)), replace=False)
            rows = [by_id[int(i)][rng.integers(len(by_id[int(i)]))] for i in chosen]
            x = decode_batch({"image": np.array([images[r] for r in rows], dtype=object)}, cfg.transform,
                             train=True, seed=int(rng.integers(2**31)))["image"]
            text = torch.stack([tokens[int(i)] for i in chosen])
            img_f = F.normalize(clip.encode_image(torch.from_numpy(x)), dim=-1)
            txt_f = F.normalize(clip.encode_text(text), dim=-1)
            logits = clip.logit_scale.exp().clamp(max=100) * img_f @ txt_f.t()
            target = torch.arange(len(chosen))
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            sched.step()
            step += 1
            losses.append(float(loss.detach()))
        acc = caption_retrieval(clip, images, ids, test_rows, tokens, cfg.transform)
        print(f"pre-train epoch {epoch + 1}/{epochs}: loss {np.mean(losses):.3f}, held-out image->caption "
              f"top-1 {acc:.3f} (chance {1 / len(held):.3f}), {time.time() - t0:.0f} s", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in clip.state_dict().items()}, str(out))
    return {"images": len(images), "identities": len(captions), "held_out_identities": len(held),
            "epochs": epochs, "lr": lr, "batch": batch, "steps": step, "seed": seed,
            "final_loss": float(np.mean(losses)), "held_out_caption_top1": acc, "chance": 1 / len(held),
            "seconds": round(time.time() - t0, 1), "checkpoint": str(out)}


def caption_retrieval(clip, images, ids, rows, tokens, transform) -> float:
    """Top-1 accuracy of image -> caption among the held-out identities' captions."""
    import torch
    import torch.nn.functional as F

    from reidscale.data.transforms import decode_batch

    clip.eval()
    held = sorted({int(ids[r]) for r in rows})
    with torch.no_grad():
        txt = F.normalize(clip.encode_text(torch.stack([tokens[i] for i in held])), dim=-1)
        x = decode_batch({"image": np.array([images[r] for r in rows], dtype=object)}, transform, train=False)["image"]
        img = F.normalize(clip.encode_image(torch.from_numpy(x)), dim=-1)
    pred = np.asarray(held)[(img @ txt.t()).argmax(1).numpy()]
    return float((pred == ids[rows]).mean())


# -- 2. training runs and 3. evaluation ------------------------------------------------------------------


def train(name: str, work: Path, data: Path, overrides: list[str]) -> dict:
    run_dir = work / name
    if (run_dir / "models" / "trained" / "config.json").is_file():
        print(f"{name}: reusing {run_dir}", flush=True)
        return {"seconds": None, "reused": True}
    t0 = time.time()
    cmd = [sys.executable, "jobs/train_clipreid.py", "--config", "configs/demo/train.yaml", f"run_dir={run_dir}",
           f"data_dir={data}", "train.num_workers=1", "train.cpus_per_worker=1", "train.eval_every_epochs=0",
           "train.log_every=50", *overrides]
    print(f"{name}: {' '.join(cmd[1:])}", flush=True)
    with open(work / f"{name}.log", "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"{name}: training failed (exit {proc.returncode}); see {work / f'{name}.log'}")
    return {"seconds": round(time.time() - t0, 1), "reused": False}


def evaluate(model_dir: Path, data: Path) -> dict:
    import torch

    from reidscale.embed import embed_split_in_process
    from reidscale.evaluate import evaluate_reid

    torch.set_num_threads(1)  # see pretrain_clip
    q, qm = embed_split_in_process(model_dir, data, "query")
    g, gm = embed_split_in_process(model_dir, data, "gallery")
    r = evaluate_reid(q, g, qm.column("identity").to_numpy(), gm.column("identity").to_numpy(),
                      qm.column("camera").to_numpy(), gm.column("camera").to_numpy(), metric="cosine")
    return {"mAP": float(r["mAP"]), "rank1": float(r["cmc"][0]), "mINP": float(r["mINP"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default=str(REPO / "runs" / "clipreid_bench"))
    ap.add_argument("--epochs", type=int, default=10, help="stage-2 / baseline epochs (equal for both)")
    ap.add_argument("--stage1-epochs", type=int, default=40)
    ap.add_argument("--stage1-lr", type=float, default=3.5e-4)
    ap.add_argument("--lr", type=float, default=0.0, help="training lr for all runs; 0: the demo config's")
    ap.add_argument("--pretrain-epochs", type=int, default=10)
    ap.add_argument("--pretrain-identities", type=int, default=500)
    ap.add_argument("--pretrain-lr", type=float, default=5e-4)
    ap.add_argument("--pretrain-seed", type=int, default=1, help="the demo data uses seed 0")
    ap.add_argument("--runs", nargs="+", default=list(RUNS), choices=RUNS)
    ap.add_argument("--extra", nargs="*", default=[], help="more key=value overrides for every run")
    ap.add_argument("--name-suffix", default="", help="appended to the run names (a variant beside the main runs)")
    args = ap.parse_args()
    if args.pretrain_seed == 0:
        raise SystemExit("--pretrain-seed 0 is the evaluation set's seed: the pre-training set must be disjoint")

    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = work / "data"
    if not (data / "manifest.json").is_file():
        subprocess.run([sys.executable, "jobs/prepare_data.py", "--config", "configs/demo/prepare.yaml",
                        f"out_dir={data}"], cwd=REPO, check=True)
    ckpt = work / "pretrained" / "tiny_clip.safetensors"
    pretrain_json = work / "pretrained" / "pretrain.json"
    if any(r.endswith("_pretrained") for r in args.runs):
        if not ckpt.is_file():
            info = pretrain_clip(ckpt, epochs=args.pretrain_epochs, num_identities=args.pretrain_identities,
                                 seed=args.pretrain_seed, lr=args.pretrain_lr, batch=64)
            pretrain_json.write_text(json.dumps(info, indent=2))
    pretrain = json.loads(pretrain_json.read_text()) if pretrain_json.is_file() else None

    common = [f"train.epochs={args.epochs}", *([f"optim.lr={args.lr}"] if args.lr else []), *args.extra]
    clipreid = ["recipe=clipreid", f"clipreid.stage1_epochs={args.stage1_epochs}", f"clipreid.stage1_lr={args.stage1_lr}",
                "clipreid.stage1_warmup_epochs=1"]
    overrides = {
        "baseline_random": [],
        "clipreid_random": clipreid,
        "baseline_pretrained": [f"model.pretrained={ckpt}"],
        "clipreid_pretrained": clipreid + [f"model.pretrained={ckpt}"],
    }
    results_path = work / "results.json"

    def record(name: str, entry: dict) -> dict:
        # read-modify-write: variants (--name-suffix) may run beside the main invocation
        results = json.loads(results_path.read_text()) if results_path.is_file() else {}
        prev = results.get(name, {})
        if entry.get("train_seconds") is None:
            entry["train_seconds"] = prev.get("train_seconds")
        results[name] = entry
        results_path.write_text(json.dumps(results, indent=2))
        return results

    untrained = None
    for base in args.runs:
        name = base + args.name_suffix
        run = train(name, work, data, common + overrides[base])
        metrics = evaluate(work / name / "models" / "trained", data)
        if untrained is None and (work / name / "models" / "untrained").is_dir() and base.endswith("_pretrained"):
            # the pre-trained image tower before any ReID training (zero-shot ReID)
            untrained = evaluate(work / name / "models" / "untrained", data)
        print(f"{name}: mAP {metrics['mAP']:.4f} rank-1 {metrics['rank1']:.4f}", flush=True)
        results = record(name, {**metrics, "overrides": common + overrides[base], "train_seconds": run["seconds"]})
    if untrained is not None:
        results = record("pretrained_tower_before_reid_training", {**untrained, "overrides": [], "train_seconds": 0})

    rows = [{"run": n, "init": "pre-trained CLIP" if "pretrained" in n else "random",
             "recipe": "baseline" if n.startswith("baseline") or n.startswith("pretrained_tower") else "clipreid",
             "mAP": f"{r['mAP']:.4f}", "Rank-1": f"{r['rank1']:.4f}", "mINP": f"{r['mINP']:.4f}",
             "train s": r.get("train_seconds") or ""} for n, r in results.items()]
    print_table(rows)
    path = write_results("clipreid_vs_baseline", {
        "epochs": args.epochs, "stage1_epochs": args.stage1_epochs, "stage1_lr": args.stage1_lr,
        "workers": 1, "pretrain": pretrain, "results": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
