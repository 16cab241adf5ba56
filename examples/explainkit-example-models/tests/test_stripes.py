"""The example's model and dataset through explainkit's registries (run with the package
installed, or from this folder: `python -m pytest tests`)."""

from __future__ import annotations

import numpy as np

from explainkit.data import load_dataset
from explainkit.manager import build_registries, get_plugin_manager


def _registries():
    import explainkit_example_models

    pm = get_plugin_manager(entrypoints=False, quiet=True)
    pm.register(explainkit_example_models, "stripes")
    return build_registries(pm)


def test_the_dataset_draws_masked_stripes_of_three_directions():
    registries = _registries()
    ds = load_dataset("stripes", "eval", image_size=24, seed=3, limit=30, registries=registries)
    assert ds.images.shape == (30, 24, 24, 3) and ds.masks.shape == (30, 24, 24)
    assert set(ds.targets) <= {0, 1, 2} and ds.masks.any(axis=(1, 2)).all()
    again = load_dataset("stripes", "eval", image_size=24, seed=3, limit=30, registries=registries)
    assert np.array_equal(ds.images, again.images)  # seeded


def test_the_model_builds_with_its_width_and_default_layer():
    model = _registries().build_model("stripes-cnn", num_classes=3, width=4)
    assert "blocks.3" in dict(model.named_modules())
    assert model.head.out_features == 3 and model.head.in_features == 16
