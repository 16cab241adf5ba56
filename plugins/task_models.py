"""Built-in models beyond classification: torchvision's detectors, segmenters and video models.

Three families, registered like any plugin's (``--model PREFIX:NAME``), each with the layer
its maps explain by default and its input policy:

* ``torchvision_detection:NAME`` (Faster R-CNN, RetinaNet, FCOS with a ResNet-50 FPN; SSD300):
  the model normalizes and resizes images itself, so it takes [0, 1] pixels (mean 0, std 1);
  ``image_size`` becomes its ``min_size``/``max_size`` so small images are not blown up to
  800 px. Default layer: the backbone's last stage (``backbone.body.layer4``), on which every
  FPN level and so every detection depends (SSD: ``backbone.features``, its conv4_3 map).
  Explained with :class:`explainkit.explain.targets.Detection`.
* ``torchvision_segmentation:NAME`` (FCN, DeepLabV3, LR-ASPP): ImageNet normalization;
  default layer the backbone's last stage. Explained with
  :class:`explainkit.explain.targets.SegmentationRegion`.
* ``torchvision_video:NAME`` (R3D-18, MC3-18, R(2+1)D-18, S3D): clips (N, C, T, H, W) with
  Kinetics-400 normalization; default layer the last 3-D stage, whose maps are one per frame.

``num_classes`` is the dataset's number of object classes: a detector is built with one
more (torchvision's background class 0), and its labels 1..K are the dataset's 0..K-1.
Every model is built with random weights (``weights=None``,
``weights_backbone=None``): nothing downloads. A torchvision model of these modules that
explainkit cannot explain yet (Mask R-CNN, keypoints, the MobileNet detectors, video
transformers) is refused with one sentence naming those it can.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from explainkit import hookimpl
from explainkit.errors import ConfigError
from explainkit.hookspecs import ModelEntry, ModelFamily

__all__ = ["TASK_MODELS", "register_models", "task_entry"]

KINETICS_MEAN = (0.43216, 0.394666, 0.37645)
KINETICS_STD = (0.22803, 0.22145, 0.216989)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# task -> {name: default layer}: what explainkit explains today.
TASK_MODELS: dict[str, dict[str, str]] = {
    "detection": {
        "fasterrcnn_resnet50_fpn": "backbone.body.layer4",
        "fasterrcnn_resnet50_fpn_v2": "backbone.body.layer4",
        "retinanet_resnet50_fpn": "backbone.body.layer4",
        "retinanet_resnet50_fpn_v2": "backbone.body.layer4",
        "fcos_resnet50_fpn": "backbone.body.layer4",
        "ssd300_vgg16": "backbone.features",
    },
    "segmentation": {
        "fcn_resnet50": "backbone.layer4",
        "fcn_resnet101": "backbone.layer4",
        "deeplabv3_resnet50": "backbone.layer4",
        "deeplabv3_resnet101": "backbone.layer4",
        "deeplabv3_mobilenet_v3_large": "backbone.16",
        "lraspp_mobilenet_v3_large": "backbone.16",
    },
    "video": {
        "r3d_18": "layer4",
        "mc3_18": "layer4",
        "r2plus1d_18": "layer4",
        "s3d": "features.15",
    },
}
INPUT = {  # task -> (input_size, mean, std)
    "detection": (None, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
    "segmentation": (520, IMAGENET_MEAN, IMAGENET_STD),
    "video": (112, KINETICS_MEAN, KINETICS_STD),
}
SUMMARY = {
    "detection": "torchvision detectors (torchvision_detection:fasterrcnn_resnet50_fpn, "
    "retinanet, fcos, ssd300_vgg16), explained per box with the Detection target.",
    "segmentation": "torchvision segmenters (torchvision_segmentation:deeplabv3_resnet50, fcn, "
    "lraspp), explained per class region with the SegmentationRegion target.",
    "video": "torchvision video classifiers (torchvision_video:r3d_18, mc3_18, r2plus1d_18, "
    "s3d) on (N, C, T, H, W) clips: one map per frame.",
}


@hookimpl
def register_models(register: Any) -> None:
    for task in TASK_MODELS:
        register(
            ModelFamily(
                f"torchvision_{task}",
                partial(task_entry, task),
                partial(_torchvision_names, task),
                summary=SUMMARY[task],
            )
        )


def _torchvision_names(task: str) -> list[str]:
    """Every torchvision model of the task's module (supported or not: a name not supported
    is then refused by :func:`task_entry` with what is)."""
    import torchvision

    module = getattr(torchvision.models, task)
    return list(torchvision.models.list_models(module=module))


def task_entry(task: str, name: str) -> ModelEntry:
    """The ModelEntry of ``torchvision_TASK:NAME``.

    Raises:
        KeyError: torchvision has no such model of this task.
        ConfigError: it has, but explainkit cannot explain it yet (one sentence with those
            it can).
    """
    supported = TASK_MODELS[task]
    if name not in supported:
        if name not in _torchvision_names(task):
            raise KeyError(name)
        raise ConfigError(
            f"torchvision_{task}:{name} cannot be explained yet; explainkit explains these "
            f"torchvision {task} models: {', '.join(supported)}"
        )
    size, mean, std = INPUT[task]
    if task == "video" and name == "s3d":
        size = 224
    return ModelEntry(
        f"torchvision_{task}:{name}",
        partial(build_task_model, task, name),
        default_layer=supported[name],
        reshape="nchw" if task != "video" else "auto",
        input_size=size,
        mean=mean,
        std=std,
        summary=SUMMARY[task],
        task=task,
    )


def build_task_model(
    task: str,
    name: str,
    num_classes: int,
    image_size: int | None = None,
    label_names: list[str] | None = None,
) -> Any:
    """torchvision's ``name`` with random weights, its default layer declared on it
    (``default_target_layer``) and its task (``explainkit_task``).

    ``label_names`` (a detector's only): the dataset's classes, for weights trained on COCO
    (torchvision's ``COCO_V1``, 91 category ids): the detector keeps COCO's head and its
    detections are relabelled by name to the dataset's classes, those of other categories
    dropped (:func:`coco_relabelling`). ``evaluate`` passes it when the weights are COCO's.
    """
    import torchvision

    classes = num_classes + 1 if task == "detection" else num_classes  # the background
    lookup = None
    if label_names is not None and task == "detection":
        lookup, ids = coco_relabelling(label_names)
        classes = len(COCO_CATEGORIES())
    kwargs: dict[str, Any] = {"weights": None, "num_classes": classes}
    if task != "video":
        kwargs["weights_backbone"] = None
    if task == "detection" and image_size is not None and not name.startswith("ssd"):
        kwargs.update(min_size=image_size, max_size=image_size)
    if task == "segmentation" and not name.startswith("lraspp"):
        kwargs["aux_loss"] = False
    model = torchvision.models.get_model(name, **kwargs)
    model.default_target_layer = TASK_MODELS[task][name]
    model.explainkit_task = task
    if lookup is not None:
        model.register_forward_hook(partial(_relabelled, lookup))
        model.explainkit_coco_ids = ids
    return model


# VOC's names of COCO categories (the rest match as they are, case and "_" aside)
COCO_ALIASES = {
    "aeroplane": "airplane",
    "diningtable": "dining table",
    "motorbike": "motorcycle",
    "pottedplant": "potted plant",
    "sofa": "couch",
    "tvmonitor": "tv",
}


def COCO_CATEGORIES() -> list[str]:  # noqa: N802 - a constant, read lazily (torchvision)
    from torchvision.models._meta import _COCO_CATEGORIES

    return list(_COCO_CATEGORIES)


def coco_relabelling(label_names: list[str]) -> tuple[Any, list[int]]:
    """(a lookup from COCO category id to 1 + the dataset class of the same name, 0 where
    none; each dataset class's COCO id, 0 where none).

    Raises:
        ConfigError: No class of the dataset names a COCO category.
    """
    import torch

    coco = COCO_CATEGORIES()
    index = {c.lower(): i for i, c in enumerate(coco) if c not in ("__background__", "N/A")}
    ids = []
    for name in label_names:
        key = str(name).strip().lower().replace("_", " ")
        ids.append(index.get(COCO_ALIASES.get(key.replace(" ", ""), key), 0))
    if not any(ids):
        raise ConfigError(
            f"none of the dataset's classes ({', '.join(label_names[:5])}...) is a COCO category "
            "(person, car, dog, ...): COCO weights cannot detect them; give weights trained for "
            "these classes"
        )
    lookup = torch.zeros(len(coco), dtype=torch.long)
    for k, coco_id in enumerate(ids):
        if coco_id:
            lookup[coco_id] = k + 1
    return lookup, ids


def _relabelled(lookup: Any, module: Any, inputs: Any, output: Any) -> Any:
    """A COCO detector's detections with the dataset's labels (1 + class; background 0 as
    every torchvision detector's), those of categories the dataset lacks dropped."""
    if not isinstance(output, list):  # training mode: the losses
        return output
    relabelled = []
    for o in output:
        labels = lookup.to(o["labels"].device)[o["labels"]]
        keep = labels > 0
        relabelled.append({**{k: v[keep] for k, v in o.items()}, "labels": labels[keep]})
    return relabelled
