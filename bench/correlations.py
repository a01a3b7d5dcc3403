"""Benchmark: CorrelationAccumulator.update against a plain torch.matmul of the same shapes.

Both sides do the cross-product GEMM X^T Y of every batch (2 * tokens * n_a * n_b FLOPs); the
accumulator also shifts, sums, tracks min/max, keeps the per-layer Gram matrices (unless
--no-gram) and flushes into float64. The ratio (matmul time / update time, target >= 0.8) is the
share of the machine's GEMM speed that the accumulator achieves on useful work.

    python bench/correlations.py --tokens 8192 --batch 1024 --n-a 3072 --layer-sizes 3072
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from atlas.metrics.correlation import DEFAULT_FLUSH_TOKENS, CorrelationAccumulator


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
    return parser.parse_args()


def make_batches(n_batches: int, batch: int, n_a: int, n_b: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """GELU-like float32 activations with an offset, a few distinct batches cycled over."""
    generator = torch.Generator().manual_seed(0)

    def activations(width: int) -> torch.Tensor:
        return torch.nn.functional.gelu(torch.randn(batch, width, generator=generator) - 0.5) + 0.01

    return [(activations(n_a), activations(n_b)) for _ in range(n_batches)]


def time_pass(step, batches, n_steps: int) -> float:
    start = time.perf_counter()
    for index in range(n_steps):
        step(*batches[index % len(batches)])
    return time.perf_counter() - start


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    layer_sizes = [int(size) for size in args.layer_sizes.split(",")]
    n_b, n_steps = sum(layer_sizes), max(1, args.tokens // args.batch)
    tokens = n_steps * args.batch
    batches = make_batches(min(4, n_steps), args.batch, args.n_a, n_b)
    rss_before_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def plain_matmul(xa: torch.Tensor, xb: torch.Tensor) -> None:
        torch.matmul(xa.T, xb)

    def accumulated_pass() -> float:
        accumulator = CorrelationAccumulator(
            args.n_a, layer_sizes, track_gram=not args.no_gram, flush_tokens=args.flush_tokens
        )
        start = time.perf_counter()
        time_pass(accumulator.update, batches, n_steps)
        accumulator.flush()  # the float64 add of the last partial product counts too
        return time.perf_counter() - start

    plain_matmul(*batches[0])  # warm-up (thread pool, allocator)
    plain_times, update_times = [], []
    for _ in range(args.repeats):  # interleaved so that load from other processes hits both
        plain_times.append(time_pass(plain_matmul, batches, n_steps))
        update_times.append(accumulated_pass())
    plain, update = min(plain_times), min(update_times)

    cross_flops = 2.0 * tokens * args.n_a * n_b
    gram_flops = 0.0 if args.no_gram else 2.0 * tokens * sum(d * d for d in layer_sizes)
    held = CorrelationAccumulator.estimate_bytes(args.n_a, layer_sizes, not args.no_gram)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"shapes: {tokens} tokens in batches of {args.batch}, n_a={args.n_a}, B layers={layer_sizes}, "
          f"gram={'off' if args.no_gram else 'on'}, flush every {args.flush_tokens} tokens, "
          f"{torch.get_num_threads()} threads")
    print(f"plain torch.matmul : {plain:8.3f} s  {cross_flops / plain / 1e9:8.1f} GFLOP/s")
    print(f"accumulator.update : {update:8.3f} s  {cross_flops / update / 1e9:8.1f} GFLOP/s useful "
          f"({(cross_flops + gram_flops) / update / 1e9:.1f} incl. Gram)")
    print(f"ratio (useful FLOP/s, update / matmul): {plain / update:.3f}  (target >= 0.8)")
    print(f"tokens/s: update {tokens / update:,.0f}, matmul {tokens / plain:,.0f}")
    print(f"memory: accumulator holds {held / 2**20:,.1f} MiB; peak RSS {peak_kb / 1024:,.1f} MiB "
          f"(before timing {rss_before_kb / 1024:,.1f} MiB)")


if __name__ == "__main__":
    main()
