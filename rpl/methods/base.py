"""What a method is: how it is built on a segmenter, trains, scores and is saved (one class per method).

Scoring contract (evaluation, ``rpl-eval``): ``method.scorer(model, options)`` returns a function
``(x, logits, out) -> (B, h, w)`` score map (higher = more anomalous) computed from one forward of
``model``: ``x`` the network input, ``logits`` the closed-set logits, ``out`` the model's own output
(``None`` for a bare segmenter). Models built by trainable methods return an object with
``.logits`` (closed-set, ``(B, K, H, W)``) and ``.anomaly`` (the method's score map). The same
scorers serve ``rpl-predict`` (``rpl.prediction.Predictor``) and ``rpl-export`` (through
:meth:`Method.export_scorer`, traced into the ONNX graph); both refuse a method whose score needs
more than the one forward (``one_forward = False``: MC dropout).

Training contract (``rpl-train --method NAME``): :meth:`Method.build` makes the model to train
from a segmenter, :meth:`Method.parameter_groups` says which parameters train, :meth:`Method.loss`
computes the loss of one batch (forward included, under the trainer's autocast), and
:meth:`Method.save` / :meth:`Method.load` write and read its checkpoint (``rpl.checkpoint``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, ContextManager

import torch
from torch import nn

from rpl.errors import RPLInputError

Scorer = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


@dataclass
class TrainContext:
    """What a method's loss needs from the trainer besides the model and the batch."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp: bool = False
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False
    generator: torch.Generator | None = None  # the method's own sampling randomness (saved on resume)
    config: Any = None  # the full rpl.config.Config

    def autocast(self) -> ContextManager:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp)

    def images(self, images: torch.Tensor) -> torch.Tensor:
        images = images.to(self.device, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images


class Method:
    """Base class; subclasses set the class attributes and override what applies to them."""

    name: ClassVar[str]
    kind: ClassVar[str]  # "post-hoc" (scores any segmenter's logits), "add-on" (frozen segmenter), "fine-tune"
    trainable: ClassVar[bool] = False
    summary: ClassVar[str] = ""
    one_forward: ClassVar[bool] = True  # the score comes from the one forward (x, logits, out) alone

    # -- scoring ---------------------------------------------------------------------------------
    def check_model(self, model: nn.Module) -> None:
        """Refuse a model this method cannot score (an input error naming what is needed)."""

    def scorer(self, model: nn.Module, options: Any) -> Scorer:
        """Default, for the models trainable methods build: their own ``out.anomaly`` map, once
        :meth:`check_model` has accepted the model; post-hoc methods override it."""
        self.check_model(model)
        return lambda x, logits, out: out.anomaly

    def export_scorer(self, model: nn.Module, options: Any) -> Scorer:
        """The scorer ``rpl-export`` traces into its ONNX graph: :meth:`scorer` unless that does
        something the tracer cannot export at dynamic sizes (RPL and PEBAL blur with
        ``rpl.scores.exportable_smooth`` instead of torchvision's blur); it must give the same map."""
        return self.scorer(model, options)

    def row_scorers(self, model: nn.Module, options: Any) -> dict[str, Scorer]:
        """The score maps ``model`` gives, one result row each: ``{row name: scorer}``.

        Default: the method's own row. A method whose model gives several variants of its score from
        one forward (Meta-OoD: ``meta-ood`` and ``meta-ood+meta``) names each; every name starts with
        the method's name (``rpl-eval`` puts a base method's prefix in front of it).
        """
        return {self.name: self.scorer(model, options)}

    # -- training (trainable methods) ------------------------------------------------------------
    def build(self, segmenter: nn.Module, config: Any) -> nn.Module:
        """The model to train, built on ``segmenter`` (already on its device)."""
        raise RPLInputError(f"method {self.name!r} does not train; rpl-train --method accepts: "
                            + ", ".join(_trainable_names()) + ".")

    def parameter_groups(self, model: nn.Module, optim: Any) -> list[dict[str, Any]]:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": optim.lr}]

    def training_set(self, train_set: Any, config: Any) -> Any:
        """The training set this method trains on, given the shared outlier-exposure set (default: it)."""
        return train_set

    def after_fit(self, trainer: Any) -> dict[str, Any]:
        """A stage after the last training step (e.g. fitting a classifier into ``best.safetensors``);
        what it returns goes into ``summary.json``. Default: nothing."""
        return {}

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], ctx: TrainContext
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def images_per_step(self, config: Any) -> int:
        """Images one training sample feeds through the model (for the img/s figure)."""
        return 1

    def distribute(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The model to train in a ``torchrun`` job: its trainable part inside DDP."""
        raise NotImplementedError

    def unwrap(self, model: nn.Module) -> nn.Module:
        """``model`` without DDP wrappers, as it is saved and validated."""
        return model

    @contextlib.contextmanager
    def validating(self, model: nn.Module):
        """Rank 0 alone validates: no DDP collectives inside."""
        yield self.unwrap(model)

    def training_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """What ``last.pt`` keeps of the model to resume (the tensors that change while training)."""
        raise NotImplementedError

    def load_training_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError

    # -- checkpoints -----------------------------------------------------------------------------
    def metadata_fields(self, path: str | Path) -> tuple:
        """The method's own metadata fields (``rpl.checkpoint.MetadataField``), validated on read."""
        return ()

    def save(self, path: str | Path, model: nn.Module, extra: dict[str, Any] | None = None,
             base_fingerprint: str | None = None) -> Path:
        raise NotImplementedError

    def load(self, path: str | Path, segmenter: nn.Module | None = None, **kwargs: Any) -> nn.Module:
        """The model of checkpoint ``path``; ``segmenter`` None: the one its metadata records."""
        raise NotImplementedError


class AddOnMethod(Method):
    """A trainable add-on on a frozen segmenter (RPL, REAL): the model is a ``rpl.wrapping.HookedSegmenter``
    whose ``addon`` alone trains, is synchronised by DDP and is kept to resume."""

    kind = "add-on"
    trainable = True

    def find_unused_parameters(self, model: nn.Module) -> bool:
        """Whether some add-on parameters may get no gradient in a step (DDP must then be told)."""
        return False

    def distribute(self, model: nn.Module, device: torch.device) -> nn.Module:
        """Only the add-on is inside DDP (the frozen segmenter has nothing to synchronise)."""
        addon = model.addon
        if device.type == "cuda":
            addon = nn.SyncBatchNorm.convert_sync_batchnorm(addon)
        model.addon = nn.parallel.DistributedDataParallel(
            addon, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=self.find_unused_parameters(model))
        return model

    @contextlib.contextmanager
    def validating(self, model: nn.Module):
        addon = model.addon
        model.addon = model.bare_addon  # no DDP collectives from rank 0 alone
        try:
            yield model
        finally:
            model.addon = addon

    def training_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return model.bare_addon.state_dict()

    def load_training_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        model.bare_addon.load_state_dict(state)


class FineTuneMethod(Method):
    """A method that trains a copy of the segmenter (PEBAL, Meta-OoD): the whole model is inside DDP
    (SyncBatchNorm on CUDA), kept whole to resume, and saved with :func:`save_tuned`."""

    kind = "fine-tune"
    trainable = True

    def distribute(self, model: nn.Module, device: torch.device) -> nn.Module:
        if device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    def training_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return model.state_dict()

    def load_training_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        model.load_state_dict(state)


def _trainable_names() -> list[str]:
    from rpl.methods import trainable

    return trainable()


def recorded_segmenter(path: str | Path, meta: dict[str, Any]) -> nn.Module:
    """The segmenter a checkpoint's metadata records (``extra.segmenter``), weights relative to its folder."""
    from rpl.models.loading import SegmenterSpec, build_segmenter

    recorded = (meta.get("extra") or {}).get("segmenter")
    if not recorded:
        raise RPLInputError(f"checkpoint {path} records no segmenter (its metadata has no 'segmenter' entry); pass "
                            "the segmenter it was trained on (rpl-eval --model package.module:factory --weights FILE).")
    spec = SegmenterSpec.from_dict(recorded, where="extra.segmenter", source=path)
    return build_segmenter(spec, recorded_in=path)


def save_tuned(path: str | Path, method: str, segmenter: nn.Module, tensors: dict[str, torch.Tensor],
               fields: dict[str, Any], extra: dict[str, Any] | None, base_fingerprint: str | None) -> Path:
    """A fine-tuned method's checkpoint: the whole tuned ``segmenter`` under ``segmenter.*``, the method's
    own ``tensors`` beside it, its metadata ``fields`` and the fingerprint of the base it started from."""
    from rpl.checkpoint import SEGMENTER_PREFIX, write_checkpoint

    everything = {f"{SEGMENTER_PREFIX}{k}": v for k, v in segmenter.state_dict().items()} | tensors
    return write_checkpoint(path, everything, method, base_fingerprint or "", type(segmenter).__name__, fields, extra)


def load_tuned(path: str | Path, method: str, segmenter: nn.Module | None, check_base: bool,
               kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor], nn.Module]:
    """Read a fine-tuned method's checkpoint: its metadata, its tensors (``segmenter.*`` among them) and
    ``segmenter`` (default: the base its metadata records) holding the tuned weights.

    Refused, each with a one-paragraph error: another method's file, options that place an RPL add-on
    (``kwargs``), a ``segmenter`` other than the recorded base (``check_base``), tensors that do not fit it.
    """
    from safetensors.torch import load_file

    from rpl.checkpoint import SEGMENTER_PREFIX, fingerprint, read_metadata, strip_prefix

    if kwargs:
        raise RPLInputError(f"checkpoint {path} holds method {method!r}, which takes no {sorted(kwargs)} (those "
                            "place an RPL add-on).")
    meta = read_metadata(path, method=method)
    if segmenter is None:
        segmenter = recorded_segmenter(path, meta)
    if check_base and meta.get("base_fingerprint") and fingerprint(segmenter) != meta["base_fingerprint"]:
        raise RPLInputError(f"checkpoint {path} was fine-tuned from a different base model than the one given "
                            f"({type(segmenter).__name__}); load the segmenter it started from (its metadata "
                            "records it in extra.segmenter).")
    state = strip_prefix(load_file(str(path)))
    try:
        segmenter.load_state_dict({k[len(SEGMENTER_PREFIX):]: v for k, v in state.items()
                                   if k.startswith(SEGMENTER_PREFIX)})
    except RuntimeError as err:
        raise RPLInputError(f"checkpoint {path} does not fit the segmenter {type(segmenter).__name__}: "
                            f"{str(err)[:400]}") from None
    return meta, state, segmenter
