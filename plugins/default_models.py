"""Built-in models: explainkit's CIFAR ResNets, every torchvision classifier, every timm model.

Registered through the ``register_models`` hook exactly as a third-party plugin would, with
public names only. Nothing is imported at module level beyond explainkit's light modules:
torch, torchvision and timm load when a model is built or a family name is resolved.

* ``resnet18-s8`` and ``resnet18``: explainkit's ResNet18 variants for small images
  (``explainkit.models.resnet``); they take ``width`` (``--width``).
* ``torchvision:NAME``: any of ``torchvision.models.list_models(module=torchvision.models)``,
  built with random weights; ``--weights IMAGENET1K_V1`` (or ``ResNet50_Weights.IMAGENET1K_V1``)
  downloads torchvision's pretrained weights. ViTs take ``image_size`` (``--image-size``).
* ``timm:NAME``: any of ``timm.list_models()`` when timm is installed (``pip install
  explainkit[timm]``).
* ``hf:FOLDER``: a HuggingFace transformers image classifier, object detector
  (``...ForObjectDetection``: DETR, YOLOS, ...) or semantic segmenter
  (``...ForSemanticSegmentation``: SegFormer, ...) saved with ``save_pretrained`` in a local
  folder (``pip install explainkit[transformers]``); nothing is downloaded and no code from
  the folder runs (``trust_remote_code`` stays off). The architecture named in its
  config.json sets the entry's task; outputs are adapted by
  :func:`explainkit.explain.outputs.scores_of` and :mod:`explainkit.task_eval`.
* ``import:package.module:factory``: a model by import path, built as
  ``factory(num_classes=N, **kwargs)``: what ``explainkit.evaluate`` and ``RunWriter`` record
  for a module that no plugin registered, so that its run can rebuild it.
"""

from __future__ import annotations

import importlib
import inspect
from functools import partial
from typing import Any

from explainkit import hookimpl
from explainkit.errors import ConfigError
from explainkit.hookspecs import ModelEntry, ModelFamily

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "hf_entry",
    "import_entry",
    "register_models",
    "timm_entry",
    "timm_names",
    "torchvision_entry",
    "torchvision_layer",
    "torchvision_names",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
TIMM_MISSING = "timm models need timm: pip install explainkit[timm]"
# What to do with a run written from a module that cannot be rebuilt (a notebook's model).
LIVE_MODULE_HINT = (
    "or analyze the run from Python with the module: explainkit.analyze(run, model=module)"
)


@hookimpl
def register_models(register: Any) -> None:
    register(
        ModelEntry(
            "resnet18-s8",
            _resnet18_s8,
            default_layer="layer4",
            reshape="nchw",
            input_size=32,
            summary="The seed's ResNet18 for small images: 8x8 last stage, 2x2-pooled head "
            "(takes --width).",
        )
    )
    register(
        ModelEntry(
            "resnet18",
            _resnet18,
            default_layer="layer4",
            reshape="nchw",
            input_size=32,
            summary="The common CIFAR ResNet18: last stage at stride 2, global pooling "
            "(takes --width).",
        )
    )
    register(
        ModelFamily(
            "torchvision",
            torchvision_entry,
            torchvision_names,
            summary="Every torchvision classification model (torchvision:resnet50, "
            "torchvision:vit_b_16, ...); --weights IMAGENET1K_V1 for pretrained weights.",
        )
    )
    register(
        ModelFamily(
            "timm",
            timm_entry,
            timm_names,
            summary="Every timm model (timm:convnext_tiny, ...), when timm is installed "
            "(pip install explainkit[timm]).",
        )
    )
    register(
        ModelFamily(
            "hf",
            hf_entry,
            list,  # any save_pretrained folder: there is no list to suggest from
            summary="A HuggingFace transformers image classifier, object detector or semantic "
            "segmenter saved with save_pretrained in a local folder (hf:path/to/folder; pip "
            "install explainkit[transformers]).",
        )
    )
    register(
        ModelFamily(
            "import",
            import_entry,
            list,  # any importable factory: there is no list to suggest from
            summary="Any model by import path (import:package.module:factory), built as "
            "factory(num_classes=N, **kwargs); what explainkit.evaluate records for a module "
            "no plugin registered.",
        )
    )


# -- explainkit's ResNets --------------------------------------------------------------------


def _resnet18_s8(num_classes: int, width: int = 64) -> Any:
    from explainkit.models.resnet import resnet18_s8

    return resnet18_s8(num_classes=num_classes, width=width)


def _resnet18(num_classes: int, width: int = 64) -> Any:
    from explainkit.models.resnet import resnet18

    return resnet18(num_classes=num_classes, width=width)


# -- torchvision ---------------------------------------------------------------------------


def torchvision_names() -> list[str]:
    """Every torchvision classification model (not detection, segmentation, video...)."""
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def torchvision_entry(name: str) -> ModelEntry:
    """The ModelEntry of ``torchvision:NAME``; KeyError for a name torchvision lacks."""
    if name not in torchvision_names():
        raise KeyError(name)
    layer, reshape = torchvision_layer(name)
    if name.startswith("vit_"):  # a ViT's position embedding is sized for one image size
        build: Any = partial(_build_torchvision_vit, name)
    else:
        build = partial(_build_torchvision, name)
    crop, resize = _torchvision_input_size(name)
    return ModelEntry(
        f"torchvision:{name}",
        build,
        default_layer=layer,
        reshape=reshape,
        input_size=crop,
        resize_size=resize,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        summary=f"torchvision's {name}",
        weights=partial(_torchvision_weights, name),
    )


def _build_torchvision(name: str, num_classes: int) -> Any:
    import torchvision

    return torchvision.models.get_model(name, weights=None, num_classes=num_classes)


def _build_torchvision_vit(name: str, num_classes: int, image_size: int = 224) -> Any:
    import torchvision

    return torchvision.models.get_model(
        name, weights=None, num_classes=num_classes, image_size=image_size
    )


def torchvision_layer(name: str) -> tuple[str | None, str | None]:
    """(default_layer, reshape) of a torchvision model: its last stage, or (None, None) to
    let explainkit locate one when training starts."""
    if name.startswith(("resnet", "resnext", "wide_resnet")):
        return "layer4", "nchw"
    if name.startswith("vit_"):
        # The last block's first LayerNorm: after that block's attention only the class
        # token reaches the logits, so later outputs have no gradient on the patch tokens.
        blocks = [
            n for n, _ in _meta_model(name).named_modules() if n.startswith("encoder.layers.")
        ]
        last = max(int(n.split(".")[2].rsplit("_", 1)[1]) for n in blocks)
        return f"encoder.layers.encoder_layer_{last}.ln_1", "vit"
    if name.startswith(("swin_", "convnext_")):
        last = len(_meta_model(name).features) - 1
        return f"features.{last}", "swin" if name.startswith("swin_") else "nchw"
    if name.startswith(("efficientnet_", "mobilenet_", "densenet", "vgg")):
        return "features", "nchw"
    return None, None


def _meta_model(name: str) -> Any:
    """The architecture without memory (the meta device), to read its module names."""
    import torch

    with torch.device("meta"):
        return _build_torchvision(name, 10)


def _torchvision_input_size(name: str) -> tuple[int | None, int | None]:
    """(crop size, shorter side before the crop) of the model's default pretrained weights'
    transforms (224 and 232 for resnet50's V2 weights; 299 and 342 for Inception), read from
    torchvision's metadata (no download)."""
    from torchvision.models import get_model_weights

    try:
        transforms = get_model_weights(name).DEFAULT.transforms()
        crop, resize = transforms.crop_size, transforms.resize_size
    except (ValueError, KeyError, AttributeError, TypeError):
        return None, None
    return (int(crop[0]) if crop else None), (int(resize[0]) if resize else None)


def _torchvision_weights(model: str, weights: str) -> Any:
    """The state_dict of torchvision weights ``weights`` (``IMAGENET1K_V1``, ``DEFAULT`` or
    ``ResNet18_Weights.IMAGENET1K_V1``) of ``model``; downloads on first use (OSError when it
    cannot), then reads torch hub's cache."""
    from torchvision.models import get_model_weights, get_weight

    enum = get_model_weights(model)
    known = ", ".join(enum.__members__)
    try:
        chosen = get_weight(weights) if "." in weights else enum[weights]
    except (KeyError, ValueError, AttributeError, TypeError):
        chosen = None
    if chosen is None or type(chosen) is not enum:
        raise ConfigError(
            f"--weights {weights!r} are not weights of torchvision:{model}; its weights: "
            f"{known} (or a state_dict file)"
        )
    return chosen.get_state_dict(progress=False, check_hash=True)


# -- timm ----------------------------------------------------------------------------------


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise ConfigError(TIMM_MISSING) from None
    return timm


def timm_names() -> list[str]:
    """Every model timm can create (ConfigError when timm is not installed)."""
    return list(_timm().list_models())


def timm_entry(name: str) -> ModelEntry:
    """The ModelEntry of ``timm:NAME``; KeyError for a name timm lacks."""
    timm = _timm()
    if not timm.is_model(name):
        raise KeyError(name)
    layer, reshape, cfg, sized = _timm_layout(name)
    build: Any = partial(_build_timm_sized if sized else _build_timm, name)
    size = cfg.get("input_size")
    crop_pct = cfg.get("crop_pct")
    resize = int(size[-1] / crop_pct) if size and isinstance(crop_pct, float) and crop_pct else None
    return ModelEntry(
        f"timm:{name}",
        build,
        default_layer=layer,
        reshape=reshape,
        input_size=int(size[-1]) if size else None,
        resize_size=resize,
        mean=_three(cfg.get("mean")),
        std=_three(cfg.get("std")),
        summary=f"timm's {name}",
    )


def _build_timm(name: str, num_classes: int) -> Any:
    return _timm().create_model(name, pretrained=False, num_classes=num_classes)


def _build_timm_sized(name: str, num_classes: int, image_size: int = 224) -> Any:
    return _timm().create_model(
        name, pretrained=False, num_classes=num_classes, img_size=image_size
    )


def _timm_layout(name: str) -> tuple[str | None, str | None, dict, bool]:
    """(default_layer, reshape, pretrained config, takes img_size) read from the architecture
    built on the meta device; (None, None, {}, False) when it cannot be built there: its
    default layer is then located when training starts."""
    import torch

    try:
        with torch.device("meta"):
            model = _build_timm(name, 10)
    except Exception:  # some architectures compute shapes from data: locate a layer later
        return None, None, {}, False
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    # Transformers size their position embeddings (or windows) for one image size.
    sized = "img_size" in inspect.signature(type(model).__init__).parameters
    blocks = getattr(model, "blocks", None)
    if hasattr(model, "cls_token") and blocks is not None and len(blocks):
        return f"blocks.{len(blocks) - 1}.norm1", "vit", cfg, sized
    info = getattr(model, "feature_info", None)
    try:
        last = info[-1]["module"] if info else None
    except (TypeError, KeyError, IndexError):
        last = None
    if not isinstance(last, str) or last not in dict(model.named_modules()):
        return None, None, cfg, sized
    swin = "swin" in type(model).__name__.lower()
    return last, "swin" if swin else "nchw", cfg, sized


def _three(values: Any) -> tuple[float, ...] | None:
    if isinstance(values, (list, tuple)) and len(values) == 3:
        return tuple(float(v) for v in values)
    return None


# -- HuggingFace transformers (local save_pretrained folders) -------------------------------

TRANSFORMERS_MISSING = (
    "hf: models need transformers: pip install explainkit[transformers] (or transformers)"
)
HF_OWN_WEIGHTS = "SAVED"  # what evaluate loads when --weights is not given: the folder's own


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ConfigError(TRANSFORMERS_MISSING) from None
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    return transformers


def hf_entry(path: str) -> ModelEntry:
    """The ModelEntry of ``hf:FOLDER``, a ``save_pretrained`` folder of an image classifier.

    Read offline (``local_files_only``): a folder without ``config.json`` is one sentence,
    never a download. ``--weights`` defaults to the folder's own (``SAVED``).
    """
    import json
    from pathlib import Path

    folder = Path(path).expanduser().resolve()
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"model hf:{path}: {folder} is not a folder written by save_pretrained (it has no "
            "config.json); hf: takes a local folder, nothing is downloaded"
        )
    transformers = _transformers()
    try:
        config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"model hf:{path}: its config.json cannot be read ({e})") from None
    task = hf_task(config)
    layer, reshape = _hf_layout(config, task)
    size = getattr(config, "image_size", None)
    mean = std = None
    processor = folder / "preprocessor_config.json"
    if processor.is_file():
        try:
            settings = json.loads(processor.read_text())
        except (OSError, ValueError):
            settings = {}
        mean, std = _three(settings.get("image_mean")), _three(settings.get("image_std"))
    return ModelEntry(
        f"hf:{folder}",
        partial(_build_hf, str(folder)),
        default_layer=layer,
        reshape=reshape,
        input_size=size if isinstance(size, int) and not isinstance(size, bool) else None,
        mean=mean,
        std=std,
        summary=f"transformers {type(config).__name__} in {folder} ({task})",
        weights=partial(_hf_weights, str(folder)),
        own_weights=HF_OWN_WEIGHTS,
        task=task,
    )


# transformers' class-name endings -> (task, the Auto class that builds them)
HF_TASKS = {
    "ForObjectDetection": ("detection", "AutoModelForObjectDetection"),
    "ForSemanticSegmentation": ("segmentation", "AutoModelForSemanticSegmentation"),
    "ForImageClassification": ("classification", "AutoModelForImageClassification"),
}


def hf_task(config: Any) -> str:
    """The task of the architecture a transformers config.json names (classification when
    it names none); ConfigError for one explainkit cannot evaluate."""
    names = getattr(config, "architectures", None) or ["ForImageClassification"]
    for ending, (task, _) in HF_TASKS.items():
        if str(names[0]).endswith(ending):
            return task
    if "For" not in str(names[0]):  # a bare backbone (ViTModel): a classifier head is built
        return "classification"
    raise ConfigError(
        f"hf: model {names[0]} is not an image classifier, object detector or semantic "
        "segmenter (architectures ending in ForImageClassification, ForObjectDetection or "
        "ForSemanticSegmentation); explainkit cannot evaluate it yet"
    )


def _auto_class(task: str) -> Any:
    return getattr(_transformers(), {t: c for t, c in HF_TASKS.values()}[task])


def _hf_layout(config: Any, task: str) -> tuple[str | None, str | None]:
    """(default_layer, reshape) of a transformers model built on the meta device: a
    segmenter's decode head's fusing convolution (SegFormer's ``decode_head.linear_fuse``),
    else :func:`explainkit.explain.image.transformer_layer` (a detector's CNN backbone's last
    stage, DETR's); (None, None) lets explainkit locate one."""
    import torch

    from explainkit.explain.image import transformer_layer

    try:
        with torch.device("meta"):
            model = _auto_class(task).from_config(config)
    except Exception:  # an architecture that cannot be built on the meta device
        return None, None
    names = dict(model.named_modules())
    if task == "segmentation" and isinstance(names.get("decode_head.linear_fuse"), torch.nn.Conv2d):
        return "decode_head.linear_fuse", "nchw"
    layer, reshape = transformer_layer(model)
    if task == "detection" and reshape != "nchw":  # a ViT's detection tokens are not a map
        return None, None
    return layer, reshape


def _build_hf(folder: str, num_classes: int) -> Any:
    """The folder's architecture with random weights and a ``num_classes`` head (a
    detector's "no object" class is its own, beyond them)."""
    transformers = _transformers()
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    if config.num_labels != num_classes:
        config.num_labels = num_classes
    return _auto_class(hf_task(config)).from_config(config)


def _hf_weights(folder: str, name: str) -> Any:
    """The folder's own weights (``SAVED``); KeyError for any other name."""
    if name != HF_OWN_WEIGHTS:
        raise KeyError(name)
    transformers = _transformers()
    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    model = _auto_class(hf_task(config)).from_pretrained(folder, local_files_only=True)
    return model.state_dict()


# -- import paths --------------------------------------------------------------------------


def import_entry(path: str) -> ModelEntry:
    """The ModelEntry of ``import:package.module:factory``.

    ``factory`` (a class or function, dots reach nested attributes) must name a
    ``num_classes`` parameter: explainkit always passes it, so a run's recorded arguments can
    never make an unrelated function do something else. Only modules importable here
    (installed, or on ``sys.path``) are imported; a run directory never adds to that.
    """
    module_name, colon, attribute = path.partition(":")
    if not (colon and module_name and attribute):
        raise ConfigError(
            f"model import:{path} is not an import path; write import:package.module:factory"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            f"model import:{path} cannot be built here: module {module_name!r} is not "
            f"importable ({e}); install the package that defines it, {LIVE_MODULE_HINT}"
        ) from None
    factory: Any = module
    for part in attribute.split("."):
        factory = getattr(factory, part, None)
    if not callable(factory) or "num_classes" not in _parameters(factory):
        raise ConfigError(
            f"model import:{path} cannot be built: {attribute} of {module_name} is not a class "
            f"or function taking num_classes; {LIVE_MODULE_HINT}"
        )
    return ModelEntry(
        f"import:{path}", partial(_build_imported, factory), summary=f"{attribute} of {module_name}"
    )


def _parameters(factory: Any) -> list[str]:
    """The parameter names ``factory`` takes by keyword (a class: its ``__init__``'s)."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature
        return []
    return [p.name for p in params if p.kind in kinds]


def _build_imported(factory: Any, num_classes: int, **kwargs: Any) -> Any:
    return factory(num_classes=num_classes, **kwargs)
