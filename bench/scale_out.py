"""Benchmark: the correlations job spread over Ray workers on this machine, against the local executor.

Builds a seed family of randomly initialised GPT-2 models (from a config with fixed seeds, saved with
save_pretrained; a BPE trained on builtin:docstrings; nothing downloaded), registers them and
builtin:docstrings in a temporary SQLite atlas, then times the same `atlas ingest correlations` job:

  local  the local executor in this process with one torch thread, no token shards (the baseline);
  ray-1  --executor ray --token-shards K on a local Ray of 1 CPU: one worker process of one thread;
  ray-2  the same on a local Ray of 2 CPUs: two worker processes of one thread each.

Each run recomputes everything (--overwrite) and is timed from the job's start to its rows committed:
Ray's start, the workers' imports and model loads, the merge and the writes included. It prints the
tokens/s of each (dataset tokens / wall time), the scale-out ratio ray-2 / ray-1 (aim >= 1.6 on two
cores) and the overhead of the Ray executor with one worker against the local executor with one thread
(ray-1 / local), and checks that the three runs stored the same rows (max |d max_corr|).

    python bench/scale_out.py                     # the default family (allow ~5 minutes here)
    python bench/scale_out.py --tokens 8000 --layers 2 --d-mlp 256   # a quick look
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="models in the family (pairs: s * (s - 1) / 2)")
    parser.add_argument("--layers", type=int, default=4, help="layers of each model")
    parser.add_argument("--d-model", type=int, default=128, help="residual width of each model")
    parser.add_argument("--d-mlp", type=int, default=512, help="MLP neurons per layer")
    parser.add_argument("--tokens", type=int, default=40000, help="dataset tokens (ctx 128)")
    parser.add_argument("--batch-size", type=int, default=16, help="rows per batch")
    parser.add_argument("--token-shards", type=int, default=8, help="token shards of the Ray runs")
    parser.add_argument("--workers", default="1,2", help="Ray worker counts to time (one CPU and thread each)")
    return parser.parse_args()


def build_family(root: Path, args: argparse.Namespace) -> list[Path]:
    from bench.correlations import build_family as build

    return build(root, argparse.Namespace(job_seeds=args.seeds, job_d_model=args.d_model, job_layers=args.layers,
                                          job_d_mlp=args.d_mlp))


def stored_rows(store) -> dict:
    from sqlalchemy import select

    from atlas.store.schema import NeuronCorrelation

    with store.session() as session:
        return {(r.model_id, r.other_model_id, r.layer, r.neuron): (r.max_corr, r.partner_layer, r.partner_neuron)
                for r in session.scalars(select(NeuronCorrelation))}


def max_difference(rows: dict, reference: dict) -> tuple[float, int]:
    """(max |d max_corr|, partners changed) against the reference rows."""
    worst, partners = 0.0, 0
    for key, (value, layer, neuron) in reference.items():
        other = rows[key]
        if value is not None and other[0] is not None:
            worst = max(worst, abs(other[0] - value))
        partners += (other[1], other[2]) != (layer, neuron)
    return worst, partners


def timed_run(store, config) -> float:
    from ingest.correlations import run

    started = time.perf_counter()
    run(config, store)
    return time.perf_counter() - started


def main() -> None:
    args = parse_args()
    import ray
    import torch

    from atlas.registry import register_dataset, register_model
    from atlas.store import Store
    from ingest.correlations import CorrelationsConfig

    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        os.environ["ATLAS_CACHE_DIR"] = str(root / "cache")
        store = Store(f"sqlite:///{root / 'bench.db'}")
        for seed, directory in enumerate(build_family(root, args)):
            register_model(store, str(directory), family="bench", seed=seed)
        register_dataset(store, "docs", "builtin:docstrings", n_tokens=args.tokens, ctx_len=128)

        def config(**options) -> CorrelationsConfig:
            return CorrelationsConfig(family="bench", dataset="docs", batch_size=args.batch_size, device="cpu",
                                      checkpoint_every=0, checkpoint_seconds=0, overwrite=True,
                                      shard_dir=str(root / "shards"), **options)

        torch.set_num_threads(1)
        timings = {"local": timed_run(store, config())}
        reference = stored_rows(store)
        differences = {}
        for workers in [int(w) for w in args.workers.split(",")]:
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "ATLAS_CACHE_DIR": str(root / "cache")}})
            try:
                name = f"ray-{workers}"
                timings[name] = timed_run(store, config(executor="ray", token_shards=args.token_shards,
                                                        cpus_per_task=1.0))
                differences[name] = max_difference(stored_rows(store), reference)
            finally:
                ray.shutdown()
        store.dispose()

    n = args.layers * args.d_mlp
    pairs = args.seeds * (args.seeds - 1) // 2
    print(f"\nscale out: {args.seeds} seeds ({pairs} pairs) x {n} neurons, {args.tokens:,} tokens, batch "
          f"{args.batch_size}, {args.token_shards} token shards on Ray; {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}, ray {ray.__version__}")
    print(f"{'run':<8} {'seconds':>9} {'tokens/s':>10}  rows against local")
    for name, seconds in timings.items():
        worst, partners = differences.get(name, (0.0, 0))
        against = "-" if name == "local" else f"max |d max_corr| {worst:.1e}, {partners} partners changed"
        print(f"{name:<8} {seconds:>9.1f} {args.tokens / seconds:>10,.0f}  {against}")
    if "ray-1" in timings and "ray-2" in timings:
        print(f"scale-out ratio ray-2 / ray-1: {timings['ray-1'] / timings['ray-2']:.2f}x (aim >= 1.6x)")
    if "ray-1" in timings:
        print(f"ray executor overhead, 1 worker vs the local executor (1 thread): "
              f"{timings['ray-1'] / timings['local']:.2f}x the time")


if __name__ == "__main__":
    main()
