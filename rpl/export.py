"""ONNX export: one graph that gives the closed-set logits and the anomaly map together.

    rpl.export.to_onnx(model, "model.onnx")                           # float NCHW input, normalised
    rpl.export.to_onnx(model, "model.onnx", preprocess=Preprocess())  # uint8 NHWC input, normalised inside

Inputs and outputs of the graph:
- ``images``: float32 ``(N, 3, H, W)`` already normalised (``(x / 255 - mean) / std``), or with
  ``preprocess`` uint8 ``(N, H, W, 3)`` RGB, converted and normalised inside the graph;
- ``logits``: float32 ``(N, K, H', W')``, the segmenter's own closed-set logits (``out.logits``);
- ``anomaly``: float32 ``(N, H', W')``, the method's score map as ``rpl-eval`` scores it, higher =
  more anomalous: by default the model's own method (``rpl.methods.method_of``; ``rpl``: the energy
  of the perturbed logits with its Gaussian blur, ``pebal``: the blurred energy of the K class
  logits), or a post-hoc score of the closed-set logits. Each method's scorer comes from the method
  registry (``Method.export_scorer``: its ``scorer``, or an equal one the tracer can export).
Batch, height and width are dynamic axes when the segmenter's graph allows it: the export is
checked with onnxruntime at a second size, and where that fails the graph is re-exported at the
fixed size with a message that says so. The opset is recorded in the file's metadata
(``rpl_opset``) next to the method and the preprocessing. Needs onnx and onnxruntime
(``pip install rpl[export]``) to verify; exporting itself needs only torch.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from rpl.errors import RPLInputError
from rpl.evaluation import EvalOptions, Preprocess
from rpl.prediction import available_methods, check_methods
from rpl.scores import gaussian_kernel  # noqa: F401  (kept importable here, where it used to live)
from rpl.wrapping import extract_logits

DEFAULT_OPSET = 17
INPUT, OUTPUTS = "images", ("logits", "anomaly")


def onnx_modules() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise RPLInputError("verifying an ONNX export needs onnx and onnxruntime, which are not installed; "
                            "pip install 'rpl[export]' (or pass verify=False / --no-verify).") from None
    return onnx, onnxruntime


class ExportGraph(nn.Module):
    """What is exported: optional uint8 NHWC preprocessing, one forward, ``(logits, anomaly)``.

    ``method`` None: the model's own method (``rpl.methods.method_of``).
    """

    def __init__(self, model: nn.Module, method: str | None = None, preprocess: Preprocess | None = None):
        from rpl.methods import get, method_of

        super().__init__()
        self.model = model
        self.wrapped = hasattr(model, "segmenter")  # a method's model around a segmenter (as rpl-eval decides)
        own = method_of(model)
        if method is None:
            if own is None:
                raise RPLInputError(f"to_onnx: the model ({type(model).__name__}) is a bare segmenter with no method "
                                    f"of its own; pass method=NAME, one of {', '.join(available_methods(None))}.")
            method = own
        self.method = check_methods([method], own, option="--method")[0]
        get(self.method).check_model(model)
        self.scorer = get(self.method).export_scorer(model, EvalOptions(methods=(self.method,), progress=False))
        self.include_preprocess = preprocess is not None
        if preprocess is not None and preprocess.resize is not None:
            raise RPLInputError("to_onnx: the graph's preprocessing does not resize; resize images before feeding "
                                "them (or export without preprocess).")
        mean = preprocess.mean if preprocess is not None and preprocess.mean else (0.0, 0.0, 0.0)
        std = preprocess.std if preprocess is not None and preprocess.std else (1.0, 1.0, 1.0)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images
        if self.include_preprocess:
            x = (images.permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std
        out = self.model(x)
        logits, method_out = (out.logits, out) if self.wrapped else (extract_logits(out), None)
        return logits, self.scorer(x, logits, method_out)


@dataclass
class ExportInfo:
    path: Path
    opset: int
    dynamic: bool
    method: str
    include_preprocess: bool
    input_shape: tuple[int, ...]
    note: str | None = None  # why the graph has a fixed size, when it does
    parity: dict[str, float] | None = None  # onnxruntime against eager on the check input (see parity())


def parity(logits: Any, anomaly: Any, ref_logits: Any, ref_anomaly: Any) -> dict[str, float]:
    """How far an exported graph's outputs are from eager torch's (numpy arrays).

    ``logits_rel``: max abs difference / max abs eager logit; ``anomaly_rel``: max abs difference /
    the eager anomaly map's range; ``argmax_agreement``: fraction of pixels with the same class.
    """
    import numpy as np

    span = float(ref_anomaly.max() - ref_anomaly.min()) or 1.0
    return {"logits_rel": float(np.abs(logits - ref_logits).max() / (np.abs(ref_logits).max() or 1.0)),
            "anomaly_rel": float(np.abs(anomaly - ref_anomaly).max() / span),
            "argmax_agreement": float((logits.argmax(1) == ref_logits.argmax(1)).mean())}


def _dummy(size: Sequence[int], batch: int, include_preprocess: bool, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if include_preprocess:
        return torch.randint(0, 256, (batch, *size, 3), generator=g, dtype=torch.uint8).to(device)
    return torch.randn(batch, 3, *size, generator=g).to(device)


def run_onnx(path: str | os.PathLike, images: Any) -> tuple[Any, Any]:
    """``(logits, anomaly)`` of an exported graph on CPU with onnxruntime (numpy in, numpy out)."""
    _, ort = onnx_modules()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits, anomaly = session.run(list(OUTPUTS), {INPUT: images})
    return logits, anomaly


def _export(graph: ExportGraph, x: torch.Tensor, path: Path, opset: int, dynamic: bool) -> None:
    axes = None
    if dynamic:
        spatial = {0: "batch", 1: "height", 2: "width"} if graph.include_preprocess else \
            {0: "batch", 2: "height", 3: "width"}
        axes = {INPUT: spatial, "logits": {0: "batch", 2: "out_height", 3: "out_width"},
                "anomaly": {0: "batch", 1: "out_height", 2: "out_width"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about Python-side shape checks of the wrapper
        torch.onnx.export(graph, (x,), str(path), dynamo=False, opset_version=opset, input_names=[INPUT],
                          output_names=list(OUTPUTS), dynamic_axes=axes, do_constant_folding=True)


def _record(path: Path, info: dict[str, Any]) -> None:
    """Metadata props ``rpl_*`` in the file (skipped without the onnx package: the graph is complete anyway)."""
    try:
        import onnx
    except ImportError:
        return
    proto = onnx.load(str(path))
    for key, value in info.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = f"rpl_{key}", value if isinstance(value, str) else json.dumps(value)
    onnx.save(proto, str(path))


def to_onnx(model: nn.Module, path: str | os.PathLike, *, method: str | None = None, preprocess: Preprocess | None = None,
            sample_size: Sequence[int] = (256, 512), opset: int = DEFAULT_OPSET, dynamic: bool = True,
            verify: bool = True) -> ExportInfo:
    """Export ``model`` (any method's model, or a bare segmenter with a post-hoc ``method``) to ``path``.

    ``method`` None: the model's own method (``rpl.methods.method_of``), else its name.

    ``preprocess`` (its mean/std) moves the uint8 -> normalised conversion into the graph. With
    ``dynamic``, the graph is traced at ``sample_size`` and checked with onnxruntime at another size
    and batch; a graph that does not run there is re-exported at the fixed ``sample_size`` and
    ``ExportInfo.note`` says why. ``verify`` (needs onnxruntime) is what makes that check.
    """
    path = Path(path)
    if path.is_dir():
        raise RPLInputError(f"--out {path} is a folder; expected a file name such as model.onnx.")
    path.parent.mkdir(parents=True, exist_ok=True)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    graph = ExportGraph(model.eval(), method, preprocess).to(device).eval()
    x = _dummy(sample_size, 1, graph.include_preprocess, device)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}.onnx")
    note, checked = None, None
    try:
        with torch.no_grad():
            _export(graph, x, tmp, opset, dynamic)
        if verify:
            y = x
            if dynamic:  # another batch and size than the traced one
                y = _dummy((sample_size[0] // 2 + 32, sample_size[1] // 2 + 64), 2, graph.include_preprocess, device)
            try:
                checked = _check(tmp, graph, y)
            except RPLInputError:
                raise
            except Exception as err:  # onnxruntime's errors have no common type
                if not dynamic:
                    raise
                note = (f"the graph does not run at other sizes ({str(err).splitlines()[0][:300]}); exported with "
                        f"the fixed input size {tuple(x.shape)} instead")
                dynamic = False
                with torch.no_grad():
                    _export(graph, x, tmp, opset, dynamic=False)
                checked = _check(tmp, graph, x)
        info = {"opset": opset, "method": graph.method, "dynamic": dynamic,
                "include_preprocess": graph.include_preprocess, "input_shape": list(x.shape),
                "input": "uint8 (N, H, W, 3) RGB" if graph.include_preprocess else "float32 (N, 3, H, W) normalised",
                "mean": list(preprocess.mean) if preprocess is not None and preprocess.mean else None,
                "std": list(preprocess.std) if preprocess is not None and preprocess.std else None}
        _record(tmp, info)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return ExportInfo(path, opset, dynamic, graph.method, graph.include_preprocess, tuple(x.shape), note, checked)


def _check(path: Path, graph: ExportGraph, x: torch.Tensor) -> dict[str, float]:
    logits, anomaly = run_onnx(path, x.cpu().numpy())
    with torch.no_grad():
        ref_logits, ref_anomaly = (t.cpu().numpy() for t in graph(x))
    if logits.shape != ref_logits.shape or anomaly.shape != ref_anomaly.shape:
        raise ValueError(f"output shapes {logits.shape} / {anomaly.shape} at input {tuple(x.shape)}, expected "
                         f"{ref_logits.shape} / {ref_anomaly.shape}")
    return parity(logits, anomaly, ref_logits, ref_anomaly)
