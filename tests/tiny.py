"""Tiny real models for tests: a byte-level BPE tokenizer trained on stdlib docstrings, and one small
randomly initialised model per architecture, built from its config with a fixed seed and saved with
save_pretrained next to the tokenizer. Nothing is downloaded.

d_mlp is never 4 * d_model, so code that assumes it fails here.
"""

from __future__ import annotations

import ast
import json
import sysconfig
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PhiConfig,
    Qwen2Config,
    PretrainedConfig,
)

from atlas.training.tokenizer import END_OF_TEXT, train_bpe_tokenizer

TOKENIZER_VOCAB = 512
D_MODEL = 48
D_MLP = 96                      # not 4 * D_MODEL on purpose
N_HEADS = 4
CONTEXT = 256
NEOX_PADDED_VOCAB = 576         # Pythia-style: embedding rows beyond the tokenizer's vocabulary
# Standard-library modules whose docstrings are the tokenizer's training text, in this order.
DOCSTRING_MODULES = (
    "argparse.py", "collections/__init__.py", "dataclasses.py", "difflib.py", "email/message.py",
    "inspect.py", "json/__init__.py", "logging/__init__.py", "functools.py", "pydoc.py", "shutil.py",
    "subprocess.py", "tarfile.py", "textwrap.py", "threading.py", "typing.py", "unittest/case.py",
    "urllib/request.py", "zipfile.py", "_pydecimal.py", "asyncio/events.py", "socket.py", "tempfile.py",
)
ARCHITECTURES = ("gpt2", "neox", "llama", "phi")  # the tiny_models fixture
LLAMA_RELATIVES = ("mistral", "qwen2")          # read by the llama adapter


def docstring_texts() -> list[str]:
    """Module, class and function docstrings of DOCSTRING_MODULES, in a fixed order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = []
    for relative in DOCSTRING_MODULES:
        tree = ast.parse((stdlib / relative).read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                docstring = ast.get_docstring(node)
                if docstring:
                    texts.append(docstring)
    return texts


def write_docs_jsonl(path: Path, limit: int | None = None) -> Path:
    """The non-empty docstrings (the first `limit` of them) as a .jsonl text dataset, one {"text": ...} per line."""
    texts = docstring_texts()[:limit]
    path.write_text("".join(json.dumps({"text": t.strip()}) + "\n" for t in texts if t.strip()))
    return path


def build_tokenizer(directory: str | Path, vocab_size: int = TOKENIZER_VOCAB):
    """Train the byte-level BPE (<|endoftext|> = id 0 = BOS/EOS/pad) and save it to `directory`."""
    return train_bpe_tokenizer(docstring_texts(), vocab_size, directory)


def _gpt2(vocab: int, special: int, **overrides: Any) -> PretrainedConfig:
    options = dict(vocab_size=vocab, n_positions=CONTEXT, n_embd=D_MODEL, n_layer=3, n_head=N_HEADS,
                   n_inner=D_MLP, bos_token_id=special, eos_token_id=special)
    return GPT2Config(**{**options, **overrides})


def _neox(vocab: int, special: int, **overrides: Any) -> PretrainedConfig:
    options = dict(vocab_size=NEOX_PADDED_VOCAB, hidden_size=D_MODEL, num_hidden_layers=2,
                   num_attention_heads=N_HEADS, intermediate_size=D_MLP, rotary_pct=0.25,
                   use_parallel_residual=True, max_position_embeddings=CONTEXT, tie_word_embeddings=False,
                   bos_token_id=special, eos_token_id=special)
    return GPTNeoXConfig(**{**options, **overrides})


def _llama(vocab: int, special: int, **overrides: Any) -> PretrainedConfig:
    options = dict(vocab_size=vocab, hidden_size=D_MODEL, num_hidden_layers=2, num_attention_heads=N_HEADS,
                   num_key_value_heads=2, intermediate_size=D_MLP, max_position_embeddings=CONTEXT,
                   tie_word_embeddings=False, bos_token_id=special, eos_token_id=special, pad_token_id=special)
    return LlamaConfig(**{**options, **overrides})


def _mistral(vocab: int, special: int, **overrides: Any) -> PretrainedConfig:
    options = dict(vocab_size=vocab, hidden_size=D_MODEL, num_hidden_layers=2, num_attention_heads=N_HEADS,
                   num_key_value_heads=2, intermediate_size=D_MLP, max_position_embeddings=CONTEXT,
                   sliding_window=None, bos_token_id=special, eos_token_id=special, pad_token_id=special)
    return MistralConfig(**{**options, **overrides})


def _phi(vocab: int, special: int, **overrides: Any) -> PretrainedConfig:
    options = dict(vocab_size=vocab, hidden_size=D_MODEL, num_hidden_layers=2, num_attention_heads=N_HEADS,
                   intermediate_size=D_MLP, partial_rotary_factor=0.5, max_position_embeddings=CONTEXT,
                   tie_word_embeddings=False, bos_token_id=special, eos_token_id=special, pad_token_id=special)
    return PhiConfig(**{**options, **overrides})


def _qwen2(vocab: int, special: int, **overrides: Any) -> PretrainedConfig:
    options = dict(vocab_size=vocab, hidden_size=D_MODEL, num_hidden_layers=2, num_attention_heads=N_HEADS,
                   num_key_value_heads=2, intermediate_size=D_MLP, max_position_embeddings=CONTEXT,
                   tie_word_embeddings=False, bos_token_id=special, eos_token_id=special, pad_token_id=special)
    return Qwen2Config(**{**options, **overrides})


CONFIGS: dict[str, Callable[..., PretrainedConfig]] = {
    "gpt2": _gpt2, "neox": _neox, "llama": _llama, "phi": _phi, "mistral": _mistral, "qwen2": _qwen2,
}


def _spread_norms_and_biases(model: torch.nn.Module, generator: torch.Generator) -> None:
    """Hugging Face initialises norm scales to 1 and biases to 0; perturb them so that tests of
    gamma folding, biases and centring cannot pass by accident."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if name.endswith("bias"):
                parameter.add_(0.1 * noise)
            elif parameter.ndim == 1:  # LayerNorm / RMSNorm scales
                parameter.add_(0.2 * noise)


def build_tiny_model(
    arch: str, directory: str | Path, seed: int = 0, tokenizer_dir: str | Path | None = None, **overrides: Any
) -> Path:
    """A tiny `arch` model initialised with torch.manual_seed(seed), saved with its tokenizer to `directory`.

    The tokenizer comes from `tokenizer_dir` (copied) or is trained into `directory`.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is None:
        tokenizer = build_tokenizer(directory)
    else:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        tokenizer.save_pretrained(directory)
    special = tokenizer.convert_tokens_to_ids(END_OF_TEXT)
    config = CONFIGS[arch](len(tokenizer), special, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    _spread_norms_and_biases(model, torch.Generator().manual_seed(seed))
    model.save_pretrained(directory)
    return directory


def build_tiny_family(root: str | Path, tokenizer_dir: str | Path, seeds: range = range(4)) -> list[Path]:
    """Seed variants of the tiny GPT-2 (family "tiny"): same tokenizer and shape, different init."""
    return [build_tiny_model("gpt2", Path(root) / f"tiny-gpt2-seed{seed}", seed=seed, tokenizer_dir=tokenizer_dir)
            for seed in seeds]


def train_briefly(directory: str | Path, target: str | Path, steps: int = 40, ctx: int = 64, batch_size: int = 8,
                  lr: float = 3e-3, seed: int = 0) -> Path:
    """Train the model in `directory` for a few AdamW steps on docstring text and save it to `target`.

    A random model predicts nothing (accuracy 0), which leaves accuracy ratios undefined; a few
    steps teach it the frequent tokens, so that accuracies, their ratios and agreements are real numbers.
    """
    tokenizer = AutoTokenizer.from_pretrained(directory)
    ids = [i for text in docstring_texts() for i in tokenizer(text)["input_ids"] + [tokenizer.eos_token_id]]
    n_rows = len(ids) // ctx
    rows = torch.tensor(ids[: n_rows * ctx]).reshape(n_rows, ctx)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    for step in range(steps):
        batch = rows[torch.randint(n_rows, (batch_size,))]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return Path(target)
