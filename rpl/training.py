"""The trainer behind ``rpl-train``: any trainable method (``rpl.methods``), outlier exposure, mixed
precision, DDP, a NaN guard and atomic resumable checkpoints.

One home per concept: :func:`build_trainer` turns a config into the parts (device and process
group, segmenter, the method's model, optimiser, data); :class:`Trainer` takes a method, a model,
an optimiser and the data and runs the loop; the method (``rpl.methods.<name>``) owns its model,
which parameters train, its loss and its checkpoint. With ``torchrun`` the method wraps its
trainable part in DDP (RPL: the add-on only; PEBAL: the whole tuned segmenter).

Reproducibility: the data order comes from ``(seed, epoch)`` (``ShardedOrder``), each sample's
randomness from ``(seed, epoch, index)`` (``OutlierExposureDataset``) and a method's own sampling
(CoroCL) from a dedicated generator, all saved in ``last.pt``: a killed run resumed with
``--resume`` reaches the same weights as an uninterrupted one on CPU.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Sampler

from rpl.checkpoint import fingerprint, is_checkpoint, read_metadata
from rpl.config import REPO_ROOT, Config, dump_config
from rpl.conventions import OUTLIER, VOID
from rpl.errors import RPLInputError
from rpl.methods.base import Method, TrainContext
from rpl.models.loading import SHIPPED_WEIGHTS, SegmenterSpec, build_segmenter
from rpl.workdir import (RUN_FILES, changes_comment, check_resume_config, check_work_dir,  # noqa: F401 (RUN_FILES)
                         new_run_id, safetensors_step)


class TrainingDiverged(RPLInputError):
    """Too many consecutive non-finite losses: the configuration needs changing."""


# -- distributed -------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            dist.barrier()


def init_distributed(device: torch.device) -> Dist:
    """Join the process group when launched by ``torchrun`` (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


class ShardedOrder(Sampler[int]):
    """A shuffled order drawn from ``(seed, epoch)``, split over ranks, resumable mid-epoch.

    Each rank gets ``len // world // batch * batch`` indices (drop-last), so all ranks run the
    same number of steps; ``start`` skips the samples this rank already consumed.
    """

    def __init__(self, length: int, batch_size: int, seed: int, rank: int = 0, world: int = 1):
        self.length, self.batch_size, self.seed, self.rank, self.world = length, batch_size, seed, rank, world
        self.per_rank = length // world // batch_size * batch_size
        if self.per_rank == 0:
            raise RPLInputError(f"the inlier training set has {length} images, fewer than batch size {batch_size} x "
                                f"{world} process(es); lower optim.batch_size or add images.")
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    @property
    def steps_per_epoch(self) -> int:
        return self.per_rank // self.batch_size

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(self.length, generator=g)[: self.per_rank * self.world]
        mine = order[self.rank:: self.world].tolist()
        return iter(mine[self.start:])

    def __len__(self) -> int:
        return self.per_rank - self.start


# -- setup ---------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RPLInputError(f"train.device={name!r} but CUDA is not available on this machine; use cpu or auto.")
    return torch.device(name)


def amp_settings(mode: str, device: torch.device) -> tuple[bool, torch.dtype | None, bool]:
    """(autocast enabled, dtype, use GradScaler) for ``train.amp``."""
    if mode not in ("auto", "bf16", "fp16", "off"):
        raise RPLInputError(f"train.amp={mode!r}; expected auto, bf16, fp16 or off.")
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return False, None, False
    if mode == "auto":
        mode = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if mode == "fp16" and device.type != "cuda":
        raise RPLInputError("train.amp=fp16 needs CUDA; on CPU use bf16 or off.")
    return True, (torch.bfloat16 if mode == "bf16" else torch.float16), mode == "fp16"


def segmenter_spec(cfg: Config) -> SegmenterSpec:
    return SegmenterSpec.from_dict(asdict(cfg.segmenter))


def build_base_segmenter(cfg: Config, device: torch.device) -> tuple[torch.nn.Module, SegmenterSpec]:
    """The segmenter of ``cfg.segmenter`` on ``device`` (weights may be a fine-tuned method's checkpoint)."""
    spec = segmenter_spec(cfg)
    segmenter = build_segmenter(spec, base_dir=REPO_ROOT).to(device)
    if cfg.train.channels_last:
        segmenter = segmenter.to(memory_format=torch.channels_last)
    return segmenter, spec


def build_model(cfg: Config, device: torch.device) -> tuple[Method, torch.nn.Module, SegmenterSpec, str]:
    """The method of ``cfg.method``, its model on the base segmenter, the spec and the base's fingerprint."""
    from rpl.methods import available, get, trainable

    if cfg.method not in available():
        raise RPLInputError(f"unknown method {cfg.method!r}; rpl-train --method accepts {', '.join(trainable())}.")
    method = get(cfg.method)
    if not method.trainable:
        raise RPLInputError(f"method={cfg.method!r} does not train (a {method.kind} score); rpl-train --method accepts "
                            f"{', '.join(trainable())}.")
    segmenter, spec = build_base_segmenter(cfg, device)
    base_fingerprint = fingerprint(segmenter)
    return method, method.build(segmenter, cfg), spec, base_fingerprint


def build_wrapped(cfg: Config, device: torch.device) -> tuple[Any, SegmenterSpec]:
    """The RPL-wrapped base segmenter of ``cfg`` (whatever ``cfg.method`` says); for benchmarks and tests."""
    from rpl.methods import get

    segmenter, spec = build_base_segmenter(cfg, device)
    return get("rpl").build(segmenter, cfg), spec


def prepare_datasets(cfg: Config, d: Dist) -> tuple[Any, Any]:
    """The training set (inliers + pasted outliers) and the held-out validation set."""
    from rpl.data.cityscapes import list_cityscapes
    from rpl.data.coco import load_ood_manifest, prepare_coco_ood
    from rpl.data.training import OutlierExposureDataset

    root = Path(cfg.data.root)
    if cfg.data.generate_synthstreets:
        if d.main:
            from rpl.data.synthstreets import ensure_generated

            ensure_generated(root, seed=0, hint=" (data.root; --set data.root=DIR puts it elsewhere)")
        d.barrier()
    inliers = list_cityscapes(cfg.data_path("inliers"), cfg.data.train_split)
    val_inliers = list_cityscapes(cfg.data_path("inliers"), cfg.data.val_split)
    cache = cfg.data_path("ood_cache")
    if d.main:
        prepare_coco_ood(cfg.data_path("coco"), cache, split=cfg.data.coco_split, min_size=cfg.data.coco_min_size)
    d.barrier()
    ood = load_ood_manifest(cache)
    n_val = min(len(ood) - 1, max(1, math.ceil(cfg.data.ood_val_fraction * len(ood)))) if len(ood) > 1 else 0
    ood_train, ood_val = (ood[:-n_val], ood[-n_val:]) if n_val else (ood, ood)
    seg = cfg.segmenter
    common = dict(mean=seg.mean or (0.0, 0.0, 0.0), std=seg.std or (1.0, 1.0, 1.0), num_classes=seg.num_classes,
                  scales=cfg.data.paste_scales)
    train = OutlierExposureDataset(inliers, ood_train, cfg.data.crop_size, flip_p=cfg.data.flip_p, seed=cfg.train.seed,
                                   paste_prob=cfg.data.paste_prob, **common)
    val = OutlierExposureDataset(val_inliers, ood_val, cfg.data.crop_size, flip_p=0.0, seed=cfg.train.seed + 7919,
                                 **common)
    return train, val


def parameter_groups(addon: torch.nn.Module, lr: float, last_mult: float) -> list[dict[str, Any]]:
    """RPL's Adam groups for a bare add-on (``rpl.methods.rpl.RPL.parameter_groups`` on a model)."""
    last = list(addon.block.residual.parameters())
    last_ids = {id(p) for p in last}
    return [{"params": [p for p in addon.parameters() if id(p) not in last_ids], "lr": lr},
            {"params": last, "lr": lr * last_mult}]


def poly_lambda(total: int, power: float):
    return lambda step: max(0.0, 1.0 - step / max(1, total)) ** power


# -- state and checkpoints -----------------------------------------------------------------------
@dataclass
class Progress:
    step: int = 0
    epoch: int = 0
    epoch_step: int = 0  # steps done inside ``epoch``
    best_ap: float = -1.0
    best_step: int = -1
    nonfinite_streak: int = 0
    skipped: int = 0


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


LOSS_LINE_KEYS = ("total", "ce", "entropy", "outlier", "contrastive", "gambler_in", "gambler_out", "energy")
class TrainingData:
    """The training set with its resumable sharded order, and the held-out validation set."""

    def __init__(self, train_set: Any, val_set: Any, cfg: Config, d: "Dist", device: torch.device):
        self.train_set, self.val_set, self.cfg, self.device = train_set, val_set, cfg, device
        self.order = ShardedOrder(len(train_set), cfg.optim.batch_size, cfg.train.seed, d.rank, d.world)

    def loader(self, epoch: int, start_step: int) -> DataLoader:
        """Batches of ``epoch`` from step ``start_step`` on (this rank's shard)."""
        self.train_set.set_epoch(epoch)
        self.order.set_epoch(epoch, start_step * self.cfg.optim.batch_size)
        return DataLoader(self.train_set, batch_size=self.cfg.optim.batch_size, sampler=self.order,
                          num_workers=self.cfg.data.num_workers, pin_memory=self.device.type == "cuda",
                          drop_last=True, persistent_workers=False)

    def val_loader(self) -> DataLoader:
        self.val_set.set_epoch(0)
        limit = self.cfg.train.val_limit
        n = len(self.val_set) if limit is None else min(len(self.val_set), limit)
        return DataLoader(torch.utils.data.Subset(self.val_set, range(n)), batch_size=self.cfg.optim.batch_size,
                          num_workers=self.cfg.data.num_workers)


def build_trainer(cfg: Config, work_dir: str | Path, resume: bool = False, quiet: bool = False,
                  overwrite: bool = False, run_id: str | None = None,
                  allow_changes: tuple[str, ...] = ()) -> "Trainer":
    """Everything ``rpl-train`` needs from a config: process group, method and model, optimiser, data.

    ``run_id`` is the work-dir lock's id (on every log row); ``allow_changes`` the config keys a resumed
    run may change (``--allow-changes``).
    """
    check_work_dir(Path(work_dir), resume, overwrite, main=int(os.environ.get("RANK", "0")) == 0)
    device = resolve_device(cfg.train.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    d = init_distributed(device)
    torch.manual_seed(cfg.train.seed)
    method, model, spec, base_fingerprint = build_model(cfg, device)
    train_set, val_set = prepare_datasets(cfg, d)
    data = TrainingData(method.training_set(train_set, cfg), val_set, cfg, d, device)
    optimizer = torch.optim.Adam(method.parameter_groups(model, cfg.optim), lr=cfg.optim.lr)
    trainer = Trainer(method, model, optimizer, data, cfg, work_dir, d=d, device=device, spec=spec,
                      base_fingerprint=base_fingerprint, quiet=quiet, run_id=run_id)
    if resume:
        trainer.resume(allow_changes)
    elif d.main:
        (trainer.work_dir / "config.yaml").write_text(dump_config(cfg))
    trainer.start_logging()
    return trainer


class Trainer:
    """Runs a method's training: steps with AMP and the NaN guard, validation, atomic checkpoints, resume.

    ``data`` and ``work_dir`` may be ``None`` for a trainer that only steps on given batches (benchmarks).
    """

    def __init__(self, method: Method, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 data: TrainingData | None, cfg: Config, work_dir: str | Path | None, *, d: "Dist | None" = None,
                 device: torch.device | None = None, spec: SegmenterSpec | None = None,
                 base_fingerprint: str | None = None, quiet: bool = False, total_steps: int | None = None,
                 run_id: str | None = None):
        self.method, self.model, self.optimizer, self.data, self.cfg = method, model, optimizer, data, cfg
        self.run_id, self.resume_changes = run_id or new_run_id(), []
        self.work_dir, self.quiet = (Path(work_dir) if work_dir is not None else None), quiet
        self.d = d or Dist()
        self.device = device or torch.device("cpu")
        self.spec = spec or segmenter_spec(cfg)
        self.base_fingerprint = base_fingerprint or ""
        self.amp, self.amp_dtype, use_scaler = amp_settings(cfg.train.amp, self.device)
        o = cfg.optim
        steps_per_epoch = data.order.steps_per_epoch if data is not None else 1
        self.total_steps = total_steps or o.iterations or o.epochs * steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, poly_lambda(self.total_steps, o.poly_power))
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.loss_generator = torch.Generator().manual_seed(cfg.train.seed * 1000 + self.d.rank)
        self.ctx = TrainContext(self.device, self.amp, self.amp_dtype, cfg.train.channels_last, self.loss_generator,
                                cfg)
        self.progress = Progress()
        self._bar = None  # the live progress display while ``fit`` runs (validation adds its row to it)
        if self.d.active:
            self.model = method.distribute(model, self.device)
        if self.work_dir is not None:
            self.work_dir.mkdir(parents=True, exist_ok=True)
        self._wandb = None

    # checkpoints ---------------------------------------------------------------------------
    def _recorded_weights(self) -> str | None:
        """The segmenter weights path to record, relative to the work dir and inside it (or the shipped
        ``weights/``): a checkpoint may only point next to itself, so weights from elsewhere are
        hard-linked (copied across file systems) into the work dir once."""
        if not self.spec.weights:
            return None
        if getattr(self, "_weights_record", None) is None:
            wpath = Path(self.spec.weights)
            wpath = (wpath if wpath.is_absolute() or wpath.exists() else REPO_ROOT / wpath).resolve()
            work = self.work_dir.resolve()
            if not (wpath.is_relative_to(work) or wpath.is_relative_to(SHIPPED_WEIGHTS)):
                local = work / f"segmenter{''.join(wpath.suffixes[-1:])}"
                if not (local.exists() and local.samefile(wpath)):
                    tmp = local.with_name(f".{local.name}.tmp{os.getpid()}")
                    try:
                        os.link(wpath, tmp)
                    except OSError:
                        shutil.copyfile(wpath, tmp)
                    os.replace(tmp, local)
                wpath = local
            self._weights_record = os.path.relpath(wpath, work)
        return self._weights_record

    def _extra(self, metrics: dict[str, Any] | None = None) -> dict[str, Any]:
        spec = self.spec.to_dict()
        base_method = None
        if spec.get("weights"):
            wpath = Path(spec["weights"])
            wpath = wpath if wpath.is_absolute() or wpath.exists() else REPO_ROOT / wpath
            if wpath.suffix == ".safetensors" and is_checkpoint(wpath):  # e.g. RPL on a PEBAL-tuned segmenter
                base_method = read_metadata(wpath)["method"]
        spec["weights"] = self._recorded_weights()
        extra = {"segmenter": spec, "train_config": self.cfg.to_dict(), "step": self.progress.step,
                 "metrics": metrics or {}, "run_id": self.run_id, "resume_changes": self.resume_changes}
        if base_method:
            extra["base_method"] = base_method
        return extra

    def _save_model(self, path: Path, metrics: dict[str, Any] | None) -> None:
        self.method.save(path, self.method.unwrap(self.model), extra=self._extra(metrics),
                         base_fingerprint=self.base_fingerprint)

    def save_checkpoint(self, metrics: dict[str, Any] | None = None) -> None:
        if not self.d.main:
            return
        state = {
            "method": self.method.name,
            "model": self.method.training_state(self.method.unwrap(self.model)),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "progress": asdict(self.progress),
            "rng": {"torch": torch.get_rng_state(), "loss": self.loss_generator.get_state()},
            "base_fingerprint": self.base_fingerprint,
            "config": json.dumps(self.cfg.to_dict()),
            "metrics": json.dumps(metrics or {}),
            "resume_changes": json.dumps(self.resume_changes),
        }
        atomic_torch_save(state, self.work_dir / "last.pt")
        self._save_model(self.work_dir / "last.safetensors", metrics)

    def resume(self, allow_changes: tuple[str, ...] = ()) -> None:
        path = self.work_dir / "last.pt"
        if not path.is_file():
            raise RPLInputError(f"--resume: {path} does not exist; expected the last.pt written by an earlier rpl-train "
                                "run in this --work-dir.")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise RPLInputError(f"--resume: {path} could not be read ({type(err).__name__}: {err}).") from None
        saved_method = state.get("method", "rpl")  # files from before methods were plug-ins are RPL's
        if saved_method != self.method.name:
            raise RPLInputError(f"--resume: {path} is a run of method {saved_method!r}, but this run trains "
                                f"{self.method.name!r}; pass --method {saved_method} or use another --work-dir.")
        if state.get("base_fingerprint") != self.base_fingerprint:
            raise RPLInputError(f"--resume: {path} was trained on another segmenter (fingerprint differs); use the "
                                "same segmenter weights or another --work-dir.")
        changes = check_resume_config(json.loads(state["config"]), self.cfg.to_dict(), allow_changes, str(path))
        record = {"step": state["progress"]["step"], "changes": {k: list(v) for k, v in changes.items()}}
        self.resume_changes = json.loads(state.get("resume_changes", "[]")) + ([record] if changes else [])
        configured = [g["initial_lr"] for g in self.optimizer.param_groups]  # this config's rates
        self.method.load_training_state(self.method.unwrap(self.model), state["model"] if "model" in state
                                        else state["addon"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.progress = Progress(**state["progress"])
        if changes:  # the loaded optimiser/scheduler hold the old rates: continue on the new schedule
            sched = self.scheduler
            sched.base_lrs = configured
            for group, base, factor in zip(self.optimizer.param_groups, configured, sched.lr_lambdas):
                group["initial_lr"], group["lr"] = base, base * factor(sched.last_epoch)
        torch.set_rng_state(state["rng"]["torch"])
        self.loss_generator.set_state(state["rng"]["loss"])
        if self.d.main:
            history = "".join(changes_comment(r["changes"], r["step"]) for r in self.resume_changes)
            (self.work_dir / "config.yaml").write_text(dump_config(self.cfg) + history)
            if changes or safetensors_step(self.work_dir / "last.safetensors") != self.progress.step:
                self.save_checkpoint(json.loads(state.get("metrics", "{}")))  # the pair agrees again
        if self.d.main and not self.quiet and not self.finished:
            print(f"Resumed from {path} at step {self.progress.step}.")

    @property
    def finished(self) -> bool:
        """All ``total_steps`` are done (a resumed finished run has nothing left to train)."""
        return self.progress.step >= self.total_steps

    def start_logging(self) -> None:
        mode = self.cfg.train.wandb
        if mode == "disabled" or not self.d.main:
            return
        try:
            import wandb
        except ImportError:
            raise RPLInputError(f"train.wandb={mode!r} but wandb is not installed; pip install wandb or set "
                                "train.wandb=disabled.") from None
        self._wandb = wandb.init(project="rpl", mode=mode, dir=str(self.work_dir), config=self.cfg.to_dict())

    # one step ------------------------------------------------------------------------------
    def _forward_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.method.loss(self.model, batch, self.ctx)

    def _loader(self, epoch: int, start_step: int) -> DataLoader:
        return self.data.loader(epoch, start_step)

    def _all_finite(self, loss: torch.Tensor) -> bool:
        flag = torch.isfinite(loss.detach()).float().reshape(1)
        if self.d.active:
            flag = flag.to(self.device if self.device.type == "cuda" else "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _describe_batch(self, batch: dict[str, torch.Tensor]) -> str:
        """Method, dataset and images of a batch, for messages about it."""
        method = self.method.name
        where = f"method {method}, dataset {self.cfg.data_path('inliers')} split {self.cfg.data.train_split}"
        index = batch.get("index")
        if index is None:
            return where
        pairs = getattr(self.data.train_set, "inlier_pairs", None) if self.data is not None else None
        names = [str(pairs[i][0]) if pairs is not None else str(i) for i in index.tolist()]
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        return f"{where}, images {shown} (with pasted outliers)"

    def step(self, batch: dict[str, torch.Tensor]) -> dict[str, float] | None:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        loss, parts = self._forward_loss(batch)
        if not self._all_finite(loss):
            self.progress.skipped += 1
            self.progress.nonfinite_streak += 1
            self.scheduler.step()
            if self.progress.nonfinite_streak >= self.cfg.train.max_nonfinite:
                raise TrainingDiverged(
                    f"the loss was NaN/inf for {self.progress.nonfinite_streak} consecutive steps (step "
                    f"{self.progress.step}, {self._describe_batch(batch)}); training stopped. Lower optim.lr, set "
                    "optim.grad_clip (e.g. 1.0), use train.amp=bf16 or off instead of fp16, or check those images "
                    "and labels.")
            return None
        self.progress.nonfinite_streak = 0
        clip = self.cfg.optim.grad_clip
        params = self.method.trainable_parameters(self.model)
        if self.scaler:
            self.scaler.scale(loss).backward()
            if clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(params, clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            self.optimizer.step()
        self.scheduler.step()
        out = {k: float(v) for k, v in parts.items()}
        if self.d.active:  # per-rank outlier pixel counts, to show no rank is starved or out of step
            counts = torch.zeros(self.d.world, device=self.device)
            counts[self.d.rank] = out["outlier_pixels"]
            dist.all_reduce(counts)
            out["outlier_pixels_per_rank"] = counts.tolist()
        return out

    # validation ----------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Pixel AP/AUROC/FPR95 (and the FPR@95 / best-F1 thresholds) of the anomaly score on held-out inliers
        with pasted held-out outliers."""
        from rpl.metrics import PixelMetrics

        metric = PixelMetrics(mode="streaming")
        bar = self._bar
        loader = self.data.val_loader()
        task = bar.add_task("val", total=len(loader.dataset)) if bar is not None else None
        with self.method.validating(self.model) as model:
            model.eval()
            try:
                for batch in loader:
                    images = batch["image"].to(self.device)
                    with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
                        out = model(images)
                    target = batch["target"].to(self.device)
                    labels = torch.where(target == OUTLIER, 1, torch.where(target == VOID, VOID, 0)).to(torch.uint8)
                    metric.update(out.anomaly, labels)
                    if task is not None:
                        bar.advance(task, len(images))
            finally:
                if task is not None:
                    bar.remove_task(task)
                model.train()
        # the thresholds go into the checkpoint, so that rpl-predict can threshold masks without labels
        kept = ("auroc", "ap", "fpr95", "fpr95_threshold", "best_f1", "best_f1_threshold")
        return {k: float(v) for k, v in metric.compute().items() if k in kept}

    # loop ------------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        if not self.d.main:
            return
        with open(self.work_dir / "log.jsonl", "a") as fh:
            fh.write(json.dumps({"run_id": self.run_id, **record}) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def _loss_line(self, losses: dict[str, float] | None, lr: float) -> str:
        """``step 10/150: total 14.4 ce 0.162 ... lr 4.7e-04``: the periodic log line above the bar."""
        shown = " ".join(f"{k} {losses[k]:.3g}" for k in LOSS_LINE_KEYS if k in (losses or {}))
        return f"step {self.progress.step}/{self.total_steps}: {shown or 'step skipped'} lr {lr:.1e}"

    def fit(self) -> dict[str, Any]:
        from rpl.progress import make_progress

        p, cfg = self.progress, self.cfg
        show = not self.quiet and self.d.main
        bar = make_progress(enabled=show)
        self._bar = bar if show else None
        images_per_step = cfg.optim.batch_size * self.d.world * self.method.images_per_step(cfg)
        started, step_times, last = time.perf_counter(), [], None
        val_metrics: dict[str, float] = {}
        with bar:
            task = bar.add_task("train", total=self.total_steps, completed=p.step)
            while p.step < self.total_steps:
                for batch in self._loader(p.epoch, p.epoch_step):
                    t0 = time.perf_counter()
                    parts = self.step(batch)
                    step_times.append(time.perf_counter() - t0)
                    p.step += 1
                    p.epoch_step += 1
                    if parts is not None:
                        last = parts
                    if p.step % cfg.train.log_every == 0 or p.step == self.total_steps:
                        ips = images_per_step * len(step_times) / max(1e-9, sum(step_times))
                        lr = self.optimizer.param_groups[0]["lr"]
                        record = {"step": p.step, "lr": lr, "img_per_s": ips, "skipped": p.skipped, **(last or {})}
                        self._log(record)
                        bar.update(task, ips=ips)
                        if show:
                            bar.console.print(self._loss_line(last, lr), soft_wrap=True, highlight=False)
                        step_times.clear()
                    bar.update(task, completed=p.step)
                    val_due = cfg.train.val_every and p.step % cfg.train.val_every == 0
                    if val_due or p.step == self.total_steps:
                        val_metrics = self._validate_and_select()
                    if p.step % cfg.train.checkpoint_every == 0 or p.step == self.total_steps:
                        self.save_checkpoint(val_metrics)
                    if p.step >= self.total_steps:
                        break
                else:
                    p.epoch += 1
                    p.epoch_step = 0
        elapsed = time.perf_counter() - started
        summary = {"rank_param_max_diff": self._rank_param_diff()} if self.d.active else {}
        summary |= self.method.after_fit(self) if self.data is not None else {}
        summary |= {"method": self.method.name, "steps": p.step, "seconds": elapsed, "skipped_steps": p.skipped,
                    "best_ap": p.best_ap, "best_step": p.best_step, "last_losses": last, "val": val_metrics,
                    "work_dir": str(self.work_dir)}
        if self.d.main:
            (self.work_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if self._wandb is not None:
            self._wandb.finish()
        return summary

    def _rank_param_diff(self) -> float:
        """Largest difference between any rank's trained parameters and rank 0's (0.0 when in sync)."""
        diff = torch.zeros((), device=self.device)
        for param in self.method.trainable_parameters(self.model):
            ref = param.detach().clone()
            dist.broadcast(ref, 0)
            diff = torch.maximum(diff, (ref - param.detach()).abs().max())
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        return float(diff)

    def _validate_and_select(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if self.d.main:
            metrics = self.validate()
            self._log({"step": self.progress.step, **{f"val_{k}": v for k, v in metrics.items()}})
            best = metrics.get("ap", -1.0) > self.progress.best_ap
            if self._bar is not None:
                self._bar.console.print(f"step {self.progress.step}/{self.total_steps}: held-out val " + " ".join(
                    f"{k.upper()} {100 * metrics[k]:.2f}" for k in ("auroc", "ap", "fpr95") if k in metrics) + " %"
                    + (" (best so far)" if best else ""),
                    soft_wrap=True, highlight=False)
            if best:
                self.progress.best_ap, self.progress.best_step = metrics["ap"], self.progress.step
                self._save_model(self.work_dir / "best.safetensors", {"val": metrics})
        if self.d.active:  # every rank keeps the same best_ap so resumed runs agree
            best = torch.tensor([self.progress.best_ap, float(self.progress.best_step)], device=self.device)
            dist.broadcast(best, 0)
            self.progress.best_ap, self.progress.best_step = float(best[0]), int(best[1])
        return metrics

    def close(self) -> None:
        if self.d.active and dist.is_initialized():
            dist.destroy_process_group()
