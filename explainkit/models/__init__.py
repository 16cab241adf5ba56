"""explainkit's own models: the CIFAR ResNets of :mod:`explainkit.models.resnet`, and
:mod:`explainkit.models.summary`, the model analyzer's layer table.

Every model a run can use, these included, is registered by a plugin (the ``register_models``
hook; explainkit's own ResNets, every torchvision classifier and every timm model come from the
built-in plugin ``explainkit.plugins.default_models``) and built by name through
:meth:`explainkit.registries.Registries.build_model`. Importing this package imports no torch.
"""
