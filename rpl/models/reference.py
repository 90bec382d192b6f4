"""Published checkpoints of the paper, converted to this package's two files.

Two files are in use in the field:

- NVIDIA's Cityscapes DeepLabv3+ WideResNet38, ``cityscapes_best.pth`` (the frozen segmenter of
  Meta-OoD, PEBAL and RPL): ``{"state_dict": {"module.mod1.conv1.weight": ..., ...}, "epoch": ...,
  "mean_iu": ...}``; it also stores the training loss's class weights (``criterion.nll_loss.weight``).
- RPL's released RPL+CoroCL checkpoint: the whole reference network, ``{"model": {"branch1.mod1...":
  ..., "branch1.residual_block....": ...}, ...}`` (``branch1`` is RPL's wrapper around the segmenter,
  ``module.`` appears when it was saved from DDP).

Both are read with ``torch.load(weights_only=True)`` (plain numbers and numpy scalars/arrays are
allowed, code never). After the ``module.`` / ``branch1.`` prefixes are removed, keys map as follows:

==============================================  ================================  =========
reference key                                   our key                           our file
==============================================  ================================  =========
``mod1.*`` ... ``mod7.*``, ``aspp.*``,          same key (``DeepWV3Plus``)        segmenter
``bot_fine.*``, ``bot_aspp.*``, ``final.*``
``residual_block.atten_aspp.img_conv.{i}.*``    ``block.aspp.pooling.conv.{i}.*``  add-on
``residual_block.atten_aspp.features.{b}.*``    ``block.aspp.branches.{b}.*``      add-on
``residual_block.bot_atten_aspp.weight``        ``block.bottleneck.weight``        add-on
``residual_block.atten_aspp_final.weight``      ``block.residual.weight``          add-on
``residual_block.proj_head.proj.0.weight/bias`` ``projection.proj.weight/bias``    add-on
``criterion.*``                                 dropped (loss weights, not model)  -
==============================================  ================================  =========

Both ASPPs concatenate (image pooling, 1x1, rates 12/24/36) in the same order and the reference
adds ``r`` to the same 304-channel decoder concat (48 low-level channels first) before ``final``,
so no tensor is permuted. The reference projection head leaves normalisation to its loss; ours
L2-normalises in the module, which gives the same embedding. A missing BatchNorm
``num_batches_tracked`` is tolerated (unused in eval); any other missing, unknown or misshapen key
is an ``RPLInputError`` that lists them.

Command line::

    python -m rpl.models.reference CHECKPOINT --out-dir DIR

writes ``DIR/segmenter.safetensors`` and, for RPL's checkpoint, ``DIR/rpl_addon.safetensors`` (an
add-on checkpoint that records the segmenter, so ``rpl-eval --checkpoint DIR/rpl_addon.safetensors``
rebuilds everything).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from rpl.blocks import BlockConfig, RPLAddon
from rpl.checkpoint import atomic_save_file, save
from rpl.cli.common import add_debug_flag, run_command
from rpl.errors import RPLInputError
from rpl.models.loading import SegmenterSpec, read_raw_state_dict
from rpl.models.wider_resnet import DeepWV3Plus

SEGMENTER_MODEL = "rpl.models.wider_resnet:deepwv3plus"
SEGMENTER_FILE = "segmenter.safetensors"
ADDON_FILE = "rpl_addon.safetensors"
_WRAPPER_PREFIXES = ("module.", "branch1.")  # DDP / DataParallel, RPL's Network
_DROPPED_PREFIXES = ("criterion.",)
# (reference prefix, our prefix) for the add-on; the segmenter keeps its keys
ADDON_KEY_MAP: tuple[tuple[str, str], ...] = (
    ("residual_block.atten_aspp.img_conv.", "block.aspp.pooling.conv."),
    ("residual_block.atten_aspp.features.", "block.aspp.branches."),
    ("residual_block.bot_atten_aspp.", "block.bottleneck."),
    ("residual_block.atten_aspp_final.", "block.residual."),
    ("residual_block.proj_head.proj.0.", "projection.proj."),
)


def reference_block_config() -> BlockConfig:
    """The reference residual block: ASPP 4096 -> 5 x 256 (rates 12/24/36), bottleneck 256, r and embedding 304."""
    return BlockConfig(width=256, rates=(12, 24, 36), projection_dim=304)


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The raw state dict of a published ``.pth`` (or a ``.safetensors``), keys untouched, without unpickling code."""
    return read_raw_state_dict(path, what="checkpoint",
                               expected="NVIDIA's cityscapes_best.pth or RPL's released RPL+CoroCL .pth")


def _strip_wrappers(key: str) -> tuple[str, list[str]]:
    """``key`` without leading ``module.`` / ``branch1.`` (in any order), and the prefixes removed."""
    removed: list[str] = []
    while key.startswith(_WRAPPER_PREFIXES):
        prefix = next(p for p in _WRAPPER_PREFIXES if key.startswith(p))
        key = key[len(prefix):]
        removed.append(prefix)
    return key, removed


def reference_to_ours(key: str) -> str | None:
    """Our add-on key for a reference ``residual_block.*`` key (``None`` if it has no counterpart)."""
    for ref, ours in ADDON_KEY_MAP:
        if key.startswith(ref):
            return ours + key[len(ref):]
    return None


def ours_to_reference(key: str) -> str:
    for ref, ours in ADDON_KEY_MAP:
        if key.startswith(ours):
            return ref + key[len(ours):]
    raise KeyError(key)


def _expected_layouts(num_classes: int) -> tuple[dict[str, torch.Size], dict[str, torch.Size]]:
    """Reference key -> shape for the segmenter and the residual block, built on the meta device (no memory)."""
    with torch.device("meta"):
        segmenter = DeepWV3Plus(num_classes)
        addon = RPLAddon(DeepWV3Plus.deep_channels, DeepWV3Plus.decoder_channels, 8, reference_block_config())
    seg = {k: v.shape for k, v in segmenter.state_dict().items()}
    block = {ours_to_reference(k): v.shape for k, v in addon.state_dict().items()}
    return seg, block


def _preview(keys: Sequence[str], limit: int = 8) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}]"


def split_reference_state(state: Mapping[str, torch.Tensor], source: str = "state dict"
                          ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict[str, Any]]:
    """Split a reference state dict into (segmenter state, our add-on state or ``None``, info).

    ``source`` names the file in error messages. The add-on is ``None`` for a segmenter-only
    checkpoint (NVIDIA's); a checkpoint with some but not all ``residual_block`` keys is an error.
    """
    original: dict[str, str] = {}  # reference key -> key as stored
    dropped: list[str] = []
    duplicates: list[str] = []
    normalised: dict[str, torch.Tensor] = {}
    prefixes: set[str] = set()
    for key, value in state.items():
        ref, removed = _strip_wrappers(key)
        prefixes.update(removed)
        if ref.startswith(_DROPPED_PREFIXES):
            dropped.append(key)
            continue
        if ref in normalised:
            duplicates.append(key)
        normalised[ref], original[ref] = value, key
    head = normalised.get("final.6.weight")
    num_classes = int(head.shape[0]) if head is not None and head.dim() == 4 else 19
    seg_layout, block_layout = _expected_layouts(num_classes)
    has_addon = any(k.startswith("residual_block.") for k in normalised)
    expected = {**seg_layout, **(block_layout if has_addon else {})}

    unknown = [original[k] for k in normalised if k not in expected]
    missing = [k for k in expected if k not in normalised and not k.endswith(".num_batches_tracked")]
    wrong = [f"{original[k]}: {tuple(normalised[k].shape)} (expected {tuple(expected[k])})"
             for k in normalised if k in expected and normalised[k].shape != expected[k]]
    if unknown or missing or wrong or duplicates:
        problems = [f"{len(what)} {label} {_preview(what)}" for label, what in
                    (("unknown key(s)", unknown), ("missing key(s)", missing), ("shape mismatch(es)", wrong),
                     ("duplicate key(s) after removing module./branch1. prefixes", duplicates)) if what]
        raise RPLInputError(
            f"{source} is not a checkpoint of the paper's DeepLabv3+ WideResNet38 in NVIDIA's or RPL's layout: "
            f"{'; '.join(problems)}. Expected keys such as 'mod1.conv1.weight', 'mod7.block1.convs.conv3.weight', "
            "'aspp.img_conv.0.weight', 'final.6.weight' and, in RPL's checkpoint, 'residual_block.atten_aspp_final."
            "weight' (optionally prefixed by 'module.' and 'branch1.'); see rpl.models.reference for the mapping.")

    segmenter = {k: v for k, v in normalised.items() if k in seg_layout}
    addon = {reference_to_ours(k): v for k, v in normalised.items() if k in block_layout} if has_addon else None
    info = {"source": source, "kind": "rpl" if has_addon else "segmenter", "num_classes": num_classes,
            "removed_prefixes": sorted(prefixes), "dropped": dropped,
            "segmenter_tensors": len(segmenter), "addon_tensors": len(addon or {})}
    return segmenter, addon, info


def convert_reference_checkpoint(path: str | Path
                                 ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict[str, Any]]:
    """Read RPL's released checkpoint (or NVIDIA's ``cityscapes_best.pth``) and split it.

    Returns ``(segmenter_state, addon_state, info)``: ``segmenter_state`` loads strictly into
    :class:`~rpl.models.wider_resnet.DeepWV3Plus`, ``addon_state`` into the add-on of
    ``rpl.wrap(segmenter, block=reference_block_config())`` (``None`` for a segmenter-only file).
    """
    return split_reference_state(read_checkpoint(path), source=f"checkpoint {path}")


def _materialise(segmenter_state: Mapping[str, torch.Tensor], num_classes: int) -> nn.Module:
    """A ``DeepWV3Plus`` holding these tensors, without spending time on a random init first."""
    with torch.device("meta"):
        model = DeepWV3Plus(num_classes)
    model.load_state_dict(dict(segmenter_state), strict=True, assign=True)
    return model.float().eval()


def write_converted(segmenter_state: Mapping[str, torch.Tensor], addon_state: Mapping[str, torch.Tensor] | None,
                    out_dir: str | Path, source: str | None = None) -> dict[str, Path]:
    """Write ``out_dir/segmenter.safetensors`` and, with an add-on, ``out_dir/rpl_addon.safetensors``.

    The add-on file records the segmenter's spec (factory, classes, weights file relative to
    ``out_dir``, ImageNet normalisation as the reference), so ``rpl-eval --checkpoint`` needs nothing else.
    """
    from rpl.wrapping import wrap

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    num_classes = int(segmenter_state["final.6.weight"].shape[0])
    model = _materialise(segmenter_state, num_classes)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    written = {"segmenter": out_dir / SEGMENTER_FILE}
    atomic_save_file(tensors, written["segmenter"], {"model": SEGMENTER_MODEL, "num_classes": str(num_classes),
                                                      "converted_from": str(source or "")})
    if addon_state is not None:
        wrapped = wrap(model, block=reference_block_config(), probe_size=(32, 32))  # stride 8: a 4x4 deep map
        wrapped.bare_addon.load_state_dict(dict(addon_state), strict=True)
        spec = SegmenterSpec(model=SEGMENTER_MODEL, kwargs={"num_classes": num_classes}, weights=SEGMENTER_FILE,
                             num_classes=num_classes)
        written["addon"] = save(out_dir / ADDON_FILE, wrapped,
                                extra={"segmenter": spec.to_dict(), "converted_from": str(source or "")})
    return written


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rpl.models.reference",
        description="Convert RPL's released RPL+CoroCL checkpoint (whole network with residual_block.* keys) or "
                    "NVIDIA's cityscapes_best.pth into segmenter.safetensors (+ rpl_addon.safetensors for RPL's). "
                    "Files are read with torch.load(weights_only=True).")
    parser.add_argument("checkpoint", help="RPL's released .pth, or NVIDIA's cityscapes_best.pth")
    parser.add_argument("--out-dir", required=True, help="folder for segmenter.safetensors and rpl_addon.safetensors")
    add_debug_flag(parser)
    return parser


def _run(args: argparse.Namespace) -> int:
    segmenter, addon, info = convert_reference_checkpoint(args.checkpoint)
    written = write_converted(segmenter, addon, args.out_dir, source=args.checkpoint)
    prefixes = ", ".join(info["removed_prefixes"]) or "none"
    print(f"{args.checkpoint}: {info['kind']} checkpoint, {info['num_classes']} classes, prefixes removed: {prefixes}, "
          f"dropped: {len(info['dropped'])} loss tensor(s)")
    for what, path in written.items():
        print(f"wrote {what}: {path}")
    if "addon" in written:
        print(f"evaluate (paper protocol, see the README's 'Reproducing the paper'): rpl-eval --checkpoint {written['addon']} "
              "--data-root DATA --pixel-mode exact --fpr-rule closest "
              "--datasets fs-laf,fs-static,road-anomaly,smiyc-anomaly,smiyc-obstacle")
    else:
        print("train an add-on: rpl-train --config experiments/cityscapes_rpl_corocl.yaml "
              f"--set segmenter.weights={written['segmenter']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_run, build_parser(), argv)


if __name__ == "__main__":
    raise SystemExit(main())
