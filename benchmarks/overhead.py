"""What pdlab's accounting costs, and what each strategy costs, in one invocation.

    python benchmarks/overhead.py [--model gpt] [--steps 30] [--device cpu|cuda] [--table]

1. Overhead: the same DDP model, data and steps through ``pdlab.train`` (every collective
   counted, memory measured, metrics streamed each step) and through a plain ``torchrun``
   script with none of that. Prints both median step times and their ratio.
2. With ``--table``: samples/s, communication bytes a step and memory a rank for every
   strategy x impl at world sizes 2 and 4.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap

from common import median_after

import pdlab
from pdlab.training import registry

WARMUP = 5  # steps left out of medians: lazy init, first DDP constructor, allocator warm-up

PLAIN_DDP = textwrap.dedent(
    """
    # Plain DDP: pdlab's model and data builders, nothing else of pdlab.
    import json, os, sys, time
    import torch, torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from pdlab.training.data import load_dataset
    from pdlab.training.models import build_model, loss_fn
    from pdlab.training.parallel.data import BUCKET_BYTES  # the same DDP: the same buckets

    model_name, steps, batch, device = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    gpus = torch.cuda.device_count() if device == "cuda" else 0
    dist.init_process_group("nccl" if gpus >= int(os.environ["WORLD_SIZE"]) else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", rank % gpus) if gpus else torch.device("cpu")
    model = DDP(
        build_model(model_name, 0).to(dev),
        device_ids=[dev.index] if dev.type == "cuda" else None,
        bucket_cap_mb=BUCKET_BYTES / 2**20,
    )
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    data = load_dataset(model_name, 0)
    times = []
    for step in range(steps):
        x, y = data.batch(step, batch, shard=rank, num_shards=world)
        x, y = x.to(dev), y.to(dev)
        t = time.perf_counter()
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter() - t)
    t = torch.tensor(times)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest rank
    if rank == 0:
        print(json.dumps(t.tolist()))
    dist.barrier()  # gloo may abort a rank whose peer tore down first
    dist.destroy_process_group()
    """
)


def threads_env(world_size: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world_size))}


def plain_ddp_step_times(world_size: int, model: str, steps: int, batch: int, device: str):
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(PLAIN_DDP)
    try:
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                f"--nproc-per-node={world_size}",
                f.name,
                model,
                str(steps),
                str(batch),
                device,
            ],
            capture_output=True,
            text=True,
            env=threads_env(world_size),
        )
    finally:
        os.unlink(f.name)
    reported = out.stdout.strip().splitlines()[-1:]  # rank 0's step times, printed before teardown
    if out.returncode != 0:
        if not reported:
            raise RuntimeError(f"the plain torchrun run failed:\n{out.stderr[-3000:]}")
        # Seen about once in ten world-4 runs on 2 cores: a rank aborts in gloo's teardown
        # ("terminate called without an active exception"), after the timings were taken.
        print(f"  (plain torchrun exited {out.returncode} in teardown, after reporting)")
    return json.loads(reported[0])


def overhead(cluster: pdlab.Cluster, args: argparse.Namespace) -> None:
    """Median step time of pdlab.train's DDP and of plain DDP, alternating ``--repeats`` times
    so that drift in the machine's load hits both sides alike."""
    world = cluster.world_size
    run = dict(model=args.model, steps=args.steps, batch_size=args.batch_size)
    ours, base = [], []
    for _ in range(args.repeats):
        result = pdlab.train(cluster, strategy="dp", impl="torch", **run)
        ours.append(median_after(result.steps.step_time, WARMUP))
        times = plain_ddp_step_times(world, args.model, args.steps, args.batch_size, args.device)
        base.append(median_after(times, WARMUP))
    ours_ms, base_ms = statistics.median(ours) * 1e3, statistics.median(base) * 1e3
    print(
        f"DDP, {args.model}, world {world}, batch {args.batch_size}, "
        f"{cluster.device}/{cluster.backend}, median of {args.repeats} runs x {args.steps} steps:"
    )
    print(
        f"  step: pdlab.train {ours_ms:.2f} ms, plain torchrun {base_ms:.2f} ms, "
        f"ratio {ours_ms / base_ms:.3f}"
    )


def table(args: argparse.Namespace) -> None:
    print(
        f"\n{'strategy':<9} {'impl':<8} {'world':>5} {'samples/s':>10} {'comm B/step':>12} "
        f"{'max param B/rank':>16} {'optim B/rank':>12} {'peak MB/rank':>12}"
    )
    for world in (2, 4):
        with pdlab.Cluster(world, device=args.device) as cluster:
            for strategy in registry.names():
                for impl in registry.get(strategy).impls:
                    if strategy == "single" and impl == "torch":
                        continue
                    try:
                        r = pdlab.train(
                            cluster,
                            strategy=strategy,
                            impl=impl,
                            model=args.model,
                            steps=args.steps,
                            batch_size=args.batch_size,
                            micro_batches=args.micro_batches
                            if registry.get(strategy).micro_batched
                            else 1,
                        )
                    except (ValueError, NotImplementedError, pdlab.RankError) as exc:
                        print(
                            f"{strategy:<9} {impl:<8} {world:>5}  n/a: {str(exc).splitlines()[0]}"
                        )
                        continue
                    rate = median_after(r.steps.samples_per_s, WARMUP)
                    print(
                        f"{strategy:<9} {impl:<8} {world:>5} {rate:>10.0f} "
                        f"{r.steps.comm_bytes.iloc[-1]:>12.0f} {r.max_rank_param_bytes:>16} "
                        f"{r.memory.optimizer_bytes.max():>12} {r.memory.peak_bytes.max() / 2**20:>12.0f}"
                    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="gpt")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs per side")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--world-sizes", default="2", help="for the overhead run, e.g. 2,4")
    parser.add_argument("--table", action="store_true", help="also the per-strategy table")
    args = parser.parse_args()
    print(f"host: {os.cpu_count()} CPU(s); torch from {pdlab.__name__} run, device {args.device}")
    for world in map(int, args.world_sizes.split(",")):
        with pdlab.Cluster(world, device=args.device) as cluster:
            overhead(cluster, args)
    if args.table:
        table(args)


if __name__ == "__main__":
    main()
