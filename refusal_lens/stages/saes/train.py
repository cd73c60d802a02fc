"""Training one SAE with SAE-Lens: its architectures, losses and ``SAETrainer``; nothing re-derived.

``sae.precision`` (:func:`resolve_precision`): in fp32 SAE-Lens leaves TF32 off on CUDA (3.7x slower
than with it on an H100, GPU.md); ``tf32`` turns TF32 matmuls on for the training loop only
(:func:`matmul_precision` restores the flags), ``bf16`` also passes ``autocast=True`` to the trainer.
On the CPU training stays plain fp32.

The loop below drives ``SAETrainer`` through its public seams (``step``, ``maybe_reset_sparsity``,
``set_final_sae_metadata``), the way SAE-Lens's own multi-SAE coordinator does, so that metrics can be
written to a local JSONL file every ``sae.log_every`` steps without wandb. SAE-Lens's checkpoints are
not used (they pickle the trainer state); an interrupted SAE restarts from scratch.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from refusal_lens.config import SAEConfig
from refusal_lens.errors import UserError

logger = logging.getLogger(__name__)


class SAEConfigError(UserError, ValueError):
    """An SAE setting that does not fit the activations (e.g. k larger than d_sae)."""


def check_sae_config(cfg: SAEConfig, d_in: int) -> None:
    """Settings that depend on the activations' width, checked before anything is trained or written."""
    d_sae = d_in * cfg.expansion_factor
    if cfg.architecture in ("topk", "batchtopk") and cfg.k > d_sae:
        raise SAEConfigError(
            f"sae.k={cfg.k} is larger than d_sae={d_sae} (d_in {d_in} x sae.expansion_factor "
            f"{cfg.expansion_factor}); allowed: 1..{d_sae}"
        )
    if cfg.training_tokens < cfg.train_batch_size_tokens:
        raise SAEConfigError(
            f"sae.training_tokens={cfg.training_tokens} is less than one batch (sae.train_batch_size_tokens="
            f"{cfg.train_batch_size_tokens})"
        )


@dataclass(frozen=True)
class Precision:
    """What ``sae.precision`` means on a device: the trainer's bf16 autocast and TF32 matmuls."""

    name: str  # fp32 | tf32 | bf16
    autocast: bool
    tf32: bool


def resolve_precision(precision: str, device: str) -> Precision:
    """``sae.precision`` on ``device``: ``auto`` = tf32 on CUDA, fp32 elsewhere; tf32/bf16 need CUDA."""
    on_cuda = torch.device(device).type == "cuda"
    name = ("tf32" if on_cuda else "fp32") if precision == "auto" else precision
    if name not in ("fp32", "tf32", "bf16"):
        raise SAEConfigError(f"sae.precision={precision!r}; allowed: auto, fp32, tf32, bf16")
    if name != "fp32" and not on_cuda:
        raise SAEConfigError(f"sae.precision={precision!r} needs a CUDA sae.device (got {device!r}); allowed: auto, fp32")
    return Precision(name, autocast=name == "bf16", tf32=name != "fp32")


@contextmanager
def matmul_precision(precision: Precision) -> Iterator[None]:
    """TF32 matmuls (CUDA matmul and cuDNN flags) inside the block when ``precision.tf32``; restored after."""
    if not precision.tf32:
        yield
        return
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def build_training_sae(cfg: SAEConfig, d_in: int, hook: str, model_name: str):
    """The SAE-Lens training SAE of ``cfg.architecture`` for activations of width ``d_in``."""
    from sae_lens import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        JumpReLUTrainingSAE,
        JumpReLUTrainingSAEConfig,
        StandardTrainingSAE,
        StandardTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    from sae_lens.saes.sae import SAEMetadata

    check_sae_config(cfg, d_in)
    d_sae = d_in * cfg.expansion_factor
    common = dict(
        d_in=d_in,
        d_sae=d_sae,
        dtype="float32",
        device=cfg.device,
        normalize_activations=cfg.normalize_activations,
        metadata=SAEMetadata(hook_name=hook, model_name=model_name, context_size=1, prepend_bos=False),
    )
    if cfg.architecture == "standard":
        return StandardTrainingSAE(StandardTrainingSAEConfig(l1_coefficient=cfg.l1_coefficient, **common))
    if cfg.architecture == "topk":
        return TopKTrainingSAE(TopKTrainingSAEConfig(k=cfg.k, **common))
    if cfg.architecture == "batchtopk":
        return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=float(cfg.k), **common))
    return JumpReLUTrainingSAE(
        JumpReLUTrainingSAEConfig(
            l0_coefficient=cfg.l0_coefficient,
            jumprelu_init_threshold=cfg.jumprelu_init_threshold,
            jumprelu_bandwidth=cfg.jumprelu_bandwidth,
            **common,
        )
    )


@torch.no_grad()
def _init_decoder_bias(sae, trainer, batches: Iterator[torch.Tensor], n_batches: int) -> None:
    """Start ``b_dec`` at the mean of the (scaled) training activations.

    Residual streams carry large constant offsets (Qwen's reach ~2000 in a few dimensions); from
    zero, Adam needs thousands of steps to learn them, far more than a small prompt set provides.
    """
    if not hasattr(sae, "b_dec"):
        return
    total = torch.zeros(sae.cfg.d_in)
    count = 0
    for _ in range(n_batches):
        batch = trainer.activation_scaler(next(batches).float())
        total += batch.sum(0)
        count += len(batch)
    sae.b_dec.data.copy_((total / count).to(sae.b_dec.device, sae.b_dec.dtype))


@dataclass
class TrainSummary:
    hook: str
    steps: int
    tokens_seen: int
    train_rows: int
    epochs: float
    final: dict


def _step_metrics(out, trainer, d_sae: int) -> dict:
    x, x_hat = out.sae_in.detach().float(), out.sae_out.detach().float()
    resid = ((x - x_hat) ** 2).sum()
    total = ((x - x.mean(0)) ** 2).sum()
    metrics = {
        "loss": float(out.loss.detach()),
        "mse": float(((x - x_hat) ** 2).sum(-1).mean()),
        "explained_variance": float(1 - resid / total) if total > 0 else float("nan"),
        "l0": float((out.feature_acts.detach() != 0).float().sum(-1).mean()),
        "dead_fraction": float(trainer.dead_neurons.float().sum() / d_sae),
    }
    for name, value in out.losses.items():
        metrics[f"loss_{name}"] = float(value.detach() if torch.is_tensor(value) else value)
    return metrics


def train_sae(
    sae,
    batches: Iterator[torch.Tensor],
    cfg: SAEConfig,
    *,
    train_rows: int,
    log_path: Path,
    show_progress: bool = True,
) -> TrainSummary:
    """Train ``sae`` on ``cfg.training_tokens`` vectors from ``batches``; metrics go to ``log_path``."""
    from sae_lens import LoggingConfig
    from sae_lens.config import SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    hook = sae.cfg.metadata.hook_name
    precision = resolve_precision(cfg.precision, cfg.device)
    total = cfg.training_tokens
    steps = math.ceil(total / cfg.train_batch_size_tokens)  # the trainer stops once `total` vectors are seen
    trainer_cfg = SAETrainerConfig(
        total_training_samples=total,
        train_batch_size_samples=cfg.train_batch_size_tokens,
        lr=cfg.lr,
        lr_end=cfg.lr_end if cfg.lr_end is not None else cfg.lr / 10,
        lr_scheduler_name="constant",
        lr_warm_up_steps=cfg.lr_warm_up_steps,
        lr_decay_steps=min(cfg.lr_decay_steps, steps),
        device=cfg.device,
        autocast=precision.autocast,
        dead_feature_window=cfg.dead_feature_window,
        feature_sampling_window=max(steps, 1),
        logger=LoggingConfig(log_to_wandb=False),
        n_batches_for_norm_estimate=min(100, max(1, train_rows // cfg.train_batch_size_tokens)),
    )
    trainer = SAETrainer(trainer_cfg, sae, data_provider=batches)
    sae.to(cfg.device)
    if cfg.normalize_activations == "expected_average_only_in":
        trainer.activation_scaler.estimate_scaling_factor(
            d_in=sae.cfg.d_in, data_provider=batches, n_batches_for_norm_estimate=trainer_cfg.n_batches_for_norm_estimate
        )
    _init_decoder_bias(sae, trainer, batches, trainer_cfg.n_batches_for_norm_estimate)
    wandb_run = None
    if cfg.wandb:
        import wandb

        wandb_run = wandb.init(project=cfg.wandb_project, name=hook, reinit=True)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    metrics: dict = {}
    logger.info("%s: training in %s (sae.precision=%s) on %s", hook, precision.name, cfg.precision, cfg.device)
    with log_path.open("w") as log, matmul_precision(precision), \
            tqdm(total=steps, desc=f"sae {hook}", unit="step", disable=not show_progress) as bar:
        while trainer.n_training_samples < total:
            trainer.maybe_reset_sparsity()
            out = trainer.step(next(batches))
            trainer.n_training_steps += 1
            bar.update(1)
            if trainer.n_training_steps % cfg.log_every == 0 or trainer.n_training_samples >= total:
                metrics = {"step": trainer.n_training_steps, "tokens": trainer.n_training_samples,
                           "lr": trainer.optimizer.param_groups[0]["lr"], **_step_metrics(out, trainer, sae.cfg.d_sae)}
                log.write(json.dumps(metrics) + "\n")
                log.flush()
                bar.set_postfix(mse=f"{metrics['mse']:.3g}", ev=f"{metrics['explained_variance']:.3f}",
                                l0=f"{metrics['l0']:.1f}")
                if wandb_run is not None:
                    wandb_run.log(metrics, step=trainer.n_training_steps)
    if trainer.activation_scaler.scaling_factor is not None:
        sae.fold_activation_norm_scaling_factor(trainer.activation_scaler.scaling_factor)
        trainer.activation_scaler.scaling_factor = None
    trainer.set_final_sae_metadata()
    if wandb_run is not None:
        wandb_run.finish()
    epochs = trainer.n_training_samples / max(train_rows, 1)
    logger.info("%s: %d steps, %d tokens seen = %.1f epochs of %d training rows", hook, trainer.n_training_steps,
                trainer.n_training_samples, epochs, train_rows)
    return TrainSummary(hook, trainer.n_training_steps, trainer.n_training_samples, train_rows,
                        round(epochs, 3) if math.isfinite(epochs) else 0.0, metrics)
