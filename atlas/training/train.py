"""Train one seed of a GPT-2 family, on the CPU or a GPU (`device`).

The seed sets exactly two things: the initial weights (torch.manual_seed) and the order in which
the shared training rows are visited. Everything else (data, tokenizer, hyper-parameters) is the
family's. On CPU the same seed gives bit-identical weights, as long as the wall-clock cap does not
bind (see `lr_at`). The initial weights are drawn on the CPU whatever the device, so a seed starts
from the same weights everywhere; on a GPU the kernels round differently from the CPU's and some
are not deterministic, so a seed trained there ends close to, not equal to, its CPU twin and need
not repeat bit for bit. Models are saved from CPU tensors on every device.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerBase

from atlas.devices import resolve_device
from atlas.errors import AtlasError

ProgressCallback = Callable[[int, int, float], None]  # (step done, total steps, train loss)


@dataclass(frozen=True)
class TrainConfig:
    """Hyper-parameters of a seed family; defaults are the 2-core CPU demo recipe."""

    layers: int = 2
    d_model: int = 128
    d_mlp: int = 512            # n_inner: deliberately not tied to 4 * d_model
    n_heads: int = 4
    ctx: int = 128
    steps: int = 1000           # ~117 s per seed at the 17.5k tokens/s measured on 2 idle cores
    batch_size: int = 16
    lr: float = 3e-3
    min_lr_ratio: float = 0.1   # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 60
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    dropout: float = 0.0        # tiny models trained for ~1 epoch do not overfit
    bf16: bool = True           # bf16 autocast where the device has it natively (see native_bf16)
    attention: str = "eager"    # eager beat sdpa on this CPU
    max_seconds: float | None = None   # optional wall-clock cap per seed (unequal steps: avoid for studies)
    heldout_tokens: int = 16_384       # held-out tokens per evaluation
    eval_every: int = 200
    checkpoints: tuple[int, ...] = ()  # steps (< steps) at which a copy is saved to out_dir/step-N


@dataclass
class TrainResult:
    seed: int
    steps_done: int
    final_train_loss: float           # mean over the steps since the last evaluation
    heldout_loss: float
    curve: list[tuple[int, float, float | None]] = field(default_factory=list)
    seconds: float = 0.0              # whole call, evaluations and saving included
    tokens_per_second: float = 0.0    # training steps only
    hit_time_cap: bool = False
    device: str = "cpu"               # the torch device it trained on (resolved: never "auto")
    bf16_autocast: bool = False       # whether it trained under bf16 autocast (config.bf16 and native_bf16)


def native_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast runs natively on the device. A CPU needs AVX512-BF16 or AMX: elsewhere oneDNN
    emulates it, and a training step of the demo's model took 3.7 s under bf16 autocast against 0.34 s in
    float32 (one thread, an AMD EPYC with AVX2 only), while CPUs with native bf16 ran it 1.6-1.8x faster
    than float32. A GPU needs bf16 support (Ampere or later); mps trains in float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def build_model(config: TrainConfig, vocab_size: int, special_id: int, seed: int) -> GPT2LMHeadModel:
    """A freshly initialised GPT-2 on the CPU whose weights depend only on `seed`."""
    model_config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=config.ctx,
        n_embd=config.d_model,
        n_layer=config.layers,
        n_head=config.n_heads,
        n_inner=config.d_mlp,
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        bos_token_id=special_id,
        eos_token_id=special_id,
        pad_token_id=special_id,
        attn_implementation=config.attention,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(model_config)


def lr_at(config: TrainConfig, step: int, elapsed: float) -> float:
    """Linear warmup over steps, then cosine to lr * min_lr_ratio.

    Under a wall-clock cap the cosine follows whichever is further along, the step count or the
    elapsed share of max_seconds, so a run that falls behind its time budget still anneals before
    the cap stops it. While the run keeps pace (the normal case) the schedule depends on the step
    alone and training is reproducible.
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    position = float(step)
    if config.max_seconds:
        position = max(position, config.steps * elapsed / config.max_seconds)
    progress = min(1.0, (position - config.warmup_steps) / max(1, config.steps - config.warmup_steps))
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.lr * (config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine)


def batch_order(n_rows: int, batch_size: int, seed: int) -> Iterator[np.ndarray]:
    """Row indices batch by batch: a fresh seed-dependent permutation per epoch."""
    rng = np.random.default_rng(seed)
    while True:
        permutation = rng.permutation(n_rows)
        for start in range(0, n_rows - batch_size + 1, batch_size):
            yield permutation[start : start + batch_size]


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases and norm scales)."""
    decayed = [p for p in model.parameters() if p.dim() >= 2]
    plain = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decayed, "weight_decay": config.weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


def heldout_loss(model: GPT2LMHeadModel, rows: torch.Tensor, config: TrainConfig) -> float:
    """Mean next-token loss over the held-out rows (every row has ctx - 1 targets)."""
    model.eval()
    total = 0.0
    with torch.no_grad(), torch.autocast(rows.device.type, dtype=torch.bfloat16, enabled=config.bf16):
        for start in range(0, len(rows), config.batch_size):
            batch = rows[start : start + config.batch_size]
            total += model(input_ids=batch, labels=batch).loss.float().item() * len(batch)
    model.train()
    return total / len(rows)


def check_rows(rows: np.ndarray, config: TrainConfig, vocab_size: int, name: str) -> None:
    if rows.ndim != 2 or rows.shape[1] != config.ctx:
        raise AtlasError(f"{name} must have shape [n, ctx={config.ctx}], got {tuple(rows.shape)}")
    if rows.size and (rows.min() < 0 or rows.max() >= vocab_size):
        raise AtlasError(f"{name} hold token ids outside the tokenizer's {vocab_size} tokens")


def check_inputs(
    config: TrainConfig, train_rows: np.ndarray, heldout_rows: np.ndarray, vocab_size: int
) -> None:
    if config.max_seconds is not None and config.max_seconds <= 0:
        raise AtlasError(f"max_seconds must be positive or None, got {config.max_seconds}")
    check_rows(train_rows, config, vocab_size, "train_rows")
    check_rows(heldout_rows, config, vocab_size, "heldout_rows")
    if len(train_rows) < config.batch_size:
        raise AtlasError(
            f"{len(train_rows)} training rows are fewer than batch_size {config.batch_size}; "
            "provide more text or lower batch_size"
        )
    if len(heldout_rows) == 0:
        raise AtlasError("heldout_rows is empty; provide held-out text")


def train_seed(
    config: TrainConfig,
    seed: int,
    train_rows: np.ndarray,
    heldout_rows: np.ndarray,
    out_dir: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    progress: ProgressCallback | None = None,
    device: str | torch.device = "cpu",
) -> TrainResult:
    """Train one seed on `device` (auto, cpu, cuda, cuda:N or mps; see atlas.devices.resolve_device)
    and save model, tokenizer and training.json to out_dir."""
    started = time.perf_counter()
    device = resolve_device(str(device))
    config = replace(config, bf16=config.bf16 and native_bf16(device))  # what ran is what training.json says
    vocab_size = len(tokenizer)
    check_inputs(config, train_rows, heldout_rows, vocab_size)
    n_eval_rows = max(1, math.ceil(config.heldout_tokens / config.ctx))
    eval_rows = torch.from_numpy(np.ascontiguousarray(heldout_rows[:n_eval_rows], dtype=np.int64)).to(device)
    train_tensor = torch.from_numpy(np.ascontiguousarray(train_rows, dtype=np.int64))  # batches move one by one

    model = build_model(config, vocab_size, tokenizer.eos_token_id, seed).to(device)
    model.train()
    optimizer = make_optimizer(model, config)
    batches = batch_order(len(train_tensor), config.batch_size, seed)

    curve: list[tuple[int, float, float | None]] = []
    window_losses: list[float] = []
    training_seconds = 0.0
    hit_cap = False
    step = 0
    loop_started = time.perf_counter()
    while step < config.steps:
        elapsed = time.perf_counter() - loop_started
        if config.max_seconds is not None and elapsed >= config.max_seconds:
            hit_cap = True
            break
        step_started = time.perf_counter()
        loss = train_step(model, optimizer, train_tensor[next(batches)].to(device), config, step, elapsed)
        training_seconds += time.perf_counter() - step_started
        window_losses.append(loss)
        step += 1
        if progress is not None:
            progress(step, config.steps, loss)
        if step in config.checkpoints and step < config.steps:
            save_checkpoint(model, tokenizer, config, step, Path(out_dir), str(device))
        if step % config.eval_every == 0 and step < config.steps:
            curve.append((step, float(np.mean(window_losses)), heldout_loss(model, eval_rows, config)))
            window_losses = []

    final_train = float(np.mean(window_losses)) if window_losses else curve[-1][1]
    final_heldout = heldout_loss(model, eval_rows, config)
    if window_losses:
        curve.append((step, final_train, final_heldout))
    tokens = step * config.batch_size * config.ctx
    result = TrainResult(
        seed=seed,
        steps_done=step,
        final_train_loss=final_train,
        heldout_loss=final_heldout,
        curve=curve,
        tokens_per_second=tokens / training_seconds if training_seconds else 0.0,
        hit_time_cap=hit_cap,
        device=str(device),
        bf16_autocast=config.bf16,
    )
    save_seed(model, tokenizer, config, result, Path(out_dir))
    result.seconds = time.perf_counter() - started
    return result


def train_step(
    model: GPT2LMHeadModel,
    optimizer: torch.optim.Optimizer,
    batch: torch.Tensor,
    config: TrainConfig,
    step: int,
    elapsed: float,
) -> float:
    learning_rate = lr_at(config, step, elapsed)
    for group in optimizer.param_groups:
        group["lr"] = learning_rate
    with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=config.bf16):
        loss = model(input_ids=batch, labels=batch).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
    optimizer.step()
    return loss.item()


def checkpoint_dir(out_dir: str | Path, step: int) -> Path:
    return Path(out_dir) / f"step-{step}"


def on_cpu(model: GPT2LMHeadModel) -> GPT2LMHeadModel:
    """The model itself when it is on the CPU, else a CPU copy (tied weights stay tied) to save from, so
    checkpoints and final models are written from CPU tensors whatever the training device."""
    if next(model.parameters()).device.type == "cpu":
        return model
    return copy.deepcopy(model).to("cpu")


def save_checkpoint(model: GPT2LMHeadModel, tokenizer: PreTrainedTokenizerBase, config: TrainConfig, step: int,
                    out_dir: Path, device: str = "cpu") -> None:
    """The model as it is after `step` optimizer steps, loadable on its own (universality over training)."""
    target = checkpoint_dir(out_dir, step)
    target.mkdir(parents=True, exist_ok=True)
    on_cpu(model).save_pretrained(target)
    tokenizer.save_pretrained(target)
    record = {"config": asdict(config), "step": step, "device": device}
    (target / "training.json").write_text(json.dumps(record, indent=2))


def save_seed(
    model: GPT2LMHeadModel,
    tokenizer: PreTrainedTokenizerBase,
    config: TrainConfig,
    result: TrainResult,
    out_dir: Path,
) -> None:
    """save_pretrained for model and tokenizer, plus the recipe and result that made them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    on_cpu(model).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    record = {"config": asdict(config), "result": asdict(result)}
    (out_dir / "training.json").write_text(json.dumps(record, indent=2))
