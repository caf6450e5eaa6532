"""Dataset mapper for SOLOv2: Detectron2's ``DatasetMapper`` with errors that name the file."""
import copy
import logging

from detectron2.data import DatasetMapper

logger = logging.getLogger(__name__)


class SOLOv2DatasetMapper(DatasetMapper):
    """Detectron2's ``DatasetMapper`` (masks on, boxes recomputed from masks after cropping),
    which reports the image file and annotation of any failure instead of a bare traceback."""

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        args = super().from_config(cfg, is_train)
        args["use_instance_mask"] = True
        return args

    def __call__(self, dataset_dict):
        try:
            return super().__call__(copy.deepcopy(dataset_dict))
        except Exception as error:
            file_name = dataset_dict.get("file_name", "<unknown file>")
            raise type(error)(
                "while loading {} (image_id {}): {}".format(
                    file_name, dataset_dict.get("image_id", "?"), error
                )
            ) from error
