"""BYOL training steps/s: Ray Train with one worker over a plain single-process PyTorch loop.

    python bench/pretrain.py [--workdir /tmp/medray-bench-pretrain] [--steps 20] [--warmup 3]
                             [--backbone efficientnet_lite0] [--image-size 64] [--batch 32]

Both sides run the same function (`timed_steps`): the same model (medray.pretrain.loop.build),
the same batch size, the same data loader over the same manifest, the same augmentations and
the same number of torch threads; only the wrapper differs (a `TorchTrainer` worker with
`ScalingConfig(num_workers=1)` vs this process). Steady-state steps/s excludes `--warmup`
steps; the Ray figure's wall time (start-up included) is printed too. One run each, ratio first.
Without a manifest in --workdir, `medray data synth` makes one.
"""

from __future__ import annotations

import argparse
import os
import platform as stdlib_platform
import time

import torch


def timed_steps(loop_config: dict) -> dict:
    """Build the BYOL networks and loader from the config and time `steps` optimiser steps."""
    from medray.data.manifest import read_manifest
    from medray.pretrain import Config
    from medray.pretrain.byol import ema_update, tau_schedule
    from medray.pretrain.dataset import train_uris
    from medray.pretrain.loop import build, byol_step, make_loader, unwrap

    torch.set_num_threads(loop_config["threads"])
    cfg = Config.model_validate(loop_config["config"])
    steps, warmup = loop_config["steps"], loop_config["warmup"]
    uris = train_uris(read_manifest(cfg.workdir))
    device = torch.device("cpu")
    spec, online, target, opt, sched = build(cfg, device, steps + warmup, 1000)
    loader, sampler = make_loader(cfg, uris, 0, 1, spec, on_device=False)
    done, epoch, t0 = 0, 0, time.perf_counter()
    while done < steps + warmup:
        sampler.set_epoch(epoch)
        for batch, _ in loader:
            if done == warmup:
                t0 = time.perf_counter()
            loss = byol_step(online, target, batch, device)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            ema_update(target, unwrap(online), tau_schedule(done, steps + warmup))
            done += 1
            if done == steps + warmup:
                break
        epoch += 1
    seconds = time.perf_counter() - t0
    return {"steps_per_s": steps / seconds, "seconds": seconds, "loss": float(loss.detach())}


def ray_steps(loop_config: dict, cpus: int) -> tuple[dict, float]:
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    t0 = time.perf_counter()
    trainer = TorchTrainer(
        timed_steps,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(storage_path=os.path.join(loop_config["config"]["workdir"], "ray")),
    )
    out = trainer.fit().return_value
    return out, time.perf_counter() - t0


def ensure_data(workdir: str, n: int, size: int) -> None:
    from medray import workdir as wd

    if os.path.exists(wd.manifest(workdir)):
        return
    from medray.data import synth

    synth(workdir, n=n, size=size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/medray-bench-pretrain")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--images", type=int, default=400)
    ap.add_argument("--cpus", type=int, default=2)
    args = ap.parse_args()

    import ray

    from medray.pretrain import Config, resolve_auto

    workdir = os.path.abspath(args.workdir)
    ensure_data(workdir, args.images, max(args.image_size, 32))
    cfg = resolve_auto(Config(workdir=workdir, image_size=args.image_size, batch_size=args.batch,
                              loader_workers=0,
                              backbone={"name": args.backbone, "weights": "random"}))  # fmt: skip
    loop_config = {"config": cfg.model_dump(), "steps": args.steps, "warmup": args.warmup,
                   "threads": args.cpus}  # fmt: skip
    plain = timed_steps(loop_config)
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        under_ray, wall = ray_steps(loop_config, args.cpus)
    finally:
        ray.shutdown()
    ratio = under_ray["steps_per_s"] / plain["steps_per_s"]
    print(f"ray_train_1_worker / plain_loop steps/s: {ratio:.3f}")
    print(f"  plain loop: {plain['steps_per_s']:.3f} steps/s ({args.steps} steps in "
          f"{plain['seconds']:.1f} s)")  # fmt: skip
    print(f"  ray train : {under_ray['steps_per_s']:.3f} steps/s ({args.steps} steps in "
          f"{under_ray['seconds']:.1f} s; fit() wall incl. start-up {wall:.1f} s)")  # fmt: skip
    print(
        f"  model {args.backbone} (random init), batch {args.batch} x 2 views, "
        f"{args.image_size} px, {args.cpus} torch threads, warmup {args.warmup} steps"
    )
    print(
        f"  machine: {stdlib_platform.processor() or stdlib_platform.machine()}, "
        f"{os.cpu_count()} cores, load avg {os.getloadavg()[0]:.1f}, torch {torch.__version__}"
    )
    print("  GPU images/s (ResNet-50 class, 224 px, bf16): not measured (no GPU lent)")


if __name__ == "__main__":
    main()
