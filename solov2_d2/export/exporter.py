"""SOLOv2 -> an ONNX file or a ``torch.export`` archive, with its JSON (``metadata.py``)."""

import logging
import os
from dataclasses import asdict
from typing import Optional

import torch

from ..modeling.static_postprocess import default_max_candidates
from ..modeling.winograd import WinogradConv2d
from .graph import OUTPUT_NAMES, SOLOv2ExportGraph
from .metadata import FORMATS, config_fields, write_metadata

__all__ = ["export_model", "MIN_INPUT_SIZE", "MAX_INPUT_SIZE"]

logger = logging.getLogger(__name__)

INPUT_NAME = "image"
# The padded input's height and width range, both multiples of the size divisibility. Below
# three strides of 32 the coarsest FPN levels shrink to a single cell and tracing specializes
# on them; the upper end only bounds what the graph was traced for.
MIN_INPUT_SIZE = 96
MAX_INPUT_SIZE = 4096


def _versions():
    versions = {"torch": torch.__version__}
    try:
        import onnx

        versions["onnx"] = onnx.__version__
    except ImportError:
        pass
    return versions


def _class_names(cfg) -> Optional[list]:
    from detectron2.data import MetadataCatalog

    if not cfg.DATASETS.TEST:
        return None
    names = MetadataCatalog.get(cfg.DATASETS.TEST[0]).get("thing_classes", None)
    return list(names) if names and len(names) == cfg.MODEL.SOLOV2.NUM_CLASSES else None


def export_model(
    cfg,
    model: torch.nn.Module,
    output_dir: str,
    model_format: str,
    max_candidates: Optional[int] = None,
) -> str:
    """Exports ``model`` (a SOLOv2 built from ``cfg``, weights loaded) to
    ``output_dir/model.onnx`` or ``model.pt2`` and writes the JSON beside it; returns the model
    file's path.

    The graph takes one normalized image padded to the size divisibility, of dynamic height and
    width (``MIN_INPUT_SIZE`` to ``MAX_INPUT_SIZE``); it is traced on the CPU, in float32.
    ``max_candidates``: the fixed-size postprocess's K1 (``default_max_candidates``).
    """
    if model_format not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {model_format!r}")
    if any(isinstance(module, WinogradConv2d) for module in model.modules()):
        raise ValueError(
            "the model runs Winograd convolutions (optimize_for_inference): export "
            "the model as built, or optimized with winograd=False; the runtimes choose their own "
            "convolution algorithms"
        )
    model = model.to("cpu").float().eval()
    params = model.inference_params
    max_candidates = int(max_candidates or default_max_candidates(params))
    graph = SOLOv2ExportGraph(model, max_candidates).eval()
    divisibility = int(model.backbone.size_divisibility) or 32
    low, high = -(-MIN_INPUT_SIZE // divisibility), MAX_INPUT_SIZE // divisibility
    sample = torch.zeros(1, len(cfg.MODEL.PIXEL_MEAN), 4 * divisibility, 5 * divisibility)
    height = torch.export.Dim("height_blocks", min=low, max=high)
    width = torch.export.Dim("width_blocks", min=low, max=high)
    dynamic_shapes = {"image": {2: divisibility * height, 3: divisibility * width}}

    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, FORMATS[model_format])
    with torch.no_grad():
        if model_format == "torch-export":
            program = torch.export.export(graph, (sample,), dynamic_shapes=dynamic_shapes)
            torch.export.save(program, path)
        else:
            torch.onnx.export(
                graph,
                (sample,),
                path,
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                input_names=[INPUT_NAME],
                output_names=list(OUTPUT_NAMES),
                external_data=False,
            )
    metadata = config_fields(cfg)
    metadata.update(
        format=model_format,
        input_name=INPUT_NAME,
        output_names=list(OUTPUT_NAMES),
        size_divisibility=divisibility,
        min_input_size=low * divisibility,
        max_input_size=high * divisibility,
        inference_params=asdict(params),
        max_candidates=max_candidates,
        class_names=_class_names(cfg),
        versions=_versions(),
    )
    logger.info("wrote %s and %s", path, write_metadata(path, metadata))
    return path
