"""Fit an anomaly model on good images. Short and top to bottom (nanoGPT style).

    cfg = typedconfig.load(TrainConfig, "configs/train_stpm.yaml"); fit(cfg) -> out/checkpoint.pt

Outputs in cfg.out: checkpoint.pt (best validation loss), last.pt (resume state, every epoch),
config.yaml (resolved), history.json, loss.png.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from tqdm import tqdm

from edge import typedconfig
from edge.errors import ConfigError
from train.backbones import BACKBONES
from train.data import AUGMENTATIONS, GoodImages, load_good_images
from train.models import MODELS, build_model, check_args


@dataclass
class TrainConfig:
    """Training config (configs/train_stpm.yaml documents every field).

    Defaults suit the demo: ~60 good images at 256 px on 2 CPU cores in ~2-3 minutes.
    """

    model: str = "stpm"
    model_args: dict[str, Any] = field(default_factory=dict)  # extra model kwargs (stages, ...)
    backbone: str = "efficientnet_lite0"
    image_size: int = 256
    epochs: int = 20
    # Optimizer steps cap (0 = none). Keeps training time bounded by compute, not by how many
    # images a category has: 60 images (6 steps/epoch) never reach it; 200 images stop after
    # ~14 of their 20 epochs, inside the 10-minute budget on 2 CPU cores (docs/models.md).
    max_steps: int = 300
    batch_size: int = 8
    lr: float = 2e-3
    # "cosine": 5 % linear warm-up, then cosine decay to 0 at the last step (min of epochs x
    # batches and max_steps), so a short CPU budget still ends on small, settling steps.
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    weight_decay: float = 1e-5
    seed: int = 0
    val_fraction: float = 0.1
    early_stop_patience: int = 5  # epochs without val improvement; 0 = never stop early
    device: Literal["cpu", "cuda"] = "cpu"
    num_workers: int = 0
    augment: list[str] = field(default_factory=list)  # subset of train.data.AUGMENTATIONS
    # Train on random crop x crop windows of the image_size input (0 = whole images; a multiple
    # of 32). Half the side = a quarter of the cost per sample: more, more varied steps in the
    # same CPU time (docs/models_real.md measures what it buys). Fully convolutional models only.
    crop: int = 0
    threads: int = 0  # torch CPU threads; 0 = torch's default
    data: str = ""  # MVTec category dir (train/good is used) or a folder of good images
    out: str = "runs/train"

    def validate(self) -> None:
        """Raise ValueError "<key>: <problem>" on an invalid value."""
        if self.model not in MODELS:
            raise ValueError(f"model: unknown kind {self.model!r} (valid: {', '.join(MODELS)})")
        if self.backbone not in BACKBONES:
            raise ValueError(f"backbone: unknown {self.backbone!r} (valid: {', '.join(BACKBONES)})")
        for key in ("backbone", "image_size"):
            if key in self.model_args:
                raise ValueError(f"model_args.{key}: set the top-level key {key} instead")
        positive = ("image_size", "epochs", "batch_size")
        for key in positive:
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if not self.lr > 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        for key in (
            "weight_decay",
            "seed",
            "early_stop_patience",
            "num_workers",
            "threads",
            "max_steps",
        ):
            if getattr(self, key) < 0:
                raise ValueError(f"{key}: must be >= 0, got {getattr(self, key)}")
        if self.crop and (self.crop % 32 or not 32 <= self.crop <= self.image_size):
            raise ValueError(
                f"crop: must be 0 or a multiple of 32 up to image_size {self.image_size}, "
                f"got {self.crop}"
            )
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction: must be in [0, 1), got {self.val_fraction}")
        bad = sorted(set(self.augment) - set(AUGMENTATIONS))
        if bad:
            raise ValueError(f"augment: unknown {bad} (valid: {', '.join(AUGMENTATIONS)})")


def load_config(path: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    """YAML file (optional) + overrides (e.g. CLI flags, None values ignored) -> TrainConfig.

    Raises ConfigError naming the file and key.
    """
    data = typedconfig.read_yaml(path) if path is not None else {}
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    source = str(path) if path is not None else "<command line>"
    cfg = typedconfig.from_dict(TrainConfig, data, source=source)
    cfg.model_args = check_args(cfg.model, cfg.model_args, source)
    return cfg


def lr_factor(schedule: str, step: int, total: int) -> float:
    """Multiplier of the base lr before optimizer step `step` (0-based) of `total`."""
    if schedule == "constant" or total <= 1:
        return 1.0
    warm = max(1, total // 20)
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


def _seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g  # drives the DataLoader shuffle order


def _rng_state(loader_gen: torch.Generator) -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "loader": loader_gen.get_state(),
    }


def _set_rng_state(state: dict, loader_gen: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    loader_gen.set_state(state["loader"])


def _plot(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ep, [h["train_loss"] for h in history], "o-", label="train")
    if any(h["val_loss"] is not None for h in history):
        ax.plot(ep, [h["val_loss"] for h in history], "s-", label="validation (held-out good)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fit(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> Path:
    """Train cfg.model on the good images of cfg.data; return the path of out/checkpoint.pt.

    Args:
        cfg: the resolved config.
        resume: continue from out/last.pt (same model, data and seed required).
        progress: show a tqdm bar (loss in postfix).
    Raises:
        ConfigError (bad value, CUDA missing, resume mismatch), DataError (bad image set).
    """
    # ---- config, device, output dir
    try:
        cfg.validate()
    except ValueError as exc:
        raise ConfigError(f"config: {exc}") from exc
    if not cfg.data:
        raise ConfigError("config: data: required (MVTec category dir or folder of good images)")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config: device: cuda requested but torch sees no CUDA device")
    device = torch.device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    loader_gen = _seed_everything(cfg.seed)

    # ---- data: deterministic split of good images; val is never augmented
    train_set, val_set, data_info = load_good_images(
        cfg.data, cfg.image_size, cfg.val_fraction, cfg.augment, cfg.crop
    )
    # drop_last keeps BatchNorm statistics away from a batch of 1 (only when >1 batch exists)
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=len(train_set) > cfg.batch_size,
        num_workers=cfg.num_workers,
        generator=loader_gen,
    )
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=cfg.batch_size)

    # ---- model and optimizer (only trainable parameters: the student(s); teachers are frozen)
    model_args = {**cfg.model_args, "backbone": cfg.backbone, "image_size": cfg.image_size}
    try:
        model = build_model(cfg.model, **model_args).to(device)
    except ValueError as exc:
        raise ConfigError(f"config: {exc}") from exc
    if cfg.crop and not getattr(model, "accepts_crops", True):
        raise ConfigError(f"config: crop: model {cfg.model!r} needs whole images (set crop: 0)")
    resolved = typedconfig.to_dict(cfg)
    typedconfig.dump(cfg, out / "config.yaml")
    if hasattr(model, "fit_memory"):  # PatchCore: no optimiser, the bank is the model
        return _fit_memory(model, cfg, train_set, val_set, data_info, resolved, device)
    # A model may split its parameters into groups (MTKD: importance logits at their own lr).
    if hasattr(model, "param_groups"):
        params = model.param_groups(cfg.lr)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total_steps = cfg.epochs * len(loader)
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: lr_factor(cfg.lr_schedule, i, total_steps)
    )

    history: list[dict] = []
    start_epoch, best_val, best_state, bad_epochs, step = 0, float("inf"), None, 0, 0
    last_path = out / "last.pt"
    if resume:
        if not last_path.is_file():
            raise ConfigError(f"{last_path}: nothing to resume (no last.pt in {out})")
        # CPU: RNG states must stay CPU tensors; load_state_dict moves weights/optimizer state
        # to the model's device. weights_only=False: our own file, holding numpy RNG state.
        last = torch.load(last_path, map_location="cpu", weights_only=False)
        if last["kind"] != cfg.model or last["args"] != model.args:
            raise ConfigError(f"{last_path}: was trained with a different model or model args")
        if last["provenance"]["data_fingerprint"] != data_info["data_fingerprint"]:
            raise ConfigError(f"{last_path}: was trained on different data than {cfg.data}")
        model.load_state_dict(last["state_dict"])
        optimizer.load_state_dict(last["optimizer"])
        scheduler.load_state_dict(last["scheduler"])
        history, start_epoch, step = last["history"], last["epoch"], last.get("step", 0)
        best_val, best_state, bad_epochs = last["best_val"], last["best_state"], last["bad_epochs"]
        _set_rng_state(last["rng"], loader_gen)

    # ---- training loop
    t0 = time.monotonic()
    stopped_early = False
    for epoch in range(start_epoch, cfg.epochs):
        if cfg.early_stop_patience and bad_epochs >= cfg.early_stop_patience:
            stopped_early = True
            break
        if cfg.max_steps and step >= cfg.max_steps:
            break
        model.train()  # the teacher overrides train() and stays in eval mode
        total, n = 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress)
        for x in bar:
            if cfg.max_steps and step >= cfg.max_steps:
                break  # a partial last epoch; it is validated and checkpointed as any other
            step += 1
            x = x.to(device, non_blocking=True)  # (B,3,S,S) float 0..255
            loss = model.training_loss(x)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total, n = total + loss.item() * len(x), n + len(x)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        train_loss = total / max(n, 1)

        # Validation: the same loss on held-out good images, student in eval mode (BN running
        # statistics, as deployed). Lower = the student imitates the teacher on unseen normal
        # parts, which is what keeps false rejects down.
        model.eval()
        val_loss = None
        if len(val_set):
            with torch.no_grad():
                vt, vn = 0.0, 0
                for x in val_loader:
                    x = x.to(device)
                    vt, vn = vt + model.training_loss(x).item() * len(x), vn + len(x)
            val_loss = vt / vn
        history.append(
            {"epoch": epoch + 1, "step": step, "train_loss": train_loss, "val_loss": val_loss}
        )
        bar.set_postfix(
            loss=f"{train_loss:.4f}", val="-" if val_loss is None else f"{val_loss:.4f}"
        )
        bar.close()

        # Best = lowest val loss (lowest train loss without a validation set).
        crit = val_loss if val_loss is not None else train_loss
        if crit < best_val:
            best_val, bad_epochs = crit, 0
            best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        else:
            bad_epochs += 1
        provenance = {
            **data_info,
            "epochs_run": epoch + 1,
            "seed": cfg.seed,
            "best_val_loss": best_val,
            "torch_version": str(torch.__version__),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        torch.save(
            {
                "kind": cfg.model,
                "args": copy.deepcopy(model.args),
                "state_dict": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch + 1,
                "step": step,
                "history": history,
                "best_val": best_val,
                "best_state": best_state,
                "bad_epochs": bad_epochs,
                "rng": _rng_state(loader_gen),
                "provenance": provenance,
            },
            last_path,
        )

    # ---- best checkpoint + reports
    if best_state is None:  # resumed a run that had already finished every epoch
        best_state = model.state_dict()
    if hasattr(model, "fit_map_normalization"):
        # Fitted on the best weights in eval mode (BN running statistics, as deployed), on
        # held-out good images the student never trained on: what the line will look like.
        model.load_state_dict(best_state)
        model.eval()
        with torch.no_grad():
            model.fit_map_normalization(
                x.to(device) for x in _plain_loader(val_set, train_set, cfg)
            )
        best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    provenance = {
        **data_info,
        "epochs_run": len(history),
        "steps": step,
        "stopped_early": stopped_early,
        "reached_max_steps": bool(cfg.max_steps and step >= cfg.max_steps),
        "seed": cfg.seed,
        "best_val_loss": best_val,
        "train_seconds": round(time.monotonic() - t0, 1),
        "torch_version": str(torch.__version__),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    return _save(out, cfg, model, best_state, resolved, provenance, history)


def _plain_loader(val_set, train_set, cfg: TrainConfig) -> torch.utils.data.DataLoader:
    """Held-out good images (the training images when there are none), never augmented."""
    ds = val_set if len(val_set) else GoodImages(train_set.files, cfg.image_size)
    return torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size)


def _save(out: Path, cfg, model, state, resolved, provenance, history) -> Path:
    """checkpoint.pt (best state, args, resolved config, provenance), history.json, loss.png."""
    ckpt_path = out / "checkpoint.pt"
    torch.save(
        {
            "kind": cfg.model,
            "args": copy.deepcopy(model.args),
            "state_dict": state,
            "config": resolved,
            "provenance": provenance,
            "history": history,
        },
        ckpt_path,
    )
    (out / "history.json").write_text(json.dumps(history, indent=1))
    if history:
        _plot(history, out / "loss.png")
    return ckpt_path


def _fit_memory(model, cfg: TrainConfig, train_set, val_set, data_info, resolved, device) -> Path:
    """A memory model (PatchCore): one pass over the good training images fills its bank."""
    t0 = time.monotonic()
    plain = GoodImages(train_set.files, cfg.image_size)  # no augmentation: the bank is exact
    loader = torch.utils.data.DataLoader(plain, batch_size=cfg.batch_size)
    bank = model.fit_memory((x.to(device) for x in tqdm(loader, desc="memory bank")), cfg.seed)
    provenance = {
        **data_info,
        "epochs_run": 0,
        "steps": 0,
        "memory_bank": bank,
        "seed": cfg.seed,
        "train_seconds": round(time.monotonic() - t0, 1),
        "torch_version": str(torch.__version__),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    return _save(Path(cfg.out), cfg, model, state, resolved, provenance, [])
