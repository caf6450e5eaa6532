"""The JSON written beside an exported model: what a runtime needs to feed it and to read its
outputs (input format and normalization, size divisibility, thresholds, class names), and the
model file's checksum, so that a JSON is never used with another (or a damaged) model file."""

import hashlib
import json
import os
from dataclasses import asdict, fields
from typing import Any, Dict

from ..modeling.postprocess import InferenceParams

__all__ = [
    "FORMATS",
    "METADATA_VERSION",
    "ExportError",
    "metadata_path",
    "file_sha256",
    "write_metadata",
    "read_metadata",
    "inference_params",
    "config_fields",
    "check_config",
]

METADATA_VERSION = 1
# --format -> the model file's name in the output folder.
FORMATS = {"onnx": "model.onnx", "torch-export": "model.pt2"}
_REQUIRED = {
    "version": int,
    "format": str,
    "model_file": str,
    "model_sha256": str,
    "input_name": str,
    "output_names": list,
    "input_format": str,
    "pixel_mean": list,
    "pixel_std": list,
    "size_divisibility": int,
    "min_input_size": int,
    "max_input_size": int,
    "num_classes": int,
    "inference_params": dict,
    "max_candidates": int,
}


class ExportError(ValueError):
    """An exported model, its JSON or an input does not fit: the message names the file and
    what is wrong."""


def metadata_path(model_path: str) -> str:
    """``DIR/model.onnx`` -> ``DIR/model.onnx.json``: one JSON per model file, so that both
    formats can share a folder."""
    return model_path + ".json"


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_metadata(model_path: str, metadata: Dict[str, Any]) -> str:
    """Writes ``metadata`` (the exporter's fields) with the model file's name and checksum
    beside ``model_path``; returns the JSON's path."""
    content = dict(metadata)
    content["version"] = METADATA_VERSION
    content["model_file"] = os.path.basename(model_path)
    content["model_sha256"] = file_sha256(model_path)
    path = metadata_path(model_path)
    with open(path, "w") as stream:
        json.dump(content, stream, indent=2)
        stream.write("\n")
    return path


def read_metadata(model_path: str) -> Dict[str, Any]:
    """The JSON of ``model_path``, checked: both files exist, the JSON parses and has every
    field, and it was written for this very model file (name and checksum)."""
    if not os.path.isfile(model_path):
        raise ExportError(
            f"{model_path}: no such model file (export one with tools/export_model.py)"
        )
    path = metadata_path(model_path)
    if not os.path.isfile(path):
        raise ExportError(
            f"{path}: missing; tools/export_model.py writes it beside {model_path} (the runtime "
            "needs its input normalization and thresholds)"
        )
    try:
        with open(path) as stream:
            content = json.load(stream)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ExportError(f"{path}: not a readable JSON file ({error})") from None
    if not isinstance(content, dict):
        raise ExportError(f"{path}: expected a JSON object, got {type(content).__name__}")
    wrong = [
        f"{key} ({kind.__name__})"
        for key, kind in _REQUIRED.items()
        if not isinstance(content.get(key), kind)
    ]
    if wrong:
        raise ExportError(f"{path}: missing or mistyped fields: {', '.join(wrong)}")
    if content["version"] != METADATA_VERSION:
        raise ExportError(
            f"{path}: metadata version {content['version']}, this solov2_d2 reads "
            f"{METADATA_VERSION}: export the model again"
        )
    if content["model_file"] != os.path.basename(model_path):
        raise ExportError(
            f"{path}: written for {content['model_file']}, not for {os.path.basename(model_path)}"
        )
    if file_sha256(model_path) != content["model_sha256"]:
        raise ExportError(
            f"{model_path}: its checksum differs from the one in {path}: the model file was "
            "modified, truncated or replaced after the export; export it again"
        )
    inference_params(content, path)  # fails here on unknown or missing parameters
    return content


def inference_params(metadata: Dict[str, Any], path: str = "the metadata") -> InferenceParams:
    names = {f.name for f in fields(InferenceParams)}
    given = set(metadata["inference_params"])
    if given != names:
        raise ExportError(
            f"{path}: inference_params has {sorted(given - names)} unknown and "
            f"{sorted(names - given)} missing"
        )
    return InferenceParams(**metadata["inference_params"])


def config_fields(cfg) -> Dict[str, Any]:
    """What the JSON records of a config: the fields a config given with an exported model must
    agree with."""
    from ..modeling.solov2 import SOLOv2

    # The model's own reading of the config (it builds the backbone too: a second at most).
    params = SOLOv2.from_config(cfg)["inference_params"]
    return {
        "input_format": cfg.INPUT.FORMAT,
        "pixel_mean": [float(v) for v in cfg.MODEL.PIXEL_MEAN],
        "pixel_std": [float(v) for v in cfg.MODEL.PIXEL_STD],
        "min_size_test": int(cfg.INPUT.MIN_SIZE_TEST),
        "max_size_test": int(cfg.INPUT.MAX_SIZE_TEST),
        "num_classes": int(cfg.MODEL.SOLOV2.NUM_CLASSES),
        "inference_params": asdict(params),
    }


def check_config(cfg, metadata: Dict[str, Any], path: str) -> None:
    """A config given with an exported model (``demo.py --config-file``) must describe it: every
    field of ``config_fields`` equal, else an error naming the JSON and the fields."""
    expected = config_fields(cfg)
    differ = [
        f"{key}: config {value!r}, {os.path.basename(path)} {metadata.get(key)!r}"
        for key, value in expected.items()
        if metadata.get(key) != value
    ]
    if differ:
        raise ExportError(
            f"{path}: the config does not match the exported model ({'; '.join(differ)}); "
            "export the model again with this config, or drop the config"
        )
