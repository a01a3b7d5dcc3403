"""Benchmark: CorrelationAccumulator.update against a plain torch.matmul of the same shapes, and
(with --job) the whole `atlas ingest correlations` job on a small seed family built here.

Both sides do the cross-product GEMM X^T Y of every batch (2 * tokens * n_a * n_b FLOPs); the
accumulator also shifts, sums, tracks min/max, keeps the per-layer Gram matrices (unless
--no-gram) and flushes into float64. The ratio (matmul time / update time, target >= 0.8) is the
share of the machine's GEMM speed that the accumulator achieves on useful work.

    python bench/correlations.py --tokens 8192 --batch 1024 --n-a 3072 --layer-sizes 3072

The job benchmark registers --job-seeds randomly initialised GPT-2 models (built from a config with
fixed seeds, saved with save_pretrained, sharing a byte-level BPE trained on builtin:docstrings) in a
temporary SQLite store, and times the job over --job-tokens tokens of builtin:docstrings: every pair of
seeds (one accumulator per unordered pair gives both directions), model forwards, accumulation,
baselines and writes included. It prints tokens/s of the whole job (dataset tokens / wall time), the
pair-GEMM FLOP/s that implies, and the job's peak RSS growth against what its planner counted for its
largest pass (plus the models' weights) and against --job-budget (plus the weights): with a budget that
binds (the pairs then take several passes or shards) the second is the promise --memory-budget makes.

    python bench/correlations.py --tokens 4096 --job --job-tokens 20000
    python bench/correlations.py --tokens 256 --job --job-budget 400MiB   # a budget that binds (3 passes)
    python bench/correlations.py --device cuda   # the accumulator and the job on a GPU (--device auto)
    python bench/correlations.py --seeds 3 --n-a 3072 --layer-sizes 768   # a family pass, statistics shared
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from atlas.metrics.correlation import DEFAULT_FLUSH_TOKENS, CorrelationAccumulator  # noqa: E402
from bench.activations import peak_rss_mib, reset_peak_rss  # noqa: E402  (the same memory figures)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192, help="token positions per timed pass")
    parser.add_argument("--batch", type=int, default=1024, help="positions per update")
    parser.add_argument("--n-a", type=int, default=3072, help="A neurons in the block")
    parser.add_argument("--layer-sizes", default="3072", help="comma-separated widths of the block's B layers")
    parser.add_argument("--no-gram", action="store_true", help="skip the per-layer Gram matrices")
    parser.add_argument("--flush-tokens", type=int, default=DEFAULT_FLUSH_TOKENS)
    parser.add_argument("--repeats", type=int, default=2, help="timed passes of each; the best is kept")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--precision", default="float32", choices=["float64", "float32", "tf32", "bfloat16"],
                        help="the accumulator's product precision; the plain matmul runs in the same one")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps: where the "
                                                         "batches, the accumulator and the job's models live")
    parser.add_argument("--seeds", type=int, default=0, help="also time a family pass: this many models of --n-a "
                                                            "neurons, every unordered pair, statistics shared")
    parser.add_argument("--job", action="store_true", help="also time the whole correlations job")
    parser.add_argument("--job-seeds", type=int, default=3, help="models in the family (pairs: s * (s - 1) / 2)")
    parser.add_argument("--job-layers", type=int, default=4)
    parser.add_argument("--job-d-model", type=int, default=128)
    parser.add_argument("--job-d-mlp", type=int, default=512)
    parser.add_argument("--job-tokens", type=int, default=20000, help="dataset tokens (ctx 128)")
    parser.add_argument("--job-budget", default="4GiB", help="--memory-budget of the job")
    parser.add_argument("--job-batch-size", type=int, default=32, help="rows per batch")
    return parser.parse_args()


def make_batches(n_batches: int, batch: int, n_a: int, n_b: int,
                 device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """GELU-like float32 activations with an offset, a few distinct batches cycled over, on the device."""
    generator = torch.Generator().manual_seed(0)

    def activations(width: int) -> torch.Tensor:
        return torch.nn.functional.gelu(torch.randn(batch, width, generator=generator) - 0.5) + 0.01

    return [(activations(n_a).to(device), activations(n_b).to(device)) for _ in range(n_batches)]


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work: a timer must not stop while kernels still run."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pass(step, batches, n_steps: int, device: torch.device) -> float:
    synchronize(device)
    start = time.perf_counter()
    for index in range(n_steps):
        step(*batches[index % len(batches)])
    synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from atlas.devices import resolve_device

    device = resolve_device(args.device)
    layer_sizes = [int(size) for size in args.layer_sizes.split(",")]
    n_b, n_steps = sum(layer_sizes), max(1, args.tokens // args.batch)
    tokens = n_steps * args.batch
    batches = make_batches(min(4, n_steps), args.batch, args.n_a, n_b, device)
    rss_before = peak_rss_mib()

    plain_dtype = {"float64": torch.float64, "bfloat16": torch.bfloat16}.get(args.precision, torch.float32)
    plain_batches = [(xa.to(plain_dtype), xb.to(plain_dtype)) for xa, xb in batches]
    torch.backends.cuda.matmul.allow_tf32 = args.precision == "tf32"  # the baseline at the same precision

    def plain_matmul(xa: torch.Tensor, xb: torch.Tensor) -> None:
        torch.matmul(xa.T, xb)

    def accumulated_pass() -> float:
        accumulator = CorrelationAccumulator(
            args.n_a, layer_sizes, track_gram=not args.no_gram, flush_tokens=args.flush_tokens, device=device,
            precision=args.precision,
        )
        synchronize(device)
        start = time.perf_counter()
        time_pass(accumulator.update, batches, n_steps, device)
        accumulator.flush()  # the float64 add of the last partial product counts too
        synchronize(device)
        return time.perf_counter() - start

    plain_matmul(*plain_batches[0])  # warm-up (thread pool, allocator)
    plain_times, update_times = [], []
    for _ in range(args.repeats):  # interleaved so that load from other processes hits both
        plain_times.append(time_pass(plain_matmul, plain_batches, n_steps, device))
        update_times.append(accumulated_pass())
    plain, update = min(plain_times), min(update_times)

    cross_flops = 2.0 * tokens * args.n_a * n_b
    gram_flops = 0.0 if args.no_gram else 2.0 * tokens * sum(d * d for d in layer_sizes)
    held = CorrelationAccumulator.estimate_bytes(args.n_a, layer_sizes, not args.no_gram, args.precision)
    peak = peak_rss_mib()
    print(f"shapes: {tokens} tokens in batches of {args.batch}, n_a={args.n_a}, B layers={layer_sizes}, "
          f"gram={'off' if args.no_gram else 'on'}, flush every {args.flush_tokens} tokens, "
          f"{torch.get_num_threads()} threads, device {_device_name(device)}, precision {args.precision}")
    print(f"plain torch.matmul : {plain:8.3f} s  {cross_flops / plain / 1e9:8.1f} GFLOP/s")
    print(f"accumulator.update : {update:8.3f} s  {cross_flops / update / 1e9:8.1f} GFLOP/s useful "
          f"({(cross_flops + gram_flops) / update / 1e9:.1f} incl. Gram)")
    print(f"ratio (useful FLOP/s, update / matmul): {plain / update:.3f}  (target >= 0.8)")
    print(f"tokens/s: update {tokens / update:,.0f}, matmul {tokens / plain:,.0f}")
    print(f"memory: accumulator holds {held / 2**20:,.1f} MiB; peak RSS {peak:,.1f} MiB "
          f"(before timing {rss_before:,.1f} MiB)"
          + (f"; peak device memory {torch.cuda.max_memory_allocated(device) / 2**20:,.1f} MiB"
             if device.type == "cuda" else ""))
    if args.seeds > 1:
        bench_family_pass(args, device, layer_sizes, n_steps)
    if args.job:
        bench_job(args)


def bench_family_pass(args: argparse.Namespace, device: torch.device, layer_sizes: list[int], n_steps: int) -> None:
    """What the job's consumer does per batch for --seeds models of --n-a neurons (whole layers of
    --layer-sizes' first width): each model's statistics once (ModelColumns), then every unordered pair's
    product and each model's layer covariances; against plain torch.matmul of the same pair products."""
    from itertools import combinations

    from atlas.metrics.correlation import ModelColumns, SharedCorrelationAccumulator

    width, d = args.n_a, layer_sizes[0]
    sizes = [d] * (width // d)
    batches = [activations for activations, _ in make_batches(args.seeds * 2, args.batch, width, 1, device)]
    per_seed = [batches[seed::args.seeds] for seed in range(args.seeds)]
    pairs = list(combinations(range(args.seeds), 2))

    def plain() -> float:
        synchronize(device)
        start = time.perf_counter()
        for step in range(n_steps):
            for a, b in pairs:
                torch.matmul(per_seed[a][step % 2].T, per_seed[b][step % 2])
        synchronize(device)
        return time.perf_counter() - start

    def shared() -> float:
        models = [ModelColumns(width, device) for _ in range(args.seeds)]
        accumulators = [SharedCorrelationAccumulator(models[a], slice(0, width), models[b], slice(0, width), sizes,
                                                     track_gram=False) for a, b in pairs]
        grams = [SharedCorrelationAccumulator(model, slice(0, 0), model, slice(0, width), sizes) for model in models]
        synchronize(device)
        start = time.perf_counter()
        for step in range(n_steps):
            shifted = [model.update(per_seed[seed][step % 2]) for seed, model in enumerate(models)]
            for accumulator, (a, b) in zip(accumulators, pairs):
                accumulator.update_products(shifted[a], shifted[b])
            for gram, y in zip(grams, shifted):
                gram.update_products(y[:, :0], y)
        for accumulator in accumulators + grams:
            accumulator.flush()
        synchronize(device)
        return time.perf_counter() - start

    plain()  # warm-up
    plain_s, shared_s = min(plain() for _ in range(args.repeats)), min(shared() for _ in range(args.repeats))
    tokens = n_steps * args.batch
    flops = 2.0 * tokens * width * width * len(pairs)
    covariance_flops = 2.0 * tokens * sum(size * size for size in sizes) * args.seeds
    print(f"family pass: {args.seeds} seeds x {width} neurons ({len(pairs)} pairs, layers of {d}), {tokens} tokens")
    print(f"plain torch.matmul of the pairs : {plain_s:8.3f} s  {flops / plain_s / 1e9:8.1f} GFLOP/s")
    print(f"consumer (shared statistics)    : {shared_s:8.3f} s  {flops / shared_s / 1e9:8.1f} GFLOP/s of pair products, "
          f"{(flops + covariance_flops) / shared_s / 1e9:.1f} with the layer covariances")
    print(f"ratio (pair FLOP/s, consumer / matmul): {plain_s / shared_s:.3f}; with the covariances' FLOPs "
          f"{plain_s / shared_s * (flops + covariance_flops) / flops:.3f}  (target >= 0.8)")


def _device_name(device: torch.device) -> str:
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


def build_family(root: Path, args: argparse.Namespace) -> list[Path]:
    """Random GPT-2 models (seeds 0..), one shared tokenizer: real models, nothing downloaded."""
    from transformers import AutoModelForCausalLM, GPT2Config

    from atlas.data import iter_documents
    from atlas.training.tokenizer import train_bpe_tokenizer

    texts = [text for _, text in zip(range(3000), iter_documents("builtin:docstrings", "train", "text"))]
    tokenizer = train_bpe_tokenizer(texts, 2048, root / "tokenizer")
    directories = []
    for seed in range(args.job_seeds):
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=args.job_d_model,
                            n_layer=args.job_layers, n_head=4, n_inner=args.job_d_mlp,
                            bos_token_id=0, eos_token_id=0)
        torch.manual_seed(seed)
        directory = root / f"bench-gpt2-seed{seed}"
        AutoModelForCausalLM.from_config(config).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        directories.append(directory)
    return directories


def bench_job(args: argparse.Namespace) -> None:
    from atlas.registry import register_dataset, register_model
    from atlas.store import Store
    from ingest.correlations import CorrelationsConfig, parse_bytes, run

    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        os.environ["ATLAS_CACHE_DIR"] = str(root / "cache")
        store = Store(f"sqlite:///{root / 'bench.db'}")
        for seed, directory in enumerate(build_family(root, args)):
            register_model(store, str(directory), family="bench", seed=seed)
        register_dataset(store, "docs", "builtin:docstrings", n_tokens=args.job_tokens, ctx_len=128)
        config = CorrelationsConfig(family="bench", dataset="docs", memory_budget=args.job_budget,
                                    batch_size=args.job_batch_size, checkpoint_every=0, checkpoint_seconds=0,
                                    device=args.device)
        planned, weights = planned_pass_bytes(store, config)
        rss_before = reset_peak_rss()
        start = time.perf_counter()
        run(config, store)
        seconds = time.perf_counter() - start
        peak = peak_rss_mib()
        store.dispose()
    n = args.job_layers * args.job_d_mlp
    pairs = args.job_seeds * (args.job_seeds - 1) // 2  # unordered: one GEMM serves both directions
    pair_flops = 2.0 * args.job_tokens * n * n * pairs
    print(f"job: {args.job_seeds} seeds ({pairs} seed pairs), {args.job_layers} x {args.job_d_mlp} = {n} neurons "
          f"per model, {args.job_tokens:,} tokens, budget {args.job_budget}, {torch.get_num_threads()} threads")
    print(f"job: {seconds:.2f} s, {args.job_tokens / seconds:,.0f} tokens/s of the whole job, "
          f"{pair_flops / seconds / 1e9:.1f} GFLOP/s of pair GEMM (2 * tokens * N_A * N_B per pair)")
    grown = peak - rss_before
    print(f"job: peak RSS {peak:,.1f} MiB (before the job {rss_before:,.1f} MiB, grown "
          f"{grown:,.1f} MiB); the planner counted {planned / 2**20:,.1f} MiB for its largest pass, plus "
          f"{weights / 2**20:,.1f} MiB of weights: growth / (planned + weights) = {grown * 2**20 / (planned + weights):.2f}, "
          f"growth / (budget + weights) = {grown * 2**20 / (parse_bytes(args.job_budget) + weights):.2f}")


def planned_pass_bytes(store, config) -> tuple[int, int]:
    """What the job's planner counts for its largest pass (accumulators, covariances, each model's statistics
    and batch buffers), and the float32 weights of the models that pass loads."""
    from atlas.modeling import load_model
    from atlas.registry import resolve_dataset, resolve_models
    from ingest.correlation_plan import pass_bytes
    from ingest.correlations import pack_passes, pair_blocks, parse_bytes, same_step_pairs

    with store.session() as session:
        models = resolve_models(session, None, config.family)
        dataset = resolve_dataset(session, config.dataset)
    budget, positions = parse_bytes(config.memory_budget), config.batch_size * dataset.ctx_len
    blocks = [block for a, b in same_step_pairs(models)
              for block in pair_blocks(a, b, dataset.id, budget, config.precision, positions)]
    largest = max(pack_passes(blocks, budget, positions), key=lambda units: pass_bytes(units, positions))
    loaded = {block.a_id for block in largest} | {block.b_id for block in largest}
    weights = sum(sum(p.numel() * 4 for p in load_model(m.source).model.parameters())
                  for m in models if m.id in loaded)
    return pass_bytes(largest, positions), weights

if __name__ == "__main__":
    main()
