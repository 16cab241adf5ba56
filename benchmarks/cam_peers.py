"""Every native CAM and its peers' versions, as ``fn(x) -> maps`` for the round-robin table.

Each peer object is built inside the timed call and released after it: pytorch-grad-cam and
torch-cam hook the model when built, and a peer left hooked would run its hooks (and copy
activations to the CPU) during every other method's forward pass. Building costs a hook
registration, which is part of what a user pays per call anyway.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F

# native name -> pytorch-grad-cam class, torch-cam class, Captum (LayerGradCam) or None
PEERS: dict[str, tuple[str | None, str | None, bool]] = {
    "gradcam": ("GradCAM", "GradCAM", True),
    "gradcampp": ("GradCAMPlusPlus", "GradCAMpp", False),
    "xgradcam": ("XGradCAM", "XGradCAM", False),
    "layercam": ("LayerCAM", "LayerCAM", False),
    "hirescam": ("HiResCAM", None, False),
    "gradcam_elementwise": ("GradCAMElementWise", None, False),
    "eigencam": ("EigenCAM", None, False),
    "eigengradcam": ("EigenGradCAM", None, False),
    "kpcacam": ("KPCA_CAM", None, False),
    "fem": ("FEM", None, False),
    "shapleycam": ("ShapleyCAM", None, False),
    "finercam": ("FinerCAM", None, False),
    "fullgrad": ("FullGrad", None, False),
    "randomcam": ("RandomCAM", None, False),
    "smoothgradcampp": (None, "SmoothGradCAMpp", False),
    "dff": (None, None, False),  # pytorch-grad-cam's DFF returns concepts, not class maps
}


def _upsample(maps: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(maps[:, None].float(), size=(size, size), mode="bilinear")[:, 0]


def peer_fns(
    method: str, model: torch.nn.Module, layer: str, target_of: Callable, size: int
) -> dict[str, Callable]:
    """The installed peers of ``method``: library name -> ``fn(x) -> (N, size, size)``."""
    module = dict(model.named_modules())[layer]
    pgc_name, tc_name, captum = PEERS[method]
    out: dict[str, Callable] = {}
    if pgc_name and importlib.util.find_spec("pytorch_grad_cam"):
        import pytorch_grad_cam
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        cls = getattr(pytorch_grad_cam, pgc_name)
        layers = [] if method == "fullgrad" else [module]

        def pgc_fn(x, cls=cls, layers=layers):
            # Finer-CAM chooses its own contrast from the prediction, as ours does
            ts = None if method == "finercam" else [ClassifierOutputTarget(int(c))
                                                    for c in target_of(x)]  # fmt: skip
            with cls(model, layers) as cam:
                return torch.from_numpy(cam(input_tensor=x, targets=ts))

        out["pytorch-grad-cam"] = pgc_fn
    if tc_name and importlib.util.find_spec("torchcam"):
        import torchcam.methods

        tc_cls = getattr(torchcam.methods, tc_name)

        def torchcam_fn(x, tc_cls=tc_cls):
            extractor = tc_cls(model, target_layer=layer)
            try:
                (maps,) = extractor(class_idx=target_of(x).tolist(), scores=model(x))
            finally:
                extractor.remove_hooks()
            return _upsample(maps.detach(), size)

        out["torch-cam"] = torchcam_fn
    if captum and importlib.util.find_spec("captum"):
        from captum.attr import LayerGradCam

        def captum_fn(x):
            a = LayerGradCam(model, module).attribute(x, target=target_of(x),
                                                      relu_attributions=True)  # fmt: skip
            return _upsample(a[:, 0].detach(), size)

        out["Captum"] = captum_fn
    return out
