"""Published SOLOv2 COCO weights by name, served to Detectron2's PathManager.

``MODEL.WEIGHTS mmdet://solov2_r50_fpn_1x_coco`` (or ``solo://<name>``) works wherever
Detectron2 reads weights, including its plain ``DetectionCheckpointer`` and ``DefaultPredictor``,
the way ``detectron2://`` does: the handler registered on ``import solov2_d2`` downloads the
file once through Detectron2's PathManager (its ``HTTPURLHandler`` cache: ``$FVCORE_CACHE``,
else ``~/.torch/iopath_cache``), converts it to our key names once, and returns the converted
``.pth`` beside the download. That file is an ordinary checkpoint of ours.

The table is data: one ``PublishedWeights`` row per published file. mmdetection names are the
mmdet config names without ``.py``; URLs and mask AP are mmdetection's model zoo
(configs/solov2/README.md and metafile.yml).
"""

import logging
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from detectron2.utils.file_io import PathManager
from iopath.common.file_io import PathHandler, file_lock

__all__ = [
    "PublishedWeights",
    "PUBLISHED_WEIGHTS",
    "CATALOG",
    "SCHEMES",
    "PublishedWeightsHandler",
    "lookup",
    "local_converted_path",
]

logger = logging.getLogger(__name__)

# Publisher of each scheme, as logs and the README name them.
SCHEMES = {
    "mmdet://": "mmdetection model zoo",
    "solo://": "official SOLO (WXinlong/SOLO), Hugging Face mirror",
}


@dataclass(frozen=True)
class PublishedWeights:
    """One published checkpoint: ``name`` (scheme + model name) -> ``url``, who publishes it and
    the COCO val2017 mask AP it reports; ``config`` is our config that builds its architecture
    ("" until one is written)."""

    name: str
    url: str
    mask_ap: float
    config: str = ""

    @property
    def publisher(self) -> str:
        return SCHEMES[scheme_of(self.name)]


_MMDET = "https://download.openmmlab.com/mmdetection/v2.0/solov2/"
_SOLO = "https://huggingface.co/xinlongwang/SOLO/resolve/main/"

PUBLISHED_WEIGHTS: Tuple[PublishedWeights, ...] = (
    PublishedWeights(
        "mmdet://solov2_r50_fpn_1x_coco",
        _MMDET + "solov2_r50_fpn_1x_coco/solov2_r50_fpn_1x_coco_20220512_125858-a357fa23.pth",
        34.8,
    ),
    PublishedWeights(
        "mmdet://solov2_r50_fpn_ms-3x_coco",
        _MMDET + "solov2_r50_fpn_3x_coco/solov2_r50_fpn_3x_coco_20220512_125856-fed092d4.pth",
        37.5,
    ),
    PublishedWeights(
        "mmdet://solov2_r101-dcn_fpn_ms-3x_coco",
        _MMDET
        + "solov2_r101_dcn_fpn_3x_coco/solov2_r101_dcn_fpn_3x_coco_20220513_214734-16c966cb.pth",
        41.2,
    ),
    PublishedWeights(
        "mmdet://solov2_x101-dcn_fpn_ms-3x_coco",
        _MMDET
        + "solov2_x101_dcn_fpn_3x_coco/solov2_x101_dcn_fpn_3x_coco_20220513_214337-aef41095.pth",
        42.4,
    ),
    PublishedWeights(
        "mmdet://solov2-light_r18_fpn_ms-3x_coco",
        _MMDET
        + "solov2_light_r18_fpn_3x_coco/solov2_light_r18_fpn_3x_coco_20220511_083717-75fa355b.pth",
        29.7,
    ),
    PublishedWeights(
        "mmdet://solov2-light_r50_fpn_ms-3x_coco",
        _MMDET
        + "solov2_light_r50_fpn_3x_coco/solov2_light_r50_fpn_3x_coco_20220512_165256-c93a6074.pth",
        33.7,
    ),
    # Also in mmdetection's configs/solov2/README.md (not in its metafile.yml).
    PublishedWeights(
        "mmdet://solov2_r101_fpn_ms-3x_coco",
        _MMDET + "solov2_r101_fpn_3x_coco/solov2_r101_fpn_3x_coco_20220511_095119-c559a076.pth",
        39.1,
    ),
    PublishedWeights(
        "mmdet://solov2-light_r34_fpn_ms-3x_coco",
        _MMDET
        + "solov2_light_r34_fpn_3x_coco/solov2_light_r34_fpn_3x_coco_20220511_091839-e51659d3.pth",
        31.9,
    ),
    # Official SOLO (github.com/WXinlong/SOLO README, AP on COCO minival): the author's Hugging
    # Face mirror of the README's cloudstor links (huggingface.co/xinlongwang/SOLO).
    *(
        PublishedWeights("solo://" + name, _SOLO + file, ap)
        for name, file, ap in (
            ("SOLOv2_R50_1x", "SOLOv2_R50_1x.pth", 34.8),
            ("SOLOv2_R50_3x", "SOLOv2_R50_3x.pth", 37.5),
            ("SOLOv2_R101_3x", "SOLOv2_R101_3x.pth", 39.1),
            ("SOLOv2_R101_DCN_3x", "SOLOv2_R101_DCN_3x.pth", 41.4),
            ("SOLOv2_X101_DCN_3x", "SOLOv2_X101_DCN_3x.pth", 42.4),
            ("SOLOv2_Light_448_R18_3x", "SOLOv2_LIGHT_448_R18_3x.pth", 29.6),
            ("SOLOv2_Light_448_R34_3x", "SOLOv2_LIGHT_448_R34_3x.pth", 32.0),
            ("SOLOv2_Light_448_R50_3x", "SOLOv2_LIGHT_448_R50_3x.pth", 33.7),
            ("SOLOv2_Light_512_DCN_R50_3x", "SOLOv2_LIGHT_512_DCN_R50_3x.pth", 36.4),
        )
    ),
)

# name -> row. Read at every lookup, so that a test (or a user) may replace a row.
CATALOG: Dict[str, PublishedWeights] = {w.name: w for w in PUBLISHED_WEIGHTS}


def scheme_of(name: str) -> str:
    for scheme in SCHEMES:
        if name.startswith(scheme):
            return scheme
    raise ValueError(
        "{!r} is not a published-weights name (schemes: {})".format(name, ", ".join(SCHEMES))
    )


def lookup(name: str) -> PublishedWeights:
    """The catalog row of ``name``; an unknown name fails listing the known ones."""
    scheme = scheme_of(name)
    if name not in CATALOG:
        known = sorted(n for n in CATALOG if n.startswith(scheme))
        raise ValueError(
            "{!r} is not in solov2_d2's catalog of published weights "
            "(solov2_d2/checkpoint/catalog.py). Known {} names: {}".format(
                name, scheme, ", ".join(known) if known else "none yet"
            )
        )
    return CATALOG[name]


def local_converted_path(downloaded: str) -> str:
    """Where the converted copy of a downloaded file goes: beside it, ``<stem>.solov2_d2.pth``."""
    stem = downloaded[: -len(".pth")] if downloaded.endswith(".pth") else downloaded
    return stem + ".solov2_d2.pth"


class PublishedWeightsHandler(PathHandler):
    """PathManager handler of ``mmdet://`` and ``solo://`` names (module docstring)."""

    def _get_supported_prefixes(self) -> List[str]:
        return list(SCHEMES)

    def _get_local_path(self, path: str, force: bool = False, **kwargs) -> str:
        from .checkpointer import convert_checkpoint_file

        entry = lookup(path)
        downloaded = PathManager.get_local_path(entry.url, force=force, **kwargs)
        converted = local_converted_path(downloaded)
        with file_lock(converted):
            fresh = os.path.isfile(converted) and (
                os.path.getmtime(converted) >= os.path.getmtime(downloaded)
            )
            if force or not fresh:
                logger.info("Converting %s (%s) into %s", path, entry.url, converted)
                convert_checkpoint_file(downloaded, converted, source=path)
        return converted

    def _open(self, path: str, mode: str = "r", buffering: int = -1, **kwargs):
        if mode not in ("r", "rb"):
            raise ValueError("{} is read-only (mode {!r})".format(path, mode))
        return open(self._get_local_path(path, **kwargs), mode)

    def _exists(self, path: str, **kwargs) -> bool:
        return path in CATALOG

    def _isfile(self, path: str, **kwargs) -> bool:
        return path in CATALOG


_handler: Optional[PublishedWeightsHandler] = None


def register_handler() -> None:
    """Registers the handler with Detectron2's PathManager once (done on ``import solov2_d2``)."""
    global _handler
    if _handler is None:
        _handler = PublishedWeightsHandler()
        PathManager.register_handler(_handler)
