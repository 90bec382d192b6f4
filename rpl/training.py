"""The RPL trainer behind ``rpl-train``: outlier exposure, mixed precision, DDP, atomic resumable checkpoints.

Only the add-on trains. The frozen segmenter's parameters never require grad, so its forward
records no autograd graph; the graph starts at the residual block and runs through the second
head pass. With ``torchrun`` only the add-on is wrapped in DDP.

Reproducibility: the data order comes from ``(seed, epoch)`` (``ShardedOrder``), each sample's
randomness from ``(seed, epoch, index)`` (``OutlierExposureDataset``) and CoroCL's sampling from a
dedicated generator, all saved in ``last.pt``: a killed run resumed with ``--resume`` reaches the
same weights as an uninterrupted one on CPU.
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

import rpl
from rpl.blocks import BlockConfig
from rpl.checkpoint import fingerprint
from rpl.config import REPO_ROOT, Config, dump_config
from rpl.errors import RPLInputError
from rpl.losses import LossWeights, rpl_loss
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


def build_wrapped(cfg: Config, device: torch.device) -> tuple[Any, SegmenterSpec]:
    spec = segmenter_spec(cfg)
    segmenter = build_segmenter(spec, base_dir=REPO_ROOT).to(device)
    if cfg.train.channels_last:
        segmenter = segmenter.to(memory_format=torch.channels_last)
    w = cfg.wrap
    block = BlockConfig(width=w.width, rates=w.rates, projection_dim=w.projection_dim, zero_init=w.zero_init,
                        init_from_aspp=w.init_from_aspp)
    model = rpl.wrap(segmenter, head=w.head, feature=w.feature, block=block).train()  # wrap returns eval mode
    return model, spec


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
    """Adam groups as the reference: the block at ``lr``, its last 1x1 at ``last_mult * lr``."""
    last = {id(p) for p in addon.block.residual.parameters()}
    rest = [p for p in addon.parameters() if id(p) not in last]
    return [{"params": rest, "lr": lr}, {"params": list(addon.block.residual.parameters()), "lr": lr * last_mult}]


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


class Trainer:
    def __init__(self, cfg: Config, work_dir: str | Path, resume: bool = False, quiet: bool = False,
                 overwrite: bool = False, run_id: str | None = None, allow_changes: tuple[str, ...] = ()):
        self.cfg, self.work_dir, self.quiet = cfg, Path(work_dir), quiet
        self.run_id, self.allow_changes, self.resume_changes = run_id or new_run_id(), allow_changes, []
        check_work_dir(self.work_dir, resume, overwrite, main=int(os.environ.get("RANK", "0")) == 0)
        self.device = resolve_device(cfg.train.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        self.d = init_distributed(self.device)
        self.amp, self.amp_dtype, use_scaler = amp_settings(cfg.train.amp, self.device)
        torch.manual_seed(cfg.train.seed)
        self.model, self.spec = build_wrapped(cfg, self.device)
        self.base_fingerprint = fingerprint(self.model.segmenter)
        self.train_set, self.val_set = prepare_datasets(cfg, self.d)
        o = cfg.optim
        self.order = ShardedOrder(len(self.train_set), o.batch_size, cfg.train.seed, self.d.rank, self.d.world)
        self.total_steps = o.iterations or o.epochs * self.order.steps_per_epoch
        addon = self.model.addon
        self.optimizer = torch.optim.Adam(parameter_groups(addon, o.lr, o.last_layer_lr_mult), lr=o.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, poly_lambda(self.total_steps, o.poly_power))
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.loss_weights = LossWeights(**asdict(cfg.loss))
        self.loss_generator = torch.Generator().manual_seed(cfg.train.seed * 1000 + self.d.rank)
        self.progress = Progress()
        self._bar = None  # the live progress display while ``fit`` runs (validation adds its row to it)
        if self.d.active:
            if self.device.type == "cuda":
                addon = torch.nn.SyncBatchNorm.convert_sync_batchnorm(addon)
            self.model.addon = torch.nn.parallel.DistributedDataParallel(
                addon, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.loss_weights.contrastive == 0)
        if self.loss_weights.contrastive == 0:
            self.model.return_embedding = False
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            self._resume()
        elif self.d.main:
            (self.work_dir / "config.yaml").write_text(dump_config(cfg))
        self._wandb = self._init_wandb()

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
        spec["weights"] = self._recorded_weights()
        return {"segmenter": spec, "train_config": self.cfg.to_dict(), "step": self.progress.step,
                "metrics": metrics or {}, "run_id": self.run_id, "resume_changes": self.resume_changes}

    def save_checkpoint(self, metrics: dict[str, Any] | None = None) -> None:
        if not self.d.main:
            return
        state = {
            "addon": self.model.bare_addon.state_dict(),
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
        rpl.save(self.work_dir / "last.safetensors", self.model, extra=self._extra(metrics),
                 base_fingerprint=self.base_fingerprint)

    def _resume(self) -> None:
        path = self.work_dir / "last.pt"
        if not path.is_file():
            raise RPLInputError(f"--resume: {path} does not exist; expected the last.pt written by an earlier rpl-train "
                                "run in this --work-dir.")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise RPLInputError(f"--resume: {path} could not be read ({type(err).__name__}: {err}).") from None
        if state.get("base_fingerprint") != self.base_fingerprint:
            raise RPLInputError(f"--resume: {path} was trained on another segmenter (fingerprint differs); use the "
                                "same segmenter weights or another --work-dir.")
        changes = check_resume_config(json.loads(state["config"]), self.cfg.to_dict(), self.allow_changes,
                                      str(path))
        record = {"step": state["progress"]["step"], "changes": {k: list(v) for k, v in changes.items()}}
        self.resume_changes = json.loads(state.get("resume_changes", "[]")) + ([record] if changes else [])
        configured = [g["initial_lr"] for g in self.optimizer.param_groups]  # this config's rates
        self.model.bare_addon.load_state_dict(state["addon"])
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

    def _init_wandb(self) -> Any:
        mode = self.cfg.train.wandb
        if mode == "disabled" or not self.d.main:
            return None
        try:
            import wandb
        except ImportError:
            raise RPLInputError(f"train.wandb={mode!r} but wandb is not installed; pip install wandb or set "
                                "train.wandb=disabled.") from None
        return wandb.init(project="rpl", mode=mode, dir=str(self.work_dir), config=self.cfg.to_dict())

    # one step ------------------------------------------------------------------------------
    def _forward_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        use_ctx = self.loss_weights.contrastive > 0
        images = torch.cat([batch["image"], batch["context_image"]]) if use_ctx else batch["image"]
        images = images.to(self.device, non_blocking=True)
        if self.cfg.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        target = batch["target"].to(self.device, non_blocking=True)
        b = target.shape[0]
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
            out = self.model(images)
        emb = out.embedding
        ctx_target = batch["context_target"].to(self.device, non_blocking=True) if use_ctx else None
        loss, parts = rpl_loss(out.anomaly_logits[:b], out.logits[:b], target,
                               emb[:b] if emb is not None else None, emb[b:] if emb is not None else None,
                               ctx_target, self.loss_weights, self.loss_generator)
        parts["outlier_pixels"] = (target == 254).sum().float()
        return loss, parts

    def _all_finite(self, loss: torch.Tensor) -> bool:
        flag = torch.isfinite(loss.detach()).float().reshape(1)
        if self.d.active:
            flag = flag.to(self.device if self.device.type == "cuda" else "cpu")
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _describe_batch(self, batch: dict[str, torch.Tensor]) -> str:
        """Method, dataset and images of a batch, for messages about it."""
        method = getattr(self.cfg, "method", "rpl")
        where = f"method {method}, dataset {self.cfg.data_path('inliers')} split {self.cfg.data.train_split}"
        index = batch.get("index")
        if index is None:
            return where
        pairs = getattr(self.train_set, "inlier_pairs", None)
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
        params = list(self.model.trainable_parameters())
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

        model, addon = self.model, self.model.addon
        model.addon = model.bare_addon  # no DDP collectives from rank 0 alone
        model.eval()
        metric = PixelMetrics(mode="streaming")
        self.val_set.set_epoch(0)
        n = len(self.val_set) if self.cfg.train.val_limit is None else min(len(self.val_set), self.cfg.train.val_limit)
        loader = DataLoader(torch.utils.data.Subset(self.val_set, range(n)), batch_size=self.cfg.optim.batch_size,
                            num_workers=self.cfg.data.num_workers)
        bar = self._bar
        task = bar.add_task("val", total=n) if bar is not None else None
        try:
            for batch in loader:
                images = batch["image"].to(self.device)
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp):
                    out = model(images)
                target = batch["target"].to(self.device)
                labels = torch.where(target == 254, 1, torch.where(target == 255, 255, 0)).to(torch.uint8)
                metric.update(out.anomaly, labels)
                if task is not None:
                    bar.advance(task, len(images))
        finally:
            if task is not None:
                bar.remove_task(task)
            model.addon = addon
            model.train()
        # the thresholds go into the checkpoint, so that rpl-predict can threshold masks without labels
        kept = ("auroc", "ap", "fpr95", "fpr95_threshold", "best_f1", "best_f1_threshold")
        return {k: float(v) for k, v in metric.compute().items() if k in kept}

    # loop ------------------------------------------------------------------------------------
    def _loader(self, epoch: int, start_step: int) -> DataLoader:
        self.train_set.set_epoch(epoch)
        self.order.set_epoch(epoch, start_step * self.cfg.optim.batch_size)
        return DataLoader(self.train_set, batch_size=self.cfg.optim.batch_size, sampler=self.order,
                          num_workers=self.cfg.data.num_workers, pin_memory=self.device.type == "cuda",
                          drop_last=True, persistent_workers=False)

    def _log(self, record: dict[str, Any]) -> None:
        if not self.d.main:
            return
        with open(self.work_dir / "log.jsonl", "a") as fh:
            fh.write(json.dumps({"run_id": self.run_id, **record}) + "\n")
        if self._wandb is not None:
            self._wandb.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=record["step"])

    def _loss_line(self, losses: dict[str, float] | None, lr: float) -> str:
        """``step 10/150: total 14.4 ce 0.162 ... lr 4.7e-04``: the periodic log line above the bar."""
        shown = " ".join(f"{k} {losses[k]:.3g}" for k in ("total", "ce", "entropy", "outlier", "contrastive")
                         if k in (losses or {}))
        return f"step {self.progress.step}/{self.total_steps}: {shown or 'step skipped'} lr {lr:.1e}"

    def fit(self) -> dict[str, Any]:
        from rpl.progress import make_progress

        p, cfg = self.progress, self.cfg
        show = not self.quiet and self.d.main
        bar = make_progress(enabled=show)
        self._bar = bar if show else None
        images_per_step = cfg.optim.batch_size * self.d.world * (2 if self.loss_weights.contrastive > 0 else 1)
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
        summary |= {"steps": p.step, "seconds": elapsed, "skipped_steps": p.skipped, "best_ap": p.best_ap,
                   "best_step": p.best_step, "last_losses": last, "val": val_metrics,
                   "work_dir": str(self.work_dir)}
        if self.d.main:
            (self.work_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if self._wandb is not None:
            self._wandb.finish()
        return summary

    def _rank_param_diff(self) -> float:
        """Largest difference between any rank's add-on parameters and rank 0's (0.0 when in sync)."""
        diff = torch.zeros((), device=self.device)
        for param in self.model.bare_addon.parameters():
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
                rpl.save(self.work_dir / "best.safetensors", self.model,
                         extra=self._extra({"val": metrics}), base_fingerprint=self.base_fingerprint)
        if self.d.active:  # every rank keeps the same best_ap so resumed runs agree
            best = torch.tensor([self.progress.best_ap, float(self.progress.best_step)], device=self.device)
            dist.broadcast(best, 0)
            self.progress.best_ap, self.progress.best_step = float(best[0]), int(best[1])
        return metrics

    def close(self) -> None:
        if self.d.active and dist.is_initialized():
            dist.destroy_process_group()
