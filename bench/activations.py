"""Benchmark: the activation ingest pass against bare forward passes of the same model on the same batches.

The model is a GPT-2 built from a config with a fixed seed (random weights: speed does not depend on
training) and the tiny byte-level tokenizer; the text is builtin:docstrings. Timed:
  bare   - model(input_ids, attention_mask) on every batch (the full forward, unembedding included);
  ingest - run_family_pass with the activations consumer (exact moments + top-k with contexts);
  rows   - turning the accumulators into activation_stats / top_examples rows (once, at the end).
Ratio = ingest tokens/s / bare tokens/s. Each batch is timed twice in the same pass, seconds apart: its
ingest work (fetch, forward with capture, statistics), then a bare forward of the same batch. On a shared
machine whose speed drifts from minute to minute both timings of a batch see the same machine. The pass
runs --repeats times and each batch counts with its fastest time of each kind (the work of batch i is the
same in every repeat): a neighbour's burst slows some batches of one repeat, not all. The top-k
examples fill up over the first batches (every neuron's top-k changes in every batch at first, a few per
batch later), so the ratio over the second half of the batches is printed too: a job over millions of
tokens runs at that one. Peak memory is the process's max RSS after each stage.

    python bench/activations.py --tokens 65536 --layers 6 --d-model 384 --d-mlp 1536 --batch-size 16
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--ctx", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--d-model", type=int, default=384)
    parser.add_argument("--d-mlp", type=int, default=1536)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--repeats", type=int, default=3, help="paired passes (each batch: ingest, then a bare forward); each batch's fastest counts")
    return parser.parse_args()


def reset_peak_rss() -> float:
    """Restart the kernel's count of this process's peak resident memory (Linux: /proc/self/clear_refs), so
    that a later peak belongs to what ran since; returns the resident MiB now (ru_maxrss elsewhere)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _proc_status_mib("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_mib() -> float:
    """The peak resident MiB since the last reset_peak_rss (since start where it cannot reset)."""
    try:
        return _proc_status_mib("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _proc_status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise OSError(f"/proc/self/status has no {field}")


def build_model(directory: Path, args: argparse.Namespace) -> Path:
    from transformers import AutoModelForCausalLM, GPT2Config

    from tests.tiny import build_tokenizer

    tokenizer = build_tokenizer(directory)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=max(args.ctx, 128), n_embd=args.d_model,
                        n_layer=args.layers, n_head=max(1, args.d_model // 64), n_inner=args.d_mlp,
                        bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    return directory


def model_and_tokens(args: argparse.Namespace, name: str):
    """The seeded random GPT-2 of `args` (loaded) and --tokens tokens of builtin:docstrings for it,
    in a fresh temporary cache; shared by the benchmarks so they measure the same setup."""
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    os.environ.setdefault("ATLAS_CACHE_DIR", str(work / "cache"))

    from atlas.data import TokenizedDataset, iter_documents
    from atlas.data.sources import DOCSTRINGS_SOURCE, source_fingerprint
    from atlas.modeling import load_model

    loaded = load_model(str(build_model(work / "model", args)))
    tokens = TokenizedDataset.build(iter_documents(DOCSTRINGS_SOURCE), loaded.tokenizer, args.tokens, args.ctx,
                                    dataset_key=source_fingerprint(DOCSTRINGS_SOURCE))
    return loaded, tokens


class PairedBare:
    """A consumer after the statistics: notes the batch's ingest time (since the previous batch's bare forward
    ended), then times a bare forward of the same batch."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.ingest, self.bare = model, [], []
        self.mark = time.perf_counter()

    def consume(self, step) -> None:
        ingest_done = time.perf_counter()
        self.ingest.append(ingest_done - self.mark)
        with torch.inference_mode():
            self.model(input_ids=step.batch.input_ids, attention_mask=step.batch.attention_mask)
        self.mark = time.perf_counter()
        self.bare.append(self.mark - ingest_done)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state) -> None:
        pass


def main() -> None:
    args = parse_args()
    from ingest.activations import ActivationStatsConsumer, ActivationsConfig, _model_results
    from ingest.family_pass import PassModel, run_family_pass

    loaded, tokens = model_and_tokens(args, "activations")
    batches = list(tokens.batches(args.batch_size))
    n_tokens = sum(int(b.lengths.sum()) for b in batches)
    n_layers, d_mlp = loaded.adapter.n_layers(loaded.model), loaded.adapter.d_mlp(loaded.model)
    print(f"model: GPT-2 {n_layers} layers, d_model {args.d_model}, d_mlp {d_mlp} ({n_layers * d_mlp} neurons); "
          f"{n_tokens} tokens in {len(batches)} batches of {args.batch_size} rows x ctx {args.ctx}; "
          f"{torch.get_num_threads()} threads")
    rss_start = peak_rss_mib()

    def bare_pass() -> None:
        with torch.inference_mode():
            for batch in batches:
                loaded.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)

    def paired_pass() -> tuple[list[float], list[float], ActivationStatsConsumer]:
        """Each batch's ingest time and its bare forward's time, taken one after the other."""
        consumer = ActivationStatsConsumer({0: (n_layers, d_mlp)}, args.top_k, 24, 4)
        paired = PairedBare(loaded.model)
        run_family_pass([PassModel(0, loaded)], tokens, {"stats": consumer, "bare": paired},
                        batch_size=args.batch_size, n_rows=tokens.n_rows, label="ingest pass")
        return paired.bare, paired.ingest, consumer

    bare_pass()  # warm-up, and the peak of bare forwards alone
    rss_bare = peak_rss_mib()
    half = slice(len(batches) // 2, None)
    bare_runs, ingest_runs = [], []
    for repeat in range(args.repeats):
        bare_times, times, consumer = paired_pass()
        bare_runs.append(bare_times)
        ingest_runs.append(times)
        rss_ingest = peak_rss_mib()
        print(f"repeat {repeat + 1}: bare {sum(bare_runs[-1]):.2f} s, ingest {sum(times):.2f} s, "
              f"ratio {sum(bare_runs[-1]) / sum(times):.2f}; second half {sum(bare_runs[-1][half]) / sum(times[half]):.2f}")
    bare_best, ingest_best = ([min(times) for times in zip(*runs)] for runs in (bare_runs, ingest_runs))
    bare, ingest = sum(bare_best), sum(ingest_best)
    bare_half, ingest_half = sum(bare_best[half]), sum(ingest_best[half])

    token_strings = [loaded.tokenizer.decode([i]) for i in range(len(loaded.tokenizer))]
    start = time.perf_counter()
    results = _model_results(consumer, SimpleNamespace(id=0, n_layers=n_layers, d_mlp=d_mlp), tokens, token_strings, ActivationsConfig(top_k=args.top_k))
    rows = time.perf_counter() - start
    n_examples = len(results.examples["rank"])

    print(f"bare forward : {n_tokens / bare:10,.0f} tokens/s ({bare:.2f} s)")
    print(f"ingest pass  : {n_tokens / ingest:10,.0f} tokens/s ({ingest:.2f} s)")
    print(f"ratio        : {bare / ingest:10.2f} (ingest speed / bare forward speed; each batch's fastest of {args.repeats}, "
          f"bare and ingest of a batch timed one after the other)")
    print(f"second half  : {bare_half / ingest_half:10.2f} (the same over batches {half.start + 1}-{len(batches)}, "
          f"the top-k filled)")
    print(f"rows         : {rows:10.2f} s for {n_layers * d_mlp} stats + {n_examples} top examples")
    print(f"peak RSS MiB : start {rss_start:.0f}, after bare {rss_bare:.0f}, after ingest {rss_ingest:.0f}, "
          f"after rows {peak_rss_mib():.0f}")


if __name__ == "__main__":
    main()
