"""rpl-predict: anomaly maps for your own images and videos (no labels needed).

Examples:
  rpl-predict data/synthstreets/synthstreets-anomaly/images       # shipped model, overlays + maps
  rpl-predict 'shots/**/*.jpg' drive.mp4 --save overlay,mask --threshold 2.5 --save-video
  rpl-predict --smiyc-layout submission --method-name RPL datasets/dataset_AnomalyTrack/images
  rpl-predict shots/ --checkpoint weights/pebal_synthstreets.safetensors --methods pebal,energy

--checkpoint is a checkpoint of any method, run on the segmenter it records; --methods defaults to
the checkpoint's own method (rpl, pebal, ...), and the post-hoc scores of its closed-set logits
can be added.

INPUT is any mix of image files, folders (searched recursively), glob patterns (quote them) and
video files (read frame by frame). Outputs go below --out (default work_dirs/predict):
  overlay/METHOD/NAME.png     image / 2 + score colours / 2, as rpl-eval --save-vis (per-image colour range)
  anomaly/METHOD/NAME.png     the score map as a 16-bit PNG, mapped linearly from a range fixed for the
                              run (--score-range, else the first image's min..max widened by half their
                              span each side; recorded in index.json); or .npy with the raw scores
                              (--anomaly-format npy16|npy32)
  prediction/NAME.png         closed-set class ids as a palette PNG with the Cityscapes colours
  mask/METHOD/NAME.png        255 where score >= the threshold, else 0
  video/METHOD/VIDEO.mp4      overlay video of each video input (--save-video)
  index.json, index.csv       every input with its outputs and per-image statistics
NAME is the path below the INPUT folder (or the glob's fixed part) without suffix, the file stem for
a file, VIDEO/NNNNNN for video frames. Scores and labels are at the input resolution and equal
rpl-eval's for the same model and image.

The mask threshold is --threshold, or the FPR@95 / best-F1 threshold that the checkpoint recorded in
its validation run (--threshold-from; for the checkpoint's own method). Unreadable files are
reported and skipped (exit code 0 unless nothing could be read, or with --strict). Existing outputs
are overwritten only with --overwrite.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from rpl.cli.common import add_debug_flag, run_command
from rpl.errors import RPLInputError

SAVE_KINDS = ("overlay", "anomaly", "prediction", "mask")
DEFAULT_SAVE = ("overlay", "anomaly")
ANOMALY_FORMATS = ("png16", "npy16", "npy32")
THRESHOLD_SOURCES = ("fpr95", "best-f1")
DEFAULT_OUT = Path("work_dirs/predict")
WRITE_QUEUE = 8  # frames whose outputs may wait for the writer thread


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rpl-predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="*", metavar="INPUT", help="image files, folders, glob patterns or video files")
    p.add_argument("--checkpoint", metavar="FILE", help="a checkpoint of any method (.safetensors from rpl-train), run on "
                                        "the segmenter it records (default: the shipped "
                                        "weights/rpl_synthstreets.safetensors)")
    p.add_argument("--methods", metavar="LIST",
                   help="comma-separated: the checkpoint's own method (rpl, pebal, ...) and/or the post-hoc scores "
                        "energy, msp, maxlogit, entropy (default: the checkpoint's own method)")
    out = p.add_argument_group("outputs")
    out.add_argument("--out", default=str(DEFAULT_OUT), metavar="DIR", help=f"output folder (default: {DEFAULT_OUT})")
    out.add_argument("--save", metavar="KINDS",
                     help="comma-separated kinds to write: overlay, anomaly, prediction, mask (default: "
                          f"{','.join(DEFAULT_SAVE)}; nothing but the HDF5 files with --smiyc-layout)")
    out.add_argument("--anomaly-format", choices=ANOMALY_FORMATS, default="png16",
                     help="format of anomaly maps: png16 (16-bit PNG over the run's score range), npy16 or npy32 "
                          "(raw scores as float16 / float32 .npy) (default: png16)")
    out.add_argument("--score-range", metavar="LOW,HIGH",
                     help="scores mapped to 0 and 65535 in 16-bit PNGs; write --score-range=-20,5 when LOW is negative "
                          "(default: the first image's range, widened)")
    out.add_argument("--threshold", metavar="T",
                     help="anomaly threshold for masks and area statistics: one number for every method, or "
                          "METHOD=T,...; write --threshold=-2.5 for a negative T (default: the checkpoint's validation "
                          "threshold for its own method, if recorded)")
    out.add_argument("--threshold-from", choices=THRESHOLD_SOURCES, default="fpr95",
                     help="which recorded validation threshold the checkpoint's own method uses without --threshold: "
                          "fpr95 (TPR 95 %%) or best-f1 (default: fpr95)")
    out.add_argument("--save-video", action="store_true",
                     help="also write an mp4 overlay video per video input and method (default: off)")
    out.add_argument("--overwrite", action="store_true", help="replace existing outputs (default: refuse)")
    out.add_argument("--quiet", action="store_true", help="no progress bar (default: shown)")
    smiyc = p.add_argument_group("SegmentMeIfYouCan submission")
    smiyc.add_argument("--smiyc-layout", metavar="DIR",
                       help="write DIR/anomaly_p/NAME/DATASET/FRAME.hdf5 (float16, dataset 'value', gzip 9) for "
                            "the benchmark (needs h5py: pip install 'rpl[smiyc]') (default: off)")
    smiyc.add_argument("--method-name", metavar="NAME", help="NAME of the method folder in the submission (required with "
                                             "--smiyc-layout)")
    smiyc.add_argument("--smiyc-dataset", metavar="NAME", help="DATASET folder: AnomalyTrack-all, ObstacleTrack-all or "
                                               "LostAndFound-test (default: from the input's dataset_* folder)")
    run = p.add_argument_group("running")
    run.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    run.add_argument("--amp", action="store_true", help="mixed-precision forward (bf16; fp16 on older GPUs) "
                                                        "(default: off)")
    run.add_argument("--resize", metavar="HxW", help="network input size; outputs stay at the input size "
                                                     "(default: each image at its own size)")
    run.add_argument("--batch-size", type=int, default=1, metavar="N",
                     help="consecutive images of one size per forward (default: 1)")
    run.add_argument("--limit", type=int, metavar="N", help="predict only the first N frames (default: all)")
    run.add_argument("--strict", action="store_true",
                     help="stop with exit code 2 at the first unreadable input (default: skip and report it)")
    add_debug_flag(p)
    return p


# -- options -------------------------------------------------------------------------------------
def _kinds(value: str | None, smiyc: bool) -> tuple[str, ...]:
    if value is None:
        return () if smiyc else DEFAULT_SAVE
    kinds = [v.strip() for v in value.split(",") if v.strip()]
    for k in kinds:
        if k not in SAVE_KINDS:
            raise RPLInputError(f"--save: unknown kind {k!r}; expected a comma-separated list of "
                                f"{', '.join(SAVE_KINDS)}.")
    return tuple(dict.fromkeys(kinds))


def _floats(value: str, option: str, n: int) -> tuple[float, ...]:
    try:
        parts = tuple(float(v) for v in value.split(","))
    except ValueError:
        parts = ()
    if len(parts) != n:
        raise RPLInputError(f"{option} {value!r} is not {n} comma-separated number(s).")
    return parts


def _thresholds(value: str | None, methods: Sequence[str], recorded: float | None,
                source: str, own: str) -> dict[str, tuple[float, str]]:
    """Threshold and where it comes from, per method that has one (``recorded``: the checkpoint's, for ``own``)."""
    out: dict[str, tuple[float, str]] = {}
    if value is None:
        if recorded is not None and own in methods:
            out[own] = (float(recorded), f"checkpoint validation ({source})")
        return out
    if "=" not in value:
        t = _floats(value, "--threshold", 1)[0]
        return {m: (t, "--threshold") for m in methods}
    for part in value.split(","):
        name, _, number = part.partition("=")
        name = name.strip()
        if name not in methods:
            raise RPLInputError(f"--threshold {part!r}: method {name!r} is not among --methods ({', '.join(methods)}).")
        out[name] = (_floats(number, f"--threshold {name}=", 1)[0], "--threshold")
    return out


def recorded_threshold(meta: dict[str, Any], source: str) -> float | None:
    """The threshold of the checkpoint's own method that its validation run recorded (``extra.metrics.val``), if any."""
    val = ((meta.get("extra") or {}).get("metrics") or {}).get("val") or {}
    value = val.get("fpr95_threshold" if source == "fpr95" else "best_f1_threshold")
    return float(value) if isinstance(value, (int, float)) else None


def load_model(checkpoint: Path, device: Any) -> Any:
    """The model of the checkpoint (any method) on its recorded segmenter, on ``device``, in eval mode.

    ``rpl.from_checkpoint``'s rules apply: only listed segmenter factories, weights next to the file.
    """
    import rpl

    return rpl.from_checkpoint(checkpoint, device=device)


# -- outputs -------------------------------------------------------------------------------------
class Outputs:
    """Output paths of a run and the writes behind them (temporary name + rename: no half-written file)."""

    def __init__(self, root: Path, kinds: Sequence[str], methods: Sequence[str], anomaly_format: str,
                 video: bool, smiyc: tuple[Path, str, str] | None):
        self.root, self.kinds, self.methods = root, tuple(kinds), tuple(methods)
        self.anomaly_suffix = ".png" if anomaly_format == "png16" else ".npy"
        self.anomaly_format = anomaly_format
        self.video, self.smiyc = video, smiyc

    def path(self, kind: str, method: str | None, name: str) -> Path:
        suffix = self.anomaly_suffix if kind == "anomaly" else (".mp4" if kind == "video" else ".png")
        folder = self.root / kind if method is None else self.root / kind / method
        return folder / f"{name}{suffix}"

    def planned(self, source: Any) -> list[Path]:
        """Files (images) or folders and videos (videos) a source will write, to refuse overwriting them."""
        from rpl.smiyc import frame_id, frame_path

        paths = []
        for kind in self.kinds:
            for method in (None,) if kind == "prediction" else self.methods:
                p = self.path(kind, method, source.name)
                paths.append(p.with_suffix("") if source.kind == "video" else p)
        if source.kind == "video" and self.video:
            paths += [self.path("video", m, source.name) for m in self.methods]
        if self.smiyc is not None and source.kind == "image":
            root, name, dataset = self.smiyc
            paths.append(frame_path(root, name, dataset, frame_id(source.path)))
        return paths

    @staticmethod
    def atomic(path: Path, write) -> None:
        import os

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
        try:
            write(tmp)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def write_png(path: Path, array: Any) -> None:
    from rpl.data.io import write_image

    Outputs.atomic(path, lambda tmp: write_image(tmp, array))


def write_palette_png(path: Path, labels: Any) -> None:
    from PIL import Image

    from rpl.visualize import palette_bytes

    image = Image.fromarray(labels, mode="P")
    image.putpalette(palette_bytes())
    Outputs.atomic(path, lambda tmp: image.save(tmp, format="PNG"))


def write_npy(path: Path, array: Any) -> None:
    import numpy as np

    Outputs.atomic(path, lambda tmp: np.save(tmp, array))


class VideoSink:
    """One mp4 overlay writer per (video, method), opened at the video's first frame."""

    def __init__(self) -> None:
        self.open: dict[tuple[str, str], Any] = {}
        self.written: list[str] = []

    def write(self, path: Path, key: tuple[str, str], rgb: Any, fps: float | None) -> None:
        import cv2

        writer = self.open.get(key)
        if writer is None:
            self.close_other(key[0])
            path.parent.mkdir(parents=True, exist_ok=True)
            h, w = rgb.shape[:2]
            writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps or 25.0, (w, h))
            if not writer.isOpened():
                raise RPLInputError(f"--save-video: OpenCV cannot write {path} (no mp4v encoder in this build).")
            self.open[key] = writer
            self.written.append(str(path))
        writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))

    def close_other(self, video: str | None) -> None:
        for key in [k for k in self.open if k[0] != video]:
            self.open.pop(key).release()

    def close(self) -> None:
        self.close_other(None)


def frame_stats(score: Any, threshold: float | None) -> dict[str, Any]:
    import numpy as np

    finite = score[np.isfinite(score)]
    stats: dict[str, Any] = {"max": float(finite.max()) if finite.size else None,
                             "mean": float(finite.mean()) if finite.size else None,
                             "threshold": threshold, "anomalous_pixels": None, "anomalous_fraction": None}
    if threshold is not None:
        n = int((score >= threshold).sum())
        stats.update(anomalous_pixels=n, anomalous_fraction=n / score.size)
    return stats


# -- the run -------------------------------------------------------------------------------------
class Run:
    """Batches frames of one size, predicts, and hands each frame's outputs to one writer thread."""

    def __init__(self, predictor: Any, outputs: Outputs, thresholds: dict, ranges: Any):
        from concurrent.futures import ThreadPoolExecutor

        self.predictor, self.outputs = predictor, outputs
        self.thresholds = {m: t for m, (t, _) in thresholds.items()}
        self.ranges = ranges
        self.items: list[dict[str, Any]] = []  # every frame, in input order, with its status
        self.videos = VideoSink()
        self.pool = ThreadPoolExecutor(1)  # one writer: video frames stay in order
        self.pending: list[Any] = []

    def predict(self, frames: list[Any]) -> None:
        import numpy as np
        import torch

        batch = self.predictor(torch.from_numpy(np.stack([f.image for f in frames])))
        scores = {m: s.cpu().numpy() for m, s in batch.scores.items()}
        prediction = batch.prediction.cpu().numpy()
        for i, frame in enumerate(frames):
            item = self._item(frame, "pending")
            self.items.append(item)  # here, so the index keeps the input order
            self._drain(WRITE_QUEUE)
            self.pending.append(self.pool.submit(self._write, frame, item, prediction[i],
                                                 {m: s[i] for m, s in scores.items()}))

    def _drain(self, keep: int) -> None:
        while len(self.pending) > keep:
            self.pending.pop(0).result()  # re-raises a failed write here

    def _write(self, frame: Any, item: dict[str, Any], prediction: Any, scores: dict[str, Any]) -> None:
        import numpy as np

        from rpl.prediction import to_uint16
        from rpl.visualize import overlay

        out = self.outputs
        item["outputs"], item["stats"] = {}, {}
        if "prediction" in out.kinds:
            path = out.path("prediction", None, frame.name)
            write_palette_png(path, prediction)
            item["outputs"]["prediction"] = str(path)
        for m, score in scores.items():
            threshold = self.thresholds.get(m)
            item["stats"][m] = frame_stats(score, threshold)
            paths: dict[str, str] = {}
            vis = overlay(frame.image, score) if ("overlay" in out.kinds or
                                                 (out.video and frame.index is not None)) else None
            if "overlay" in out.kinds:
                paths["overlay"] = str(out.path("overlay", m, frame.name))
                write_png(Path(paths["overlay"]), vis)
            if "anomaly" in out.kinds:
                paths["anomaly"] = str(out.path("anomaly", m, frame.name))
                if out.anomaly_format == "png16":
                    write_png(Path(paths["anomaly"]), to_uint16(score, *self.ranges.of(m, score)))
                else:
                    write_npy(Path(paths["anomaly"]), score.astype(np.float16 if out.anomaly_format == "npy16"
                                                                   else np.float32))
            if "mask" in out.kinds:
                paths["mask"] = str(out.path("mask", m, frame.name))
                write_png(Path(paths["mask"]), np.where(score >= threshold, 255, 0).astype(np.uint8))
            if out.video and frame.index is not None:
                path = out.path("video", m, frame.source.name)
                self.videos.write(path, (frame.source.name, m), vis, frame.fps)
                paths["video"] = str(path)
            item["outputs"][m] = paths
        if out.smiyc is not None:
            from rpl.smiyc import frame_id, write_frame

            root, name, dataset = out.smiyc
            item["outputs"]["smiyc"] = str(write_frame(root, name, dataset, frame_id(frame.source.path),
                                                       scores[self.predictor.methods[0]]))
        item["status"] = "ok"

    @staticmethod
    def _item(frame: Any, status: str) -> dict[str, Any]:
        return {"input": str(frame.source.path), "name": frame.name, "kind": frame.source.kind, "frame": frame.index,
                "height": None if frame.image is None else int(frame.image.shape[0]),
                "width": None if frame.image is None else int(frame.image.shape[1]),
                "status": status, "error": frame.error}

    def skip(self, frame: Any) -> None:
        self.items.append(self._item(frame, "skipped"))

    def count(self, status: str) -> int:
        return sum(1 for it in self.items if it["status"] == status)

    def finish(self) -> None:
        try:
            self._drain(0)
        finally:
            self.pool.shutdown(wait=True)
            self.videos.close()


def _index_csv(items: list[dict[str, Any]], methods: Sequence[str]) -> str:
    fields = ["input", "name", "kind", "frame", "width", "height", "status", "error"]
    for m in methods:
        fields += [f"{m}_max", f"{m}_mean", f"{m}_anomalous_fraction", f"{m}_overlay", f"{m}_anomaly", f"{m}_mask"]
    fields += ["prediction", "smiyc"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for item in items:
        row = {k: item.get(k) for k in fields[:8]}
        outputs = item.get("outputs") or {}
        for m in methods:
            stats = (item.get("stats") or {}).get(m, {})
            row.update({f"{m}_max": stats.get("max"), f"{m}_mean": stats.get("mean"),
                        f"{m}_anomalous_fraction": stats.get("anomalous_fraction")})
            row.update({f"{m}_{k}": (outputs.get(m) or {}).get(k) for k in ("overlay", "anomaly", "mask")})
        row.update(prediction=outputs.get("prediction"), smiyc=outputs.get("smiyc"))
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buf.getvalue()


def _run(args: argparse.Namespace) -> int:
    smiyc_on = args.smiyc_layout is not None
    kinds = _kinds(args.save, smiyc_on)
    if args.batch_size < 1:
        raise RPLInputError(f"--batch-size must be >= 1, got {args.batch_size}.")
    if args.limit is not None and args.limit < 1:
        raise RPLInputError(f"--limit must be >= 1, got {args.limit}.")
    if args.method_name is not None and not smiyc_on:
        raise RPLInputError("--method-name names the method folder of a SMIYC submission; it needs --smiyc-layout DIR.")

    from rpl.data.inputs import discover, video_frame_count

    sources = discover(args.inputs)  # every path checked before the model loads

    from rpl.checkpoint import read_metadata
    from rpl.cli.eval import DEFAULT_CHECKPOINT, _device, _size, write_atomic
    from rpl.evaluation import Preprocess, make_progress, sanitize
    from rpl.prediction import Predictor, ScoreRange, check_methods

    checkpoint = Path(args.checkpoint) if args.checkpoint else DEFAULT_CHECKPOINT
    meta = read_metadata(checkpoint)
    own = meta["method"]
    methods = check_methods([m.strip() for m in args.methods.split(",") if m.strip()] if args.methods is not None
                            else [own], own, where=f"checkpoint {checkpoint}")
    smiyc = None
    if smiyc_on:
        from rpl.smiyc import check_name, dataset_of, frame_id, h5py_module

        h5py_module()
        if args.method_name is None:
            raise RPLInputError("--smiyc-layout needs --method-name NAME (the method's folder in the submission).")
        if len(methods) != 1:
            raise RPLInputError(f"--smiyc-layout writes one method's maps; --methods names {len(methods)} "
                                f"({', '.join(methods)}): pick one.")
        if any(s.kind == "video" for s in sources):
            video = next(s for s in sources if s.kind == "video")
            raise RPLInputError(f"--smiyc-layout takes the benchmark's image frames, but {video.path} is a video; "
                                "extract its frames or leave it out.")
        found = {dataset_of(s.path) for s in sources}
        dataset = args.smiyc_dataset or (found.pop() if len(found) == 1 and None not in found else None)
        if dataset is None:
            raise RPLInputError("--smiyc-layout: cannot tell the benchmark dataset from the input folders (no single "
                                "dataset_AnomalyTrack / dataset_ObstacleTrack / dataset_LostAndFound above them); "
                                "pass --smiyc-dataset AnomalyTrack-all, ObstacleTrack-all or LostAndFound-test.")
        fids: dict[str, Path] = {}
        for s in sources:
            fid = frame_id(s.path)
            if fid in fids:
                raise RPLInputError(f"--smiyc-layout: {fids[fid]} and {s.path} have the same frame id {fid!r}; "
                                    "the benchmark names frames by file stem, so one would overwrite the other.")
            fids[fid] = s.path
        smiyc = (Path(args.smiyc_layout), check_name(args.method_name, "--method-name"),
                 check_name(dataset, "--smiyc-dataset"))
    recorded = recorded_threshold(meta, args.threshold_from)
    thresholds = _thresholds(args.threshold, methods, recorded, args.threshold_from, own)
    missing = [m for m in methods if m not in thresholds]
    if "mask" in kinds and missing:
        why = (f"checkpoint {checkpoint} records no {args.threshold_from} threshold from its validation run"
               if own in missing else f"only the checkpoint's own method, {own}, has a recorded threshold")
        raise RPLInputError(f"--save mask needs a threshold for {', '.join(missing)}: {why}. Pass --threshold T "
                            "(one number for every method, or METHOD=T,...).")
    ranges = ScoreRange(*_floats(args.score_range, "--score-range", 2)) if args.score_range else ScoreRange()

    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise RPLInputError(f"--out {out_dir} is a file; expected a folder for the outputs.")
    outputs = Outputs(out_dir, kinds, methods, args.anomaly_format, args.save_video, smiyc)
    index_paths = [out_dir / "index.json", out_dir / "index.csv"]
    if not args.overwrite:
        taken = [p for p in index_paths + [p for s in sources for p in outputs.planned(s)] if p.exists()]
        if taken:
            raise RPLInputError(f"{len(taken)} output(s) already exist, e.g. {taken[0]}; pass --overwrite to replace "
                                "them, or choose another --out (and --smiyc-layout) folder.")

    device = _device(args.device)
    spec = (meta.get("extra") or {}).get("segmenter") or {}
    preprocess = Preprocess(mean=tuple(spec["mean"]) if spec.get("mean") else None,
                            std=tuple(spec["std"]) if spec.get("std") else None,
                            resize=_size(args.resize) if args.resize else None)
    model = load_model(checkpoint, device)
    predictor = Predictor(model, methods, preprocess, device, amp=args.amp)
    run = Run(predictor, outputs, thresholds, ranges)
    total = sum(1 if s.kind == "image" else (video_frame_count(s.path) or 0) for s in sources)
    total = min(total, args.limit) if args.limit else total
    start = time.perf_counter()
    try:
        _loop(args, sources, run, make_progress(None, not args.quiet), total)
    finally:
        run.finish()
        seconds = time.perf_counter() - start
        items = run.items
        document = sanitize({
            "checkpoint": str(checkpoint), "methods": list(methods), "preprocess": preprocess.to_dict(),
            "device": str(device), "amp": args.amp, "saved": list(kinds), "anomaly_format": args.anomaly_format,
            "score_ranges": {m: list(r) for m, r in ranges.ranges.items()} if "anomaly" in kinds and
            args.anomaly_format == "png16" else None,
            "score_range_source": ranges.source if "anomaly" in kinds and args.anomaly_format == "png16" else None,
            "png16_mapping": "grey = round(clip((score - low) / (high - low), 0, 1) * 65535)",
            "mask_rule": "255 where score >= threshold",
            "thresholds": {m: {"value": t, "source": s} for m, (t, s) in thresholds.items()},
            "smiyc": {"root": str(smiyc[0]), "method_name": smiyc[1], "dataset": smiyc[2]} if smiyc else None,
            "videos": run.videos.written, "n_predicted": run.count("ok"), "n_skipped": run.count("skipped"),
            "seconds": round(seconds, 3), "items": items,
        })
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(index_paths[0], json.dumps(document, indent=2, allow_nan=False) + "\n")
        write_atomic(index_paths[1], _index_csv(items, methods))
    for item in items:
        if item["status"] == "skipped":
            print(f"rpl-predict: skipped {item['input']}: {item['error']}", file=sys.stderr)
    n_ok, n_skipped = run.count("ok"), run.count("skipped")
    if not n_ok:
        raise RPLInputError(f"none of the {len(sources)} input file(s) could be read, so nothing was predicted; "
                            f"the reasons are listed above and in {index_paths[0]}.")
    rate = f", {n_ok / seconds:.2f} img/s" if seconds > 0 else ""
    print(f"rpl-predict: predicted {n_ok} image(s) in {seconds:.1f} s{rate}; skipped {n_skipped} "
          f"unreadable; outputs in {out_dir} (index.json, index.csv)" +
          (f", SMIYC files in {smiyc[0]}" if smiyc else ""), file=sys.stderr)
    return 0


def _loop(args: argparse.Namespace, sources: list, run: Run, progress: Any, total: int) -> None:
    from rpl.data.inputs import iter_frames

    with progress:
        task = progress.add_task("predict", total=total or None)
        batch: list = []
        done = 0
        for frame in iter_frames(sources):
            if frame.error is not None:
                run.skip(frame)
                if args.strict:
                    raise RPLInputError(f"--strict: {frame.error}")
                continue
            if batch and (frame.image.shape != batch[0].image.shape or len(batch) >= args.batch_size):
                run.predict(batch)
                progress.advance(task, len(batch))
                batch = []
            batch.append(frame)
            done += 1
            if args.limit is not None and done >= args.limit:
                break
        if batch:
            run.predict(batch)
            progress.advance(task, len(batch))


def main(argv: Sequence[str] | None = None) -> int:
    return run_command(_run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
