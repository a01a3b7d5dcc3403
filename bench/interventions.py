"""Benchmark: layer interventions against bare forward passes of the same model on the same batches.

The interventions job runs, per batch, the unmodified model once (capturing every residual state)
and each of the 2 * n_layers - 1 deletions and swaps, resuming from the residual state where the
intervention starts (the blocks before it are shared). Timed:
  bare         - model(input_ids, attention_mask) on every batch (the full forward with unembedding);
  interventions- ingest.interventions.measure on the same batches (KL, agreement, accuracy, loss,
                 entropy of every intervention, float64 log-softmax over the vocabulary).
Printed: forward passes per second of each (the job does 2 * n_layers passes per batch), the overhead
ratio (time per intervened pass / time per bare pass) and peak memory.

    python bench/interventions.py --tokens 8192 --layers 6 --d-model 384 --d-mlp 1536
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.activations import model_and_tokens, peak_rss_mib  # noqa: E402  (the same model, text, memory)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192, help="tokens of builtin:docstrings to run")
    parser.add_argument("--ctx", type=int, default=128, help="context length of the rows")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per batch")
    parser.add_argument("--layers", type=int, default=6, help="GPT-2 blocks")
    parser.add_argument("--d-model", type=int, default=384, help="residual width")
    parser.add_argument("--d-mlp", type=int, default=1536, help="MLP neurons per block")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    from ingest.interventions import NONE, measure
    from ingest.next_token import scored_batches

    loaded, tokens = model_and_tokens(args, "interventions")
    batches = list(scored_batches(tokens, tokens.n_rows, loaded, batch_size=args.batch_size,
                                  exclude_special_tokens=True, device="cpu", label="prepare batches"))
    n_layers = loaded.adapter.n_layers(loaded.model)
    n_positions = sum(b.n_positions for b in batches)
    print(f"model: GPT-2 {n_layers} layers, d_model {args.d_model}, d_mlp {args.d_mlp}; {len(batches)} batches, "
          f"{n_positions} scored positions; {torch.get_num_threads()} threads")
    rss_start = peak_rss_mib()

    with torch.inference_mode():  # warm-up, then bare forward passes
        loaded.model(input_ids=batches[0].input_ids, attention_mask=batches[0].attention_mask)
        start = time.perf_counter()
        for batch in batches:
            loaded.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        bare = time.perf_counter() - start
    rss_bare = peak_rss_mib()

    start = time.perf_counter()
    sums = measure(loaded, batches, n_layers)
    intervened = time.perf_counter() - start
    assert sums.count(NONE, "loss") == n_positions

    passes_per_batch = 2 * n_layers  # the unmodified model + 2 * n_layers - 1 interventions
    bare_rate = len(batches) / bare
    job_rate = len(batches) * passes_per_batch / intervened
    print(f"bare forward passes      : {bare_rate:8.2f} /s ({bare:.2f} s)")
    print(f"intervention-job passes  : {job_rate:8.2f} /s ({intervened:.2f} s for {passes_per_batch} passes per batch)")
    print(f"overhead ratio           : {bare_rate / job_rate:8.2f} (time per job pass / time per bare pass)")
    print(f"peak RSS MiB             : start {rss_start:.0f}, after bare {rss_bare:.0f}, "
          f"after interventions {peak_rss_mib():.0f}")


if __name__ == "__main__":
    main()
