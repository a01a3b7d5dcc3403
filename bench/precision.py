"""Benchmark: what each precision of the correlation product costs, against float64.

Two sets of activations, each a family of seeds on the same token positions:
  family    - the MLP activations of real models (--models DIR DIR ...: e.g. the seeds `atlas demo` trains,
              atlas-models/<family>/seed-S; default: three randomly initialised GPT-2 built here) over
              --tokens tokens of builtin:docstrings, special tokens left out as the job does;
  synthetic - random activations with GPT-2-like statistics: shared latent factors through a GELU,
              heavy-tailed noise (Student t, 3 degrees of freedom) and per-neuron offsets up to 10x the
              neuron's std (the case the accumulator's shift exists for).
For every precision, every unordered pair of seeds is accumulated exactly as the correlations job does
(CorrelationAccumulator, both directions, rotation baselines from per-layer covariances) and compared
with the float64 run: max |d rho| over all neuron pairs, max |d max_corr|, max |d baseline|, partners
changed, and neurons whose universal label (excess correlation over the other seeds) flips at 0.5 and
at 0.3. Seconds are the accumulation time on --device.

    python bench/precision.py                                  # random GPT-2s + synthetic
    python bench/precision.py --models atlas-models/docs-gpt2/seed-{0,1,2} --tokens 50000
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from atlas.metrics.correlation import (  # noqa: E402  (after the path set-up, as the other benchmarks)
    PRECISIONS,
    CorrelationAccumulator,
    TransposedView,
    max_correlations,
    rotated_baseline_max,
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", default=[], help="model directories of one family (2 or more seeds)")
    parser.add_argument("--tokens", type=int, default=20000, help="tokens of builtin:docstrings for the family")
    parser.add_argument("--ctx", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16, help="rows per batch of the family's forward passes")
    parser.add_argument("--synthetic-tokens", type=int, default=20000)
    parser.add_argument("--synthetic-layers", type=int, default=4)
    parser.add_argument("--synthetic-d-mlp", type=int, default=256)
    parser.add_argument("--update-rows", type=int, default=2048, help="positions per accumulator update")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--seed", type=int, default=0, help="baseline rotation seed")
    return parser.parse_args()


@dataclass
class Family:
    name: str
    activations: list[torch.Tensor]  # per seed [positions, n_layers * d_mlp], float32
    d_mlp: int


# -- activations ----------------------------------------------------------------------------------

def random_gpt2_family(root: Path, seeds: int = 3) -> list[Path]:
    from transformers import AutoModelForCausalLM, GPT2Config

    from tests.tiny import build_tokenizer

    directories = []
    for seed in range(seeds):
        directory = root / f"gpt2-seed{seed}"
        tokenizer = build_tokenizer(directory)
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=128, n_layer=2, n_head=4, n_inner=512,
                            bos_token_id=0, eos_token_id=0)
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(config).save_pretrained(directory)
        directories.append(directory)
    return directories


def family_activations(directories: list[Path], args: argparse.Namespace) -> Family:
    from atlas.data import TokenizedDataset, iter_documents
    from atlas.data.sources import DOCSTRINGS_SOURCE, source_fingerprint
    from atlas.modeling import load_model
    from ingest.family_pass import model_activations

    loaded = [load_model(str(directory)) for directory in directories]
    tokens = TokenizedDataset.build(iter_documents(DOCSTRINGS_SOURCE), loaded[0].tokenizer, args.tokens, args.ctx,
                                    dataset_key=source_fingerprint(DOCSTRINGS_SOURCE))
    per_seed: list[list[torch.Tensor]] = [[] for _ in loaded]
    with torch.inference_mode():
        for batch in tokens.batches(args.batch_size):
            for index, model in enumerate(loaded):
                per_seed[index].append(model_activations(model, batch, torch.device("cpu"))[batch.stat_mask])
    d_mlp = loaded[0].adapter.d_mlp(loaded[0].model)
    return Family(f"family ({len(loaded)} seeds, {Path(directories[0]).parent.name or 'models'})",
                  [torch.cat(parts) for parts in per_seed], d_mlp)


def synthetic_family(args: argparse.Namespace, seeds: int = 3) -> Family:
    generator = np.random.default_rng(0)
    n, width = args.synthetic_tokens, args.synthetic_layers * args.synthetic_d_mlp
    latent = generator.standard_normal((n, 64))
    activations = []
    for _ in range(seeds):
        mixed = latent @ generator.standard_normal((64, width)) / 8 + generator.standard_t(3, (n, width)) * 0.5
        gelu = torch.nn.functional.gelu(torch.from_numpy(mixed)).numpy()
        offsets = generator.uniform(-10, 10, width) * gelu.std(axis=0)
        activations.append(torch.from_numpy((gelu + offsets).astype(np.float32)))
    return Family(f"synthetic ({seeds} seeds, GPT-2-like)", activations, args.synthetic_d_mlp)


# -- one precision --------------------------------------------------------------------------------

def layer_covariances(x: torch.Tensor, d_mlp: int, precision: str, rows: int, device) -> list[np.ndarray]:
    n_layers = x.shape[1] // d_mlp
    accumulator = CorrelationAccumulator(0, [d_mlp] * n_layers, track_gram=True, precision=precision, device=device)
    for start in range(0, x.shape[0], rows):
        chunk = x[start:start + rows].to(device)
        accumulator.update(chunk[:, :0], chunk)
    return [accumulator.layer_covariance(layer) for layer in range(n_layers)]


def run_precision(family: Family, precision: str, args: argparse.Namespace, device) -> dict:
    """Per seed: the max_corr, partner and baseline against each other seed; rho of every pair."""
    d_mlp, rows = family.d_mlp, args.update_rows
    n_layers = family.activations[0].shape[1] // d_mlp
    start = time.perf_counter()
    covariances = [layer_covariances(x, d_mlp, precision, rows, device) for x in family.activations]
    results: dict = {"max": {}, "partner": {}, "baseline": {}, "rho": {}}
    for a, b in itertools.combinations(range(len(family.activations)), 2):
        accumulator = CorrelationAccumulator(family.activations[a].shape[1], [d_mlp] * n_layers, track_gram=False,
                                             precision=precision, device=device)
        for offset in range(0, family.activations[a].shape[0], rows):
            accumulator.update(family.activations[a][offset:offset + rows].to(device),
                               family.activations[b][offset:offset + rows].to(device))
        results["rho"][a, b] = accumulator.correlations()
        for source, other, (i, j) in ((accumulator, covariances[b], (a, b)),
                                      (TransposedView(accumulator, [d_mlp] * n_layers, range(n_layers)),
                                       covariances[a], (b, a))):
            best, partner = max_correlations(source)
            results["max"][i, j], results["partner"][i, j] = best, partner
            results["baseline"][i, j] = rotated_baseline_max(source, args.seed, layer_covariances=other)[0]
    results["seconds"] = time.perf_counter() - start
    return results


def excess(results: dict, seeds: int) -> dict[int, np.ndarray]:
    return {a: np.mean([results["max"][a, b] for b in range(seeds) if b != a], axis=0)
            - np.mean([results["baseline"][a, b] for b in range(seeds) if b != a], axis=0) for a in range(seeds)}


def compare(reference: dict, other: dict, seeds: int) -> dict:
    def worst(name: str) -> float:
        return max(float(np.nanmax(np.abs(other[name][key] - reference[name][key]))) for key in reference[name])

    flips = {threshold: sum(int(((excess(other, seeds)[a] > threshold) != (excess(reference, seeds)[a] > threshold)).sum())
                            for a in range(seeds)) for threshold in (0.5, 0.3)}
    changed = sum(int((other["partner"][key] != reference["partner"][key]).sum()) for key in reference["partner"])
    return {"rho": worst("rho"), "max": worst("max"), "baseline": worst("baseline"), "partners": changed,
            "flips05": flips[0.5], "flips03": flips[0.3], "seconds": other["seconds"]}


# -- the table ------------------------------------------------------------------------------------

def report(family: Family, args: argparse.Namespace, device) -> None:
    seeds = len(family.activations)
    n_positions, width = family.activations[0].shape
    print(f"\n{family.name}: {n_positions:,} positions x {width:,} neurons per seed, device {device}")
    reference = run_precision(family, "float64", args, device)
    print(f"{'precision':<10} {'max|d rho|':>11} {'max|d max_corr|':>16} {'max|d baseline|':>16} "
          f"{'partners changed':>17} {'flips @0.5':>11} {'flips @0.3':>11} {'seconds':>8}")
    for precision in PRECISIONS:
        row = compare(reference, reference if precision == "float64" else run_precision(family, precision, args, device),
                      seeds)
        print(f"{precision:<10} {row['rho']:>11.1e} {row['max']:>16.1e} {row['baseline']:>16.1e} "
              f"{row['partners']:>17,} {row['flips05']:>11,} {row['flips03']:>11,} {row['seconds']:>8.2f}")


def main() -> None:
    args = parse_args()
    from atlas.devices import resolve_device

    device = resolve_device(args.device)
    work = Path(tempfile.mkdtemp(prefix="bench-precision-"))
    os.environ.setdefault("ATLAS_CACHE_DIR", str(work / "cache"))
    directories = [Path(d) for d in args.models] or random_gpt2_family(work)
    if len(directories) < 2:
        raise SystemExit("--models needs two seeds or more")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; float64 is the reference")
    report(family_activations(directories, args), args, device)
    report(synthetic_family(args), args, device)


if __name__ == "__main__":
    main()
