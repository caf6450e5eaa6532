#!/usr/bin/env python
"""Train and evaluate SOLOv2 with Detectron2's standard trainer flow.

python train_net.py --config-file configs/SOLOv2_R50_1x.yaml --num-gpus 8
python train_net.py --config-file configs/SOLOv2_R50_1x.yaml --num-gpus 8 --num-machines 2 \
    --machine-rank 0 --dist-url tcp://HOST:PORT  (and --machine-rank 1 on the other machine)
python train_net.py --config-file configs/SOLOv2_R50_1x.yaml --eval-only MODEL.WEIGHTS model.pth

MODEL.WEIGHTS may also be an mmdetection or official SOLO SOLOv2 checkpoint, or a published name
such as mmdet://solov2_r50_fpn_1x_coco (README, "Loading published weights").
"""

import os

from detectron2.config import get_cfg
from detectron2.data import build_detection_test_loader
from detectron2.engine import DefaultTrainer, default_argument_parser, default_setup
from detectron2.evaluation import DatasetEvaluators, verify_results
from detectron2.utils import comm

from solov2_d2 import add_solov2_config
from solov2_d2.checkpoint import SOLOv2Checkpointer
from solov2_d2.compat import build_coco_evaluator, launch
from solov2_d2.data import SOLOv2DatasetMapper
from solov2_d2.data.checks import get_dataset_dicts
from solov2_d2.engine import SOLOv2TrainerMixin, build_optimizer, build_resumable_train_loader
from solov2_d2.memory import retain_freed_memory


class Trainer(SOLOv2TrainerMixin, DefaultTrainer):
    """DefaultTrainer with SOLOv2's loaders and evaluator. The mixin keeps the optimizer state in
    checkpoints, makes ``--resume`` continue with the very batches of an uninterrupted run, and
    names the loss term of a NaN/inf loss (solov2_d2/engine)."""

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        """COCO segm AP, and bbox AP of the tight boxes of the predicted masks."""
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        return DatasetEvaluators([build_coco_evaluator(dataset_name, output_folder)])

    @classmethod
    def build_optimizer(cls, cfg, model):
        """Detectron2's SGD, or AdamW with the same parameter groups (SOLVER.OPTIMIZER)."""
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        """Checked dataset dicts (solov2_d2/data/checks.py) in a loader that resumes exactly."""
        return build_resumable_train_loader(cfg, mapper=SOLOv2DatasetMapper(cfg, is_train=True))

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """The checked dataset (empty split, class count, missing files) in Detectron2's loader."""
        dataset = get_dataset_dicts(
            dataset_name, training=False, num_classes=cfg.MODEL.SOLOV2.NUM_CLASSES
        )
        return build_detection_test_loader(
            dataset,
            mapper=SOLOv2DatasetMapper(cfg, is_train=False),
            num_workers=cfg.DATALOADER.NUM_WORKERS,
        )


def _merged_config(args):
    cfg = get_cfg()
    add_solov2_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    return cfg


def setup(args):
    cfg = _merged_config(args)
    cfg.freeze()
    default_setup(cfg, args)
    return cfg


def main(args):
    # Large activations reuse freed memory instead of being faulted in on every iteration
    # (solov2_d2/memory.py; SOLOV2_D2_RETAIN_FREED_MEMORY=0 keeps glibc's defaults).
    retain_freed_memory()
    cfg = setup(args)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        # MODEL.WEIGHTS: ours, AdelaiDet's, mmdetection's or official SOLO's (converted in memory).
        SOLOv2Checkpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        results = Trainer.test(cfg, model)
        if comm.is_main_process():
            verify_results(cfg, results)
        return results

    trainer = Trainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def launch_main(args, main_func=main):
    """``main_func(args)`` in ``args.num_gpus`` processes per machine (``--num-machines``,
    ``--machine-rank``, ``--dist-url``): NCCL on GPUs, gloo on CPUs (MODEL.DEVICE cpu, or no
    CUDA), through ``solov2_d2.compat.launch``."""
    cpu = _merged_config(args).MODEL.DEVICE == "cpu"
    launch(
        main_func,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
        backend="gloo" if cpu else None,
    )


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch_main(args)
