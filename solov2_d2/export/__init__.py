"""Exported SOLOv2: ``export_model`` (ONNX or ``torch.export``, with a JSON of what a runtime
needs) and ``load_exported`` (ONNX Runtime, OpenVINO or ``torch.export`` with the model's own
interface). README, "Deploy"."""

from .exporter import export_model
from .metadata import ExportError, check_config, metadata_path, read_metadata
from .runtime import ExportedPredictor, load_exported

__all__ = [
    "ExportError",
    "ExportedPredictor",
    "check_config",
    "export_model",
    "load_exported",
    "metadata_path",
    "read_metadata",
]
