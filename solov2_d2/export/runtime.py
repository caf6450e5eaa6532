"""``load_exported``: an exported SOLOv2 under ONNX Runtime, OpenVINO or ``torch.export``, with
the model's own interface (Detectron2 input dicts in, ``[{"instances": Instances}]`` out).

The graph starts at the normalized, padded image; this side normalizes and pads with the same
operations as ``SOLOv2.preprocess_image`` (values from the JSON), runs the graph once per image
(batch size 1), and turns its fixed-size outputs into ``Instances`` with
``instances_from_fixed_size``: the same final upsample and boxes as the PyTorch model.
"""

import logging
import os
from typing import Callable, Dict, List, Sequence

import numpy as np
import torch
from detectron2.data import transforms as T
from detectron2.structures import ImageList

from ..modeling.static_postprocess import FixedSizeDetections, instances_from_fixed_size
from .metadata import FORMATS, ExportError, inference_params, metadata_path, read_metadata

__all__ = ["BACKENDS", "ExportedSOLOv2", "ExportedPredictor", "load_exported"]

logger = logging.getLogger(__name__)

# backend -> the model formats it runs.
BACKENDS = {"onnxruntime": ("onnx",), "openvino": ("onnx",), "torch": ("torch-export",)}
OPENVINO_PRECISIONS = ("f32", "bf16")


def _load_error(path: str, backend: str, error: BaseException) -> ExportError:
    return ExportError(f"{path}: {backend} cannot load it ({type(error).__name__}: {error})")


def _onnxruntime_runner(path: str, metadata: Dict, **_) -> Callable:
    import onnxruntime

    try:
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as error:  # onnxruntime raises its own Fail/InvalidProtobuf/... types
        raise _load_error(path, "onnxruntime", error) from None
    _check_names(
        path,
        metadata,
        [i.name for i in session.get_inputs()],
        [o.name for o in session.get_outputs()],
    )
    input_name, output_names = metadata["input_name"], metadata["output_names"]
    return lambda image: session.run(output_names, {input_name: image.numpy()})


def _openvino_runner(path: str, metadata: Dict, precision: str = "f32", **_) -> Callable:
    import openvino

    if precision not in OPENVINO_PRECISIONS:
        raise ValueError(f"precision must be one of {OPENVINO_PRECISIONS}, got {precision!r}")
    try:
        core = openvino.Core()
        # f32 by default: on CPUs with bf16 support OpenVINO otherwise runs in bf16, whose
        # rounding moves scores by ~1e-3 and can change labels.
        compiled = core.compile_model(
            core.read_model(path), "CPU", {"INFERENCE_PRECISION_HINT": precision}
        )
    except Exception as error:
        raise _load_error(path, "openvino", error) from None
    _check_names(
        path,
        metadata,
        [name for port in compiled.inputs for name in port.get_names()],
        [name for port in compiled.outputs for name in port.get_names()],
    )
    request = compiled.create_infer_request()
    ports = [compiled.output(name) for name in metadata["output_names"]]

    def run(image):
        results = request.infer({metadata["input_name"]: image.numpy()})
        return [results[port] for port in ports]

    return run


def _torch_runner(path: str, metadata: Dict, **_) -> Callable:
    try:
        module = torch.export.load(path).module()
    except Exception as error:
        raise _load_error(path, "torch.export", error) from None

    def run(image):
        with torch.no_grad():
            return list(module(image))

    return run


_RUNNERS = {
    "onnxruntime": _onnxruntime_runner,
    "openvino": _openvino_runner,
    "torch": _torch_runner,
}


def _check_names(path, metadata, inputs: Sequence[str], outputs: Sequence[str]) -> None:
    """The graph must have the JSON's input and outputs (a JSON copied beside another graph
    fails here, if its checksum was copied too)."""
    missing = [metadata["input_name"]] if metadata["input_name"] not in inputs else []
    missing += [name for name in metadata["output_names"] if name not in outputs]
    if missing:
        raise ExportError(
            f"{path}: the graph lacks {', '.join(missing)}, which {metadata_path(path)} names "
            f"(graph inputs: {', '.join(inputs)}; outputs: {', '.join(outputs)})"
        )


class ExportedSOLOv2:
    """The callable ``load_exported`` returns: ``model(batched_inputs)`` as ``SOLOv2`` in eval
    mode. Attributes: ``metadata`` (the JSON), ``path``, ``backend``."""

    def __init__(self, path: str, backend: str = "onnxruntime", precision: str = "f32"):
        if backend not in _RUNNERS:
            raise ValueError(f"backend must be one of {', '.join(_RUNNERS)}, got {backend!r}")
        self.path, self.backend = path, backend
        self.metadata = read_metadata(path)
        if self.metadata["format"] not in BACKENDS[backend]:
            raise ExportError(
                f"{path}: a {self.metadata['format']} model ({metadata_path(path)}); backend "
                f"{backend} runs {', '.join(BACKENDS[backend])} models"
            )
        self.params = inference_params(self.metadata, metadata_path(path))
        self.pixel_mean = torch.tensor(self.metadata["pixel_mean"]).view(-1, 1, 1)
        self.pixel_std = torch.tensor(self.metadata["pixel_std"]).view(-1, 1, 1)
        self._run = _RUNNERS[backend](path, self.metadata, precision=precision)

    def preprocess(self, image) -> torch.Tensor:
        """(C, H, W) image in the JSON's input format -> the graph's (1, C, H', W') input:
        normalized, zero-padded to the size divisibility by ``ImageList.from_tensors``."""
        if isinstance(image, np.ndarray):
            image = torch.from_numpy(np.ascontiguousarray(image))
        if not isinstance(image, torch.Tensor):
            raise ExportError(
                f"{self.path}: 'image' must be a (C, H, W) tensor, got {type(image).__name__}"
            )
        channels = self.pixel_mean.shape[0]
        if image.dim() != 3 or image.shape[0] != channels:
            raise ExportError(
                f"{self.path}: 'image' must be ({channels}, H, W) in "
                f"{self.metadata['input_format']} channel order, got shape {tuple(image.shape)}"
            )
        height, width = image.shape[-2:]
        normalized = (image.to("cpu").float() - self.pixel_mean) / self.pixel_std
        # The PyTorch model's own padding (SOLOv2.preprocess_image).
        batch = ImageList.from_tensors([normalized], self.metadata["size_divisibility"]).tensor
        low, high = self.metadata["min_input_size"], self.metadata["max_input_size"]
        padded = batch.shape[-2:]
        if min(padded) < low or max(padded) > high:
            raise ExportError(
                f"{self.path}: an image of {height} x {width} pads to {padded[0]} x {padded[1]}; "
                f"the exported graph takes padded sizes from {low} to {high} (resize the image)"
            )
        return batch.contiguous()

    def run_graph(self, tensor: torch.Tensor) -> FixedSizeDetections:
        """The exported graph on one ``preprocess``-ed image: its fixed-size outputs."""
        return FixedSizeDetections(*[torch.as_tensor(np.asarray(o)) for o in self._run(tensor)])

    def to_instances(self, detections: FixedSizeDetections, image_size, output_size) -> Dict:
        """The graph's outputs -> ``{"instances": Instances, "overflow": bool}`` at
        ``output_size``, with the PyTorch model's final upsample and tight boxes."""
        overflow = bool(detections.overflow)
        if overflow:
            logger.warning(
                "%s: more than %d candidates passed SCORE_THR; the detections may differ "
                "from the PyTorch model's (export with a larger --max-candidates)",
                self.path,
                self.metadata["max_candidates"],
            )
        instances = instances_from_fixed_size(detections, image_size, output_size, self.params)
        return {"instances": instances, "overflow": overflow}

    def __call__(self, batched_inputs: List[Dict]) -> List[Dict]:
        results = []
        for inputs in batched_inputs:
            image = inputs["image"]
            tensor = self.preprocess(image)
            image_size = (int(image.shape[-2]), int(image.shape[-1]))
            output_size = (
                int(inputs.get("height", image_size[0])),
                int(inputs.get("width", image_size[1])),
            )
            results.append(self.to_instances(self.run_graph(tensor), image_size, output_size))
        return results


def load_exported(path: str, backend: str = "onnxruntime", precision: str = "f32"):
    """The exported model at ``path`` (``model.onnx`` / ``model.pt2``, or the folder holding one)
    under ``backend`` ("onnxruntime" | "openvino" | "torch"), as a callable with ``SOLOv2``'s
    interface. ``precision``: OpenVINO's inference precision ("f32", or "bf16" where the CPU has
    it: faster, scores off by ~1e-3)."""
    if os.path.isdir(path):
        names = [FORMATS[f] for f in ("onnx", "torch-export") if f in BACKENDS.get(backend, ())]
        path = os.path.join(path, names[0] if names else FORMATS["onnx"])
    return ExportedSOLOv2(path, backend, precision)


class ExportedPredictor:
    """Detectron2's ``DefaultPredictor`` for an exported model: an (H, W, C) BGR image (flipped
    to RGB if that is the JSON's input format, as ``DefaultPredictor`` does) -> the resize of
    the test config (MIN_SIZE_TEST, MAX_SIZE_TEST) -> the model -> its predictions at the
    original size."""

    def __init__(self, path: str, backend: str = "onnxruntime", precision: str = "f32"):
        self.model = load_exported(path, backend, precision)
        meta = self.model.metadata
        self.aug = T.ResizeShortestEdge([meta["min_size_test"]] * 2, meta["max_size_test"])
        self.input_format = meta["input_format"]

    def __call__(self, original_image: np.ndarray) -> Dict:
        if self.input_format == "RGB":
            original_image = original_image[:, :, ::-1]
        height, width = original_image.shape[:2]
        image = self.aug.get_transform(original_image).apply_image(original_image)
        image = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
        return self.model([{"image": image, "height": height, "width": width}])[0]
