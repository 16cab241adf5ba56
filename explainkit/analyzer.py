"""The analyzer contract that plugins import: Option, Analyzer and AnalysisContext.

An analyzer is a class: a name, a one-line summary, options declared as data, what it needs
from the run, and ``run(context, *, <its options>)`` returning artifact records. Everything
around it (choosing analyzers, checking needs, the output folder, the manifest, failures)
belongs to the host, :mod:`explainkit.runner`; this module imports no host module, so a
plugin that imports it pulls in nothing but the standard library and click.

Only the standard library and click are imported at module level; torch and numpy are
imported when a context first needs them.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import click

from explainkit.errors import AnalyzerError, PluginError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from explainkit.data import Dataset
    from explainkit.registries import Registries
    from explainkit.sharding import Shard
    from explainkit.store import StoreReader

__all__ = [
    "ARTIFACT_KINDS",
    "NEEDS",
    "AnalysisContext",
    "Analyzer",
    "Option",
    "RunResources",
    "check_analyzer_class",
]

ARTIFACT_KINDS = ("image", "table", "json", "h5")
NEEDS = ("store", "checkpoint", "masks")
NAME_PATTERN = re.compile(r"^[a-z][a-z0-9_]*$")
# Written by the host next to an analyzer's files; an artifact may not take these names.
RESERVED_NAMES = ("manifest.json", "failed.json")

log = logging.getLogger("explainkit")


@dataclass(frozen=True)
class Option:
    """One analyzer option, declared as data so it can be listed, documented and validated.

    On the command line it becomes ``--<analyzer>-<name with _ as ->``; from Python it is the
    keyword ``<analyzer>_<name>``; ``run()`` receives it as the keyword ``<name>``.

    Attributes:
        name: Python identifier, e.g. ``"count"``.
        type: A click type (``click.IntRange(1)``) or a Python type (``int``, ``str``, ``bool``).
        default: Value used when the option is not given (the only place it is declared).
        help: One line for ``--help`` and ``explainkit plugins``.
        choices: Allowed string values (makes the type a ``click.Choice``).
    """

    name: str
    type: Any = str
    default: Any = None
    help: str = ""
    choices: tuple[str, ...] | None = None

    def click_type(self) -> click.ParamType:
        """The click type that validates and converts this option's values."""
        if self.choices:
            return click.Choice(list(self.choices))
        return click.types.convert_type(self.type, self.default)

    def is_flag(self) -> bool:
        return self.type is bool or isinstance(self.type, click.types.BoolParamType)

    def flag(self, analyzer: str) -> str:
        """The CLI flag, e.g. ``--gallery-count``."""
        return f"--{analyzer}-{self.name}".replace("_", "-")

    def key(self, analyzer: str) -> str:
        """The Python keyword / click parameter name, e.g. ``gallery_count``."""
        return f"{analyzer}_{self.name}"

    def convert(self, value: Any, analyzer: str) -> Any:
        """Validate ``value`` with the declared type; AnalyzerError names analyzer and option."""
        if value is None:
            return None
        try:
            return self.click_type().convert(value, None, None)
        except click.BadParameter as e:
            raise AnalyzerError(
                f"invalid value for {analyzer} option {self.name!r} ({self.flag(analyzer)}): "
                f"{e.message}"
            ) from e

    def describe(self, analyzer: str) -> dict[str, Any]:
        """JSON-friendly schema for ``explainkit plugins``."""
        default = self.default
        if not isinstance(default, str | int | float | bool | type(None)):
            default = str(default)
        return {
            "name": self.name,
            "flag": self.flag(analyzer),
            "type": self.click_type().name,
            "default": default,
            "help": self.help,
            "choices": list(self.choices) if self.choices else None,
        }


class Analyzer:
    """Base class for analyzers; subclass it and register the class with ``register_analyzers``.

    Class attributes describe the analyzer without running it; ``run`` does the work, writing
    only under ``context.output_dir`` and returning ``context.artifact(...)`` records. It
    takes exactly its declared options as keyword-only parameters, without defaults (the
    host fills them in from the declarations), so a default is written in one place::

        class Histogram(Analyzer):
            name = "histogram"
            options = (Option("bins", click.IntRange(2, 100), 20, "Histogram bins."),)

            def run(self, context, *, bins):
                ...

    Import torch and other heavy modules inside ``run``.

    Attributes:
        name: CLI name, ``^[a-z][a-z0-9_]*$``; also the output folder ``analyses/<name>``.
        summary: One line shown by ``explainkit plugins`` and ``analyze --help``.
        title: Heading in reports (default: the name).
        options: Declared options, passed to ``run`` as keywords.
        needs: What the run must have: ``"store"``, ``"checkpoint"``, ``"masks"``.
        requires: Extra importable packages, e.g. ``("captum",)``.
        tasks: The tasks of the runs it reads (the store's ``task``: ``classification``,
            ``multilabel``, ``segmentation``, ``detection``); ``("*",)`` for any. A run of
            another task skips it, saying why.
        order: Position in reports, lower first.
        shardable: Whether ``torchrun`` may share the eval images among processes: the
            analyzer then handles only its ``context.shard`` block
            and merges the parts (docs/distributed.md, "Making an analyzer shardable");
            otherwise it runs on rank 0 alone.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    title: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()
    needs: ClassVar[frozenset[str]] = frozenset({"store"})
    requires: ClassVar[tuple[str, ...]] = ()
    tasks: ClassVar[tuple[str, ...]] = ("classification",)
    order: ClassVar[int] = 50
    shardable: ClassVar[bool] = False

    def run(self, context: AnalysisContext, **options: Any) -> list[dict]:
        """Write files under ``context.output_dir``; return their ``context.artifact`` records."""
        raise NotImplementedError(f"{type(self).__name__}.run() is not implemented")

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        return {opt.name: opt.default for opt in cls.options}


def check_analyzer_class(cls: Any, plugin: str) -> None:
    """Raise PluginError with one sentence when ``cls`` breaks the analyzer contract.

    Checked when a plugin registers the class, so a malformed analyzer is skipped with a
    message naming its plugin instead of breaking unrelated commands later.
    """
    if not (isinstance(cls, type) and issubclass(cls, Analyzer)):
        raise PluginError(
            f"plugin {plugin!r} registered {cls!r}, which is not a subclass of "
            "explainkit.Analyzer; pass the class itself"
        )
    what = f"plugin {plugin!r} registered analyzer {cls.__qualname__}"
    name = cls.name
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise PluginError(
            f"{what} with invalid name {name!r}; use lowercase letters, digits and _, "
            "starting with a letter"
        )
    for attr in ("summary", "title"):
        if not isinstance(getattr(cls, attr), str):
            raise PluginError(f"{what}: {attr} must be a string")
    options = cls.options
    if not isinstance(options, tuple) or not all(isinstance(o, Option) for o in options):
        raise PluginError(f"{what}: options must be a tuple of explainkit.Option")
    names = [o.name for o in options]
    bad = [n for n in names if not isinstance(n, str) or not n.isidentifier()]
    if bad or len(set(names)) != len(names):
        raise PluginError(f"{what}: option names must be distinct Python identifiers")
    needs = cls.needs
    if not isinstance(needs, frozenset | set | tuple) or not set(needs) <= set(NEEDS):
        raise PluginError(f"{what}: needs must be a set drawn from {', '.join(NEEDS)}")
    tasks = cls.tasks
    if not isinstance(tasks, tuple) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise PluginError(f"{what}: tasks must be a non-empty tuple of task names")
    requires = cls.requires
    if not isinstance(requires, tuple) or not all(isinstance(r, str) for r in requires):
        raise PluginError(f"{what}: requires must be a tuple of package names")
    if not isinstance(cls.order, int) or isinstance(cls.order, bool):
        raise PluginError(f"{what}: order must be an integer")
    if not isinstance(cls.shardable, bool):
        raise PluginError(f"{what}: shardable must be True or False")
    _check_run_signature(cls, names, what)


def _check_run_signature(cls: type[Analyzer], names: list[str], what: str) -> None:
    """``run(self, context, *, <declared options>)``: the declared options, nothing else.

    A class that keeps the base ``run`` registers (it can be listed) and fails when run.
    """
    if cls.run is Analyzer.run:
        return
    try:
        params = list(inspect.signature(cls.run).parameters.values())[2:]
    except (TypeError, ValueError):
        raise PluginError(f"{what}: run must be a method run(self, context, ...)") from None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        raise PluginError(
            f"{what}: run() takes **kwargs; take the declared options by name instead "
            f"(run(self, context, *, {', '.join(names)}))"
        )
    taken = [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if sorted(taken) != sorted(names) or len(taken) != len(params):
        raise PluginError(
            f"{what}: run() takes ({', '.join(taken) or 'no options'}) but the class declares "
            f"({', '.join(names) or 'no options'}); make them the same"
        )
    with_default = [p.name for p in params if p.default is not p.empty]
    if with_default:
        raise PluginError(
            f"{what}: run() repeats the default of {', '.join(with_default)}; "
            "declare defaults only in its Option"
        )


class RunResources(Protocol):
    """What the host shares among the analyzers of one ``analyze`` call (all lazy)."""

    config: dict
    store: StoreReader
    device: torch.device
    registries: Registries
    shard: Shard | None  # the running analyzer's share of the images under torchrun

    def model(self, epoch: int, keep: bool) -> torch.nn.Module: ...

    def say(self, line: str) -> None: ...


@dataclass
class AnalysisContext:
    """Lazy, cached access to one run for one analyzer.

    Attributes:
        run_dir: The run directory.
        epoch: The selected epoch (default: the best by eval accuracy).
        batch_size: Batch size for model passes.
        seed: Seed of ``generator`` and ``rng`` (fresh per analyzer, so order does not matter).
        output_dir: Where this analyzer writes (moved to ``analyses/<name>/`` when done).
        analyzer_name: Name of the analyzer this context is for.
    """

    run_dir: Path
    epoch: int
    batch_size: int
    seed: int
    output_dir: Path
    analyzer_name: str = ""
    resources: RunResources = field(default=None, repr=False)  # type: ignore[assignment]
    _generator: Any = field(default=None, repr=False)
    _rng: Any = field(default=None, repr=False)

    @property
    def config(self) -> dict:
        """The run's ``config.json``."""
        return self.resources.config

    @property
    def registries(self) -> Registries:
        """What the plugins registered (models, datasets, analyzers), as the host built it."""
        return self.resources.registries

    @property
    def shard(self) -> Shard:
        """This process's share of the images: all of them, unless the host shares a
        shardable analyzer among torchrun processes (see :mod:`explainkit.sharding`)."""
        from explainkit.sharding import Shard

        shard = getattr(self.resources, "shard", None)
        if shard is not None and shard.output_dir == self.output_dir:
            return shard
        return Shard(0, 1, self.store.num_images, self.output_dir)

    @property
    def store(self) -> StoreReader:
        """The run's prediction store (opened once, shared by all analyzers of the call)."""
        return self.resources.store

    @property
    def device(self) -> torch.device:
        """Where models and batches live."""
        return self.resources.device

    @property
    def classes(self) -> list[str]:
        return list(self.store.classes)

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.store.mean)

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.store.std)

    def model(self, epoch: int | None = None) -> torch.nn.Module:
        """The model at ``epoch`` (default: ``self.epoch``): eval mode, on device, frozen.

        Parameters have ``requires_grad=False``; gradient methods take gradients with respect
        to inputs or activations, which is all they need. The analyzed epoch's model is
        loaded once for the whole ``analyze`` call; another epoch's is loaded on each call
        and not kept, so an analyzer that walks the epochs holds one model at a time.
        """
        epoch = self.epoch if epoch is None else epoch
        return self.resources.model(epoch, keep=epoch == self.epoch)

    def checkpoint_epochs(self) -> list[int]:
        """The epochs whose checkpoint (``checkpoints/epoch_NNN.pt``) the run kept, in order."""
        from explainkit.train.checkpoint import list_checkpoints

        return list(list_checkpoints(self.run_dir))

    def dataset_split(self, split: str) -> Dataset:
        """A split of the run's dataset loaded as the run was configured (never downloads):
        what an analyzer needs beyond the stored eval images, such as the training split.

        Raises:
            ExplainkitError: The run's dataset cannot be loaded here (its files, its plugin).
        """
        from explainkit.data import load_dataset

        cfg = self.config.get("config") or {}
        return load_dataset(
            cfg.get("dataset", ""), split, cfg.get("data_dir"),
            image_size=int(cfg.get("image_size", 32)), seed=int(cfg.get("seed", 0)),
            limit=cfg.get(f"limit_{split}"), download=False, registries=self.registries,
        )  # fmt: skip

    def say(self, line: str) -> None:
        """Tell the user something now (stderr on the CLI), e.g. an estimate before long work."""
        self.resources.say(f"{self.analyzer_name}: {line}")

    def estimate(self, what: str, seconds: float, hint: str = "") -> None:
        """Say how long ``what`` will take, before it starts (``about 3 min``)."""
        from explainkit.progress import duration

        self.say(f"{what}: about {duration(seconds)}{f' ({hint})' if hint else ''}")

    def target_layer(self, requested: Any = None, model: Any = None) -> str:
        """The layer a layer-based method explains, checked to be a module of the model.

        In this order: the user's choice (a name, or a module of the model), then the
        ``resolve_target_layer`` hook, then the run's metadata, then
        :func:`explainkit.explain.layers.target_layer` (the model's declared default, else a
        located layer). A choice the user did not make is logged.

        Args:
            requested: The layer the user asked for (None or "" when they did not).
            model: The model explained (default: ``self.model()``).

        Raises:
            AnalyzerError: The chosen name is not a module of the model.
        """
        import torch

        from explainkit.explain.layers import target_layer

        model = self.model() if model is None else model
        if requested is not None and requested != "":
            return target_layer(model, requested).name  # an unknown name lists valid ones
        chosen, source = self._default_layer(model)
        if chosen is None:
            shape = (1, *(int(v) for v in self.store.attrs["input_shape"]))
            example = torch.zeros(shape, device=self.device)
            chosen, source = target_layer(model, None, example).name, "the model's default"
        if chosen not in dict(model.named_modules()):
            raise AnalyzerError(
                f"{source} names layer {chosen!r}, which is not a module of the model; "
                f"pass --{self.analyzer_name}-layer to choose one"
            )
        log.warning("%s: no layer given; using %r from %s", self.analyzer_name, chosen, source)
        return chosen

    def layer_reshape(self, layer: str) -> str:
        """How ``layer``'s output becomes maps, for the CAM engine's ``reshape``.

        The run's recorded layout when ``layer`` is its model's default layer (a Swin stage's
        channels-last (N, H, W, C) output cannot be told from (N, C, H, W) by its shape),
        else ``"auto"`` (4-D is NCHW, 3-D is ViT tokens).
        """
        spec = (self.config or {}).get("model", {})
        recorded = spec.get("reshape") if isinstance(spec, dict) else None
        if layer == spec.get("default_layer") and recorded in ("nchw", "vit", "swin"):
            return recorded
        return "auto"

    def _default_layer(self, model: Any) -> tuple[str | None, str]:
        answer = self.registries.resolve_target_layer(model, self.analyzer_name)
        if answer is not None:
            return str(answer), "the resolve_target_layer hook"
        meta = self.store.attrs.get("default_layer")
        if meta:
            return str(meta), "the run's metadata"
        return None, ""

    @property
    def generator(self) -> torch.Generator:
        """A seeded CPU ``torch.Generator`` (draw on the CPU, then move to the device)."""
        if self._generator is None:
            import torch

            self._generator = torch.Generator().manual_seed(self.seed)
        return self._generator

    @property
    def rng(self) -> np.random.Generator:
        """A seeded numpy generator."""
        if self._rng is None:
            import numpy as np

            self._rng = np.random.default_rng(self.seed)
        return self._rng

    def progress(
        self, iterable: Iterable[Any], desc: str | None = None, total: int | None = None
    ) -> Iterable[Any]:
        """Wrap ``iterable`` in a progress bar (terminal or notebook) with throughput and ETA."""
        from explainkit.progress import progress

        label = f"{self.analyzer_name}: {desc}" if desc else self.analyzer_name
        return progress(iterable, desc=label, total=total)

    def normalize(self, images: Any) -> torch.Tensor:
        """uint8 NHWC images (tensor or array) -> normalized float NCHW on the device (clips
        NTHWC -> NCTHW)."""
        from explainkit.clip_files import model_input

        return model_input(images, self.mean, self.std, self.device)

    def model_inputs(self, indices: Any) -> torch.Tensor:
        """What the model takes for eval images ``indices``, normalized on the device: the
        stored images, or a video run's clips (N, 3, T, H, W) from ``RUN/clips.h5``."""
        if self.store.task == "video":
            from explainkit.clip_files import read_clips

            return self.normalize(read_clips(self.run_dir, indices, len(self.store.targets)))
        return self.normalize(self.store.images(indices))

    def artifact(self, path: str | Path, title: str, kind: str, caption: str = "") -> dict:
        """Describe one written file for the manifest (path relative to ``output_dir``)."""
        if kind not in ARTIFACT_KINDS:
            raise AnalyzerError(
                f"artifact kind {kind!r} of {self.analyzer_name} is not one of "
                f"{', '.join(ARTIFACT_KINDS)}"
            )
        rel = Path(path)
        if rel.is_absolute():
            try:
                rel = rel.relative_to(self.output_dir)
            except ValueError:
                raise AnalyzerError(
                    f"artifact {str(path)!r} of {self.analyzer_name} is outside its output "
                    "folder; write under context.output_dir"
                ) from None
        if ".." in rel.parts or rel.name in RESERVED_NAMES:
            raise AnalyzerError(
                f"artifact path {str(rel)!r} of {self.analyzer_name} is not allowed; use a "
                "file name inside context.output_dir"
            )
        return {"title": title, "kind": kind, "path": rel.as_posix(), "caption": caption}
