"""Analyzers and the context they run in, and ``analyze()`` which runs them on a run directory.

An analyzer is a class: name, one-line summary, options declared as data, what it needs from
the run, and ``run(context, **options)`` returning artifacts. The host (``analyze``) owns
everything around it: choosing analyzers, checking needs, the output folder, the manifest and
failure handling, so a plugin only writes files and describes them.

Outputs of one analyzer are written to ``analyses/.<name>.tmp-<pid>`` and moved into
``analyses/<name>`` only when complete: concurrent runs never mix files, and a failed run
never destroys an earlier good result.

Only the standard library, click and explainkit's light modules are imported at
module level; torch and h5py are imported when a context first needs them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import click

from explainkit.atomic import write_atomic
from explainkit.errors import AnalyzerError, ExplainkitError, PluginError, RunError
from explainkit.train.rundir import is_run_dir, pid_alive

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from explainkit.manager import AnalyzerEntry, ExplainkitPluginManager
    from explainkit.store import StoreReader

__all__ = ["Option", "Analyzer", "AnalysisContext", "analyze", "ARTIFACT_KINDS", "NEEDS"]

ARTIFACT_KINDS = ("image", "table", "json", "h5")
NEEDS = ("store", "checkpoint", "masks")
MANIFEST = "manifest.json"
FAILED_MANIFEST = "failed.json"


@dataclass(frozen=True)
class Option:
    """One analyzer option, declared as data so it can be listed, documented and validated.

    On the command line it becomes ``--<analyzer>-<name with _ as ->``; from Python it is the
    keyword ``<analyzer>_<name>``.

    Attributes:
        name: Python identifier, e.g. ``"count"``.
        type: A click type (``click.IntRange(1)``) or a Python type (``int``, ``str``, ``bool``).
        default: Value used when the option is not given.
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
        ptype = self.click_type()
        default = self.default
        if not isinstance(default, str | int | float | bool | type(None)):
            default = str(default)
        return {
            "name": self.name,
            "flag": self.flag(analyzer),
            "type": ptype.name,
            "default": default,
            "help": self.help,
            "choices": list(self.choices) if self.choices else None,
        }


class Analyzer:
    """Base class for analyzers; subclass it and register the class with ``register_analyzers``.

    Class attributes describe the analyzer without running it; ``run`` does the work, writing
    only under ``context.output_dir`` and returning ``context.artifact(...)`` records.
    Import torch and other heavy modules inside ``run``.

    Attributes:
        name: CLI name, ``^[a-z][a-z0-9_]*$``; also the output folder ``analyses/<name>``.
        summary: One line shown by ``explainkit plugins`` and ``analyze --help``.
        title: Heading in reports (default: the name).
        options: Declared options, passed to ``run`` as keywords (defaults filled in).
        needs: What the run must have: ``"store"``, ``"checkpoint"``, ``"masks"``.
        requires: Extra importable packages, e.g. ``("captum",)``.
        order: Position in reports, lower first.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    title: ClassVar[str] = ""
    options: ClassVar[tuple[Option, ...]] = ()
    needs: ClassVar[frozenset[str]] = frozenset({"store"})
    requires: ClassVar[tuple[str, ...]] = ()
    order: ClassVar[int] = 50

    def run(self, context: AnalysisContext, **options: Any) -> list[dict]:
        """Write files under ``context.output_dir``; return their ``context.artifact`` records."""
        raise NotImplementedError(f"{type(self).__name__}.run() is not implemented")

    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        return {opt.name: opt.default for opt in cls.options}


class _RunResources:
    """What all analyzers of one ``analyze`` call share: config, store, models (all lazy)."""

    def __init__(self, run_dir: Path, device: Any, plugin_manager: Any = None) -> None:
        self.run_dir = run_dir
        self.device_name = device
        self.plugin_manager = plugin_manager
        self._device: Any = None
        self._config: dict | None = None
        self._store: StoreReader | None = None
        self._models: dict[int | None, Any] = {}

    @property
    def config(self) -> dict:
        if self._config is None:
            from explainkit.inspect import read_run_config

            has_config = (self.run_dir / "config.json").is_file()
            self._config = read_run_config(self.run_dir) if has_config else {}
        return self._config

    @property
    def store(self) -> StoreReader:
        if self._store is None:
            from explainkit.store import open_store

            self._store = open_store(self.run_dir)
        return self._store

    @property
    def device(self) -> torch.device:
        if self._device is None:
            from explainkit.device import resolve_device

            self._device = resolve_device(self.device_name)
        return self._device

    def model(self, epoch: int | None) -> torch.nn.Module:
        if epoch not in self._models:
            from explainkit.train.checkpoint import load_model

            model = load_model(self.run_dir, epoch=epoch, device=self.device)
            for p in model.parameters():
                p.requires_grad_(False)
            self._models[epoch] = model.eval()
        return self._models[epoch]

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
        self._models.clear()


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
    _resources: _RunResources = field(default=None, repr=False)  # type: ignore[assignment]
    _generator: Any = field(default=None, repr=False)
    _rng: Any = field(default=None, repr=False)

    @property
    def config(self) -> dict:
        """The run's ``config.json``."""
        return self._resources.config

    @property
    def plugin_manager(self) -> Any:
        """The plugin manager this analysis runs under, for single-answer hooks such as
        ``resolve_target_layer``."""
        return self._resources.plugin_manager

    @property
    def store(self) -> StoreReader:
        """The run's prediction store (opened once, shared by all analyzers of the call)."""
        return self._resources.store

    @property
    def device(self) -> torch.device:
        """Where models and batches live."""
        return self._resources.device

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
        """The model at ``epoch`` (default: ``self.epoch``): eval mode, on device, frozen, cached.

        Parameters have ``requires_grad=False``; gradient methods take gradients with respect
        to inputs or activations, which is all they need.
        """
        return self._resources.model(self.epoch if epoch is None else epoch)

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
        """Wrap ``iterable`` in a progress bar on stderr, silent when stderr is not a TTY."""
        from tqdm.auto import tqdm

        label = f"{self.analyzer_name}: {desc}" if desc else self.analyzer_name
        return tqdm(iterable, desc=label, total=total, leave=False, disable=not sys.stderr.isatty())

    def normalize(self, images: Any) -> torch.Tensor:
        """uint8 NHWC images (tensor or array) -> normalized float NCHW on the device."""
        import torch

        if not isinstance(images, torch.Tensor):
            images = torch.from_numpy(images)
        x = images.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
        mean = torch.tensor(self.mean, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, -1, 1, 1)
        return (x - mean) / std

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
        if ".." in rel.parts or rel.name in (MANIFEST, FAILED_MANIFEST):
            raise AnalyzerError(
                f"artifact path {str(rel)!r} of {self.analyzer_name} is not allowed; use a "
                "file name inside context.output_dir"
            )
        return {"title": title, "kind": kind, "path": rel.as_posix(), "caption": caption}


# -- running analyzers ---------------------------------------------------------------------


def check_run_dir(run: str | os.PathLike[str]) -> Path:
    """The run directory as a Path, or RunError saying why it is not one."""
    run_dir = Path(run)
    if not run_dir.exists():
        raise RunError(f"run directory {str(run_dir)!r} does not exist; pass a trained run")
    if not run_dir.is_dir():
        raise RunError(f"{str(run_dir)!r} is a file, not a run directory")
    if not is_run_dir(run_dir):
        raise RunError(
            f"{str(run_dir)!r} is not an explainkit run (no config.json or predictions.h5); "
            "create one with `explainkit train`"
        )
    if (run_dir / "config.json").is_file():
        from explainkit.inspect import read_run_config

        read_run_config(run_dir)  # refuses a damaged config or one from a newer explainkit
    return run_dir


def unmet_needs(cls: type[Analyzer], run_dir: Path, store: Any | None, epoch: int) -> list[str]:
    """Reasons this run cannot feed the analyzer (empty when it can)."""
    reasons = []
    if "store" in cls.needs or "masks" in cls.needs:
        if store is None:
            reasons.append("a prediction store (predictions.h5), which this run lacks")
    if "masks" in cls.needs and store is not None and not store.has_masks:
        reasons.append("ground-truth masks, which this run's dataset has none of (use shapes)")
    if "checkpoint" in cls.needs:
        from explainkit.train.checkpoint import list_checkpoints

        ckpts = list_checkpoints(run_dir)
        if epoch not in ckpts:
            have = ", ".join(map(str, ckpts)) or "none"
            reasons.append(f"the checkpoint of epoch {epoch} (saved epochs: {have})")
    for package in cls.requires:
        if importlib.util.find_spec(package) is None:
            reasons.append(f"the package {package!r} (pip install {package})")
    return reasons


def split_options(
    entries: Mapping[str, AnalyzerEntry], values: Mapping[str, Any]
) -> dict[str, dict[str, Any]]:
    """Map ``{"gallery_count": 8}`` or ``{"gallery": {"count": 8}}`` to per-analyzer options.

    Raises:
        AnalyzerError: An unknown option or a value its declared type refuses.
    """
    lookup: dict[str, tuple[str, Option]] = {}
    for name, entry in entries.items():
        for opt in entry.cls.options:
            lookup[opt.key(name)] = (name, opt)
    out: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        if isinstance(value, Mapping) and key in entries:
            declared = {opt.name: opt for opt in entries[key].cls.options}
            for sub, subvalue in value.items():
                if sub not in declared:
                    raise AnalyzerError(_unknown_option(f"{key}_{sub}", lookup))
                out.setdefault(key, {})[sub] = declared[sub].convert(subvalue, key)
            continue
        if key not in lookup:
            raise AnalyzerError(_unknown_option(key, lookup))
        analyzer, opt = lookup[key]
        out.setdefault(analyzer, {})[opt.name] = opt.convert(value, analyzer)
    return out


def _unknown_option(key: str, lookup: Mapping[str, Any]) -> str:
    from explainkit.manager import unknown_name_message

    return unknown_name_message("analyzer option", key, sorted(lookup))


def analyze(
    run: str | os.PathLike[str],
    plugins: Iterable[str] | None = None,
    epoch: int | None = None,
    device: str = "auto",
    batch_size: int = 64,
    seed: int = 0,
    options: Mapping[str, Any] | None = None,
    *,
    pm: ExplainkitPluginManager | None = None,
    plugins_dir: str | os.PathLike[str] | None = None,
    echo: Callable[[str], None] | None = None,
    **kw_options: Any,
) -> list[dict]:
    """Run analyzers on a run directory and return their manifests (sorted by ``order``).

    Args:
        run: The run directory.
        plugins: Analyzer names; None runs every analyzer whose needs the run meets.
        epoch: Epoch to analyze (default: the best by eval accuracy).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``.
        batch_size: Batch size for model passes.
        seed: Seed of each analyzer's generators.
        options: Analyzer options, ``{"gallery_count": 8}`` or ``{"gallery": {"count": 8}}``.
        pm: Plugin manager (default: the cached ``load_plugins(plugins_dir)``).
        plugins_dir: Folder of plugin modules, when ``pm`` is not given.
        echo: Receives one status line per analyzer and warnings (default: ``warnings``).
        **kw_options: More options, like ``gradcam_layer="layer3"``.

    Returns:
        One manifest dict per analyzer run, as written to ``analyses/<name>/manifest.json``.
        A failed analyzer has ``status == "failed"`` and an ``error`` sentence; the others
        still run.

    Raises:
        RunError: The run directory is missing or not a run, or the epoch is not in it.
        PluginError: An unknown analyzer name.
        AnalyzerError: An unknown option or invalid option value.
    """
    from explainkit.manager import get_analyzers, load_plugins, unknown_name_message

    run_dir = check_run_dir(run)
    if pm is None:
        pm = load_plugins(plugins_dir)
    entries = get_analyzers(pm)
    values = {**(options or {}), **kw_options}
    per_analyzer = split_options(entries, values)

    def say(line: str) -> None:
        if echo is not None:
            echo(line)

    def warn(line: str) -> None:
        if echo is not None:
            echo(f"warning: {line}")
        else:
            warnings.warn(line, stacklevel=3)

    explicit = plugins is not None
    if explicit:
        selected = list(dict.fromkeys(plugins))  # type: ignore[arg-type]
        for name in selected:
            if name not in entries:
                raise PluginError(unknown_name_message("analyzer", name, list(entries)))
    else:
        selected = list(entries)

    resources = _RunResources(run_dir, device, pm)
    try:
        store = _open_store_or_none(resources, run_dir)
        epoch = _resolve_epoch(store, epoch, run_dir)
        todo: list[tuple[str, type[Analyzer], list[str]]] = []
        for name in selected:
            cls = entries[name].cls
            reasons = unmet_needs(cls, run_dir, store, epoch)
            if reasons and not explicit:
                say(f"skipped {name}: needs {'; '.join(reasons)}")
                continue
            todo.append((name, cls, reasons))
        chosen = {name for name, _, _ in todo}
        for name in sorted(set(per_analyzer) - chosen):
            flags = ", ".join(_flags(entries[name].cls, per_analyzer[name]))
            warn(f"{flags} ignored: analyzer {name} is not run (select it with --plugin {name})")
        todo.sort(key=lambda t: (t[1].order, t[0]))
        if todo:
            resources.device  # noqa: B018 - fail early on an unusable device, before any run
        manifests = []
        for name, cls, reasons in todo:
            manifest = _run_one(
                name, cls, reasons, resources, epoch, batch_size, seed, per_analyzer.get(name, {})
            )
            manifests.append(manifest)
            where = run_dir / "analyses" / name
            if manifest["status"] == "ok":
                n = len(manifest["artifacts"])
                say(f"ok      {name}: {n} file(s) in {where} ({manifest['seconds']:.1f} s)")
            else:
                say(f"failed  {name}: {manifest['error']}")
        return manifests
    finally:
        resources.close()


def _flags(cls: type[Analyzer], values: Mapping[str, Any]) -> list[str]:
    by_name = {opt.name: opt for opt in cls.options}
    return [by_name[k].flag(cls.name) for k in values if k in by_name]


def _open_store_or_none(resources: _RunResources, run_dir: Path) -> Any:
    if not (run_dir / "predictions.h5").is_file():
        return None
    return resources.store


def _resolve_epoch(store: Any, epoch: int | None, run_dir: Path) -> int:
    if store is None:
        if epoch is None:
            raise RunError(
                f"{run_dir} has no predictions.h5, so there is no best epoch; pass --epoch"
            )
        return int(epoch)
    epochs = list(store.epochs)
    if not epochs:
        raise RunError(f"{run_dir} has no completed epoch yet; train it further first")
    if epoch is None:
        best = store.best_epoch
        return int(best if best is not None else epochs[-1])
    if epoch not in epochs:
        raise RunError(
            f"epoch {epoch} is not in {run_dir}; available epochs: "
            f"{', '.join(str(e) for e in epochs)}"
        )
    return int(epoch)


def _run_one(
    name: str,
    cls: type[Analyzer],
    reasons: list[str],
    resources: _RunResources,
    epoch: int,
    batch_size: int,
    seed: int,
    given: dict[str, Any],
) -> dict:
    analyses = resources.run_dir / "analyses"
    analyses.mkdir(exist_ok=True)
    _remove_stale_tmp(analyses, name)
    tmp = analyses / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    options = {**cls.option_defaults(), **given}
    manifest: dict[str, Any] = {
        "analyzer": name,
        "title": cls.title or name,
        "summary": cls.summary,
        "order": cls.order,
        "epoch": epoch,
        "status": "ok",
        "error": None,
        "seconds": 0.0,
        "options": _jsonable(options),
        "artifacts": [],
    }
    context = AnalysisContext(
        run_dir=resources.run_dir,
        epoch=epoch,
        batch_size=batch_size,
        seed=seed,
        output_dir=tmp,
        analyzer_name=name,
        _resources=resources,
    )
    start = time.perf_counter()
    try:
        try:
            if reasons:
                raise AnalyzerError(f"{name} needs {'; '.join(reasons)}")
            artifacts = cls().run(context, **options)
            manifest["artifacts"] = _check_artifacts(name, artifacts, tmp)
        except Exception as e:
            manifest["status"] = "failed"
            if isinstance(e, ExplainkitError):
                manifest["error"] = str(e)
            else:
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                manifest["error"] = f"{type(e).__name__}: {first}" if first else type(e).__name__
                manifest["traceback"] = traceback.format_exc()
            manifest["artifacts"] = []
        manifest["seconds"] = round(time.perf_counter() - start, 3)
        _publish(analyses, name, tmp, manifest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def _check_artifacts(name: str, artifacts: Any, folder: Path) -> list[dict]:
    if artifacts is None:
        artifacts = []
    if not isinstance(artifacts, list | tuple):
        raise AnalyzerError(f"{name}.run() returned {type(artifacts).__name__}, not a list")
    for a in artifacts:
        if not isinstance(a, dict) or "path" not in a:
            raise AnalyzerError(f"{name}.run() returned {a!r}; use context.artifact(...)")
        if not (folder / a["path"]).is_file():
            raise AnalyzerError(f"{name} listed artifact {a['path']!r} but did not write it")
    return list(artifacts)


def _publish(analyses: Path, name: str, tmp: Path, manifest: dict) -> None:
    """Move a finished output folder into place; a failure never replaces a good result."""
    final = analyses / name
    if manifest["status"] != "ok" and _has_ok_result(final):
        _write_json_atomic(final / FAILED_MANIFEST, manifest)
        return
    if manifest["status"] != "ok":
        for child in tmp.iterdir():  # keep only the manifest of a failed first attempt
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    _write_json_atomic(tmp / MANIFEST, manifest)
    for attempt in range(20):
        try:
            os.replace(tmp, final)  # works when final is absent or an empty folder
            return
        except OSError:
            if attempt == 19:
                raise
        old = analyses / f".{name}.old-{os.getpid()}-{attempt}"
        try:
            os.replace(final, old)
        except FileNotFoundError:
            continue  # someone else moved it away first: try again
        shutil.rmtree(old, ignore_errors=True)


def _has_ok_result(folder: Path) -> bool:
    try:
        return json.loads((folder / MANIFEST).read_text()).get("status") == "ok"
    except (OSError, ValueError, AttributeError):
        return False


def _write_json_atomic(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2) + "\n", RunError)


def _remove_stale_tmp(analyses: Path, name: str) -> None:
    """Remove temp folders left by killed ``analyze`` processes (their pid is gone)."""
    for prefix in (f".{name}.tmp-", f".{name}.old-"):
        for path in analyses.glob(f"{prefix}*"):
            pid_text = path.name[len(prefix) :].split("-")[0]
            if pid_text.isdigit() and int(pid_text) != os.getpid() and not pid_alive(int(pid_text)):
                shutil.rmtree(path, ignore_errors=True)


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in values.items():
        out[k] = v if isinstance(v, str | int | float | bool | type(None) | list) else str(v)
    return out
