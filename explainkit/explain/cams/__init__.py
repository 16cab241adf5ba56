"""The native CAM engine: one template (:mod:`.base`) and small classes per method.

:mod:`explainkit.explain.gradcam` is the public module: it re-exports every method and the
batch helpers (``compute_cam``, ``compute_cams``, ``iter_cam``).
"""
