"""Which attribution methods explainkit knows: names, labels and how each becomes a map.

The one list of method names. It imports no torch, so analyzers offer these names as option
choices without making ``explainkit plugins`` slow; :mod:`explainkit.explain.attribution`
runs them and :mod:`explainkit.explain.gradcam` implements the native CAMs (one entry per
line: other modules register their methods beside these).

How a method's (N, C, H, W) pixel attributions become one map is decided here, once per
method (:attr:`Method.reduction`):

- ``max_abs``: the largest absolute value over channels (Saliency, as Simonyan et al. 2014);
- ``sum_abs``: the sum of absolute values over channels (Integrated Gradients, Guided
  Grad-CAM, Guided Backprop, Input x Gradient, Occlusion);
- ``map``: the method already returns one map per image (the CAMs, the perturbation CAMs,
  RISE, the random baseline).

Captum is optional: its methods are available only when it can be imported.

SmoothGrad (Smilkov et al. 2017) wraps any method: ``smoothgrad:NAME`` averages NAME over
noisy copies of each image (Captum's ``NoiseTunnel`` for Captum methods); it is derived on
lookup (``METHODS["smoothgrad:saliency"]``), not listed.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from explainkit.errors import AnalyzerError

__all__ = [
    "CAM_METHODS",
    "CAPTUM_METHODS",
    "METHODS",
    "PERTURBATION_METHODS",
    "SMOOTHGRAD",
    "Method",
    "available_methods",
    "captum_available",
    "parse_methods",
]


@dataclass(frozen=True)
class Method:
    """What explainkit knows about one attribution method.

    Attributes:
        name: Key used on the command line (``gradcam``, ``integrated_gradients``).
        label: Name in figures and tables.
        short: Column header that fits a 128-px tile.
        source: ``native`` (explainkit's gradient CAM engine), ``perturbation``
            (:mod:`explainkit.explain.perturbation`), ``captum`` or ``baseline``.
        reduction: How (N, C, H, W) attributions become (N, H, W): ``map``, ``max_abs`` or
            ``sum_abs``.
        uses_layer: Whether the method explains a target layer.
    """

    name: str
    label: str
    short: str
    source: str
    reduction: str
    uses_layer: bool = False


def _registry() -> dict[str, Method]:
    cams = [
        Method("gradcam", "Grad-CAM", "Grad-CAM", "native", "map", True),
        Method("gradcampp", "Grad-CAM++", "Grad-CAM++", "native", "map", True),
        Method("xgradcam", "XGrad-CAM", "XGrad-CAM", "native", "map", True),
        Method("layercam", "LayerCAM", "LayerCAM", "native", "map", True),
        Method("hirescam", "HiResCAM", "HiResCAM", "native", "map", True),
        Method(
            "gradcam_elementwise", "Grad-CAM element-wise", "Grad-CAM EW", "native", "map", True
        ),
        Method("eigencam", "Eigen-CAM", "Eigen-CAM", "native", "map", True),
        Method("eigengradcam", "EigenGrad-CAM", "EigenGrad-CAM", "native", "map", True),
        Method("kpcacam", "KPCA-CAM", "KPCA-CAM", "native", "map", True),
        Method("fem", "FEM", "FEM", "native", "map", True),
        Method("shapleycam", "ShapleyCAM", "ShapleyCAM", "native", "map", True),
        Method("finercam", "Finer-CAM", "Finer-CAM", "native", "map", True),
        Method("randomcam", "Random CAM", "Random CAM", "native", "map", True),
        Method("fullgrad", "FullGrad", "FullGrad", "native", "map"),  # every bias layer
        Method("smoothgradcampp", "Smooth Grad-CAM++", "Smooth G-CAM++", "native", "map", True),
        Method("legrad", "LeGrad", "LeGrad", "native", "map", True),  # from a ViT block on
        Method("dff", "Deep Feature Factorization", "DFF", "native", "map", True),
    ]
    captum = [
        Method("saliency", "Saliency", "Saliency", "captum", "max_abs"),
        Method(
            "integrated_gradients", "Integrated Gradients", "Integrated Grad.", "captum", "sum_abs"
        ),
        Method("guided_gradcam", "Guided Grad-CAM", "Guided Grad-CAM", "captum", "sum_abs", True),
        Method("occlusion", "Occlusion", "Occlusion", "captum", "sum_abs"),
        Method("input_x_gradient", "Input x Gradient", "Input x Grad.", "captum", "sum_abs"),
        Method("guided_backprop", "Guided Backprop", "Guided Backprop", "captum", "sum_abs"),
        Method("deeplift", "DeepLift", "DeepLift", "captum", "sum_abs"),
        Method("gradient_shap", "GradientShap", "GradientShap", "captum", "sum_abs"),
        Method("lrp", "LRP", "LRP", "captum", "sum_abs"),
    ]
    perturbation = [
        Method("scorecam", "Score-CAM", "Score-CAM", "perturbation", "map", True),
        Method("sscam", "SS-CAM", "SS-CAM", "perturbation", "map", True),
        Method("iscam", "IS-CAM", "IS-CAM", "perturbation", "map", True),
        Method("ablationcam", "Ablation-CAM", "Ablation-CAM", "perturbation", "map", True),
        Method("rise", "RISE", "RISE", "perturbation", "map"),
    ]
    baseline = [Method("random", "Random baseline", "Random", "baseline", "map")]
    return {m.name: m for m in (*cams, *captum, *perturbation, *baseline)}


SMOOTHGRAD = "smoothgrad:"


class _Registry(dict):
    """The method table; ``smoothgrad:NAME`` of a listed NAME is derived when looked up."""

    def __missing__(self, key: str) -> Method:
        base = key[len(SMOOTHGRAD) :] if isinstance(key, str) else ""
        if not key.startswith(SMOOTHGRAD) or base.startswith(SMOOTHGRAD) or base not in self:
            raise KeyError(key)
        inner = self[base]
        return Method(key, f"SmoothGrad {inner.label}", f"SG {inner.short}", inner.source,
                      inner.reduction, inner.uses_layer)  # fmt: skip

    def __contains__(self, key: object) -> bool:
        if dict.__contains__(self, key):
            return True
        try:
            self[key]  # type: ignore[index]
        except KeyError:
            return False
        return True


METHODS: dict[str, Method] = _Registry(_registry())
CAM_METHODS = tuple(n for n, m in METHODS.items() if m.source == "native")
CAPTUM_METHODS = tuple(n for n, m in METHODS.items() if m.source == "captum")
PERTURBATION_METHODS = tuple(n for n, m in METHODS.items() if m.source == "perturbation")


def captum_available() -> bool:
    """Whether Captum can be imported (its methods are optional)."""
    return importlib.util.find_spec("captum") is not None


def available_methods() -> list[str]:
    """Every method that can run here, in registry order."""
    have_captum = captum_available()
    return [n for n, m in METHODS.items() if m.source != "captum" or have_captum]


def parse_methods(text: str, flag: str, allowed: list[str] | None = None) -> list[str]:
    """A comma list of method names -> known names, in order, without duplicates.

    Raises:
        AnalyzerError: An unknown name, a Captum method without Captum, or an empty list.
    """
    allowed = available_methods() if allowed is None else allowed
    names = [n.strip().lower().replace("-", "_") for n in str(text).split(",") if n.strip()]
    if not names:
        raise AnalyzerError(f"{flag} names no method; choose from: {', '.join(allowed)}")
    for name in names:
        if name in allowed or (
            name.startswith(SMOOTHGRAD) and name[len(SMOOTHGRAD) :] in allowed and name in METHODS
        ):
            continue
        if name in METHODS and METHODS[name].source == "captum" and not captum_available():
            raise AnalyzerError(
                f"{flag} {name} needs Captum, which is not installed; pip install captum or "
                "leave it out"
            )
        raise AnalyzerError(f"{flag}: unknown method {name!r}; choose from: {', '.join(allowed)}")
    return list(dict.fromkeys(names))
