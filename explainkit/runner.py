"""The host that runs analyzers on a run directory: ``analyze()``.

It owns everything around an analyzer (:mod:`explainkit.analyzer` is the contract): choosing
analyzers, checking what they need, validating options, the output folder, the manifest and
failure isolation, so a plugin only writes files and describes them.

Outputs of one analyzer are written to ``analyses/.<name>.tmp-<pid>`` and moved into
``analyses/<name>`` only when complete: concurrent runs never mix files, and a failed run
never destroys an earlier good result.

Only the standard library and explainkit's light modules are imported at module level; torch
and h5py are imported when a run's store or model is first needed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from explainkit.analyzer import RESERVED_NAMES, AnalysisContext, Analyzer, Option
from explainkit.atomic import write_atomic
from explainkit.errors import (
    AnalyzerError,
    ExplainkitError,
    PluginError,
    RunError,
    error_sentence,
    unknown_name_message,
)
from explainkit.rundir import RunDir, pid_alive

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from explainkit.manager import AnalyzerEntry, ExplainkitPluginManager
    from explainkit.store import StoreReader

__all__ = ["AnalysisFailed", "Results", "analyze", "split_options", "unmet_needs"]

FAILED_MANIFEST = "failed.json"
assert RunDir.MANIFEST in RESERVED_NAMES and FAILED_MANIFEST in RESERVED_NAMES


class Results(list):
    """The manifests of one ``analyze`` call, as a list of dicts.

    In a notebook the list shows itself: each analysis with its figures and tables, as the
    report would show them (``_repr_html_``).
    """

    def __init__(self, run_dir: Path, manifests: Iterable[dict] = ()) -> None:
        super().__init__(manifests)
        self.run_dir = run_dir

    def _repr_html_(self) -> str:
        from explainkit.report import render_analyses

        return render_analyses(self.run_dir, self)


class AnalysisFailed(AnalyzerError):
    """An analyzer failed in ``analyze(collect_failures=False)``; ``results`` has every
    manifest, the failed ones with their error and traceback."""

    def __init__(self, results: Results) -> None:
        failed = [m for m in results if m["status"] != "ok"]
        what = "; ".join(f"{m['analyzer']}: {m['error']}" for m in failed)
        super().__init__(
            f"{len(failed)} of {len(results)} analyzers failed ({what}); pass "
            "collect_failures=True to get their manifests instead"
        )
        self.results = results


class _SharedRun:
    """What all analyzers of one ``analyze`` call share: config, store, models (all lazy)."""

    def __init__(
        self,
        run: RunDir,
        device: Any,
        plugin_manager: Any = None,
        say: Callable[[str], None] | None = None,
    ) -> None:
        self.run = run
        self.device_name = device
        self.plugin_manager = plugin_manager
        self.say = say or (lambda line: None)
        self._device: Any = None
        self._config: dict | None = None
        self._store: StoreReader | None = None
        self._models: dict[int | None, Any] = {}

    @property
    def config(self) -> dict:
        if self._config is None:
            self._config = self.run.read_config() if self.run.has_config else {}
        return self._config

    @property
    def store(self) -> StoreReader:
        if self._store is None:
            from explainkit.store import open_store

            self._store = open_store(self.run.store_path)
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

            model = load_model(self.run.path, epoch=epoch, device=self.device)
            for p in model.parameters():
                p.requires_grad_(False)
            self._models[epoch] = model.eval()
        return self._models[epoch]

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
        self._models.clear()


def unmet_needs(cls: type[Analyzer], run: RunDir, store: Any | None, epoch: int) -> list[str]:
    """Reasons this run cannot feed the analyzer (empty when it can)."""
    reasons = []
    if "store" in cls.needs or "masks" in cls.needs:
        if store is None:
            reasons.append("a prediction store (predictions.h5), which this run lacks")
    if "masks" in cls.needs and store is not None and not store.has_masks:
        reasons.append("ground-truth masks, which this run's dataset has none of (use shapes)")
    if "checkpoint" in cls.needs:
        from explainkit.train.checkpoint import list_checkpoints

        ckpts = list_checkpoints(run.path)
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
                    raise AnalyzerError(
                        unknown_name_message("analyzer option", f"{key}_{sub}", sorted(lookup))
                    )
                out.setdefault(key, {})[sub] = declared[sub].convert(subvalue, key)
            continue
        if key not in lookup:
            raise AnalyzerError(unknown_name_message("analyzer option", key, sorted(lookup)))
        analyzer, opt = lookup[key]
        out.setdefault(analyzer, {})[opt.name] = opt.convert(value, analyzer)
    return out


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
    collect_failures: bool = False,
    **kw_options: Any,
) -> Results:
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
        collect_failures: Return a failed analyzer's manifest (``status == "failed"``) instead
            of raising; the other analyzers run either way.
        **kw_options: More options, like ``gradcam_layer="layer3"``.

    Returns:
        One manifest dict per analyzer run, as written to ``analyses/<name>/manifest.json``,
        in a list that a notebook shows as figures and tables (:class:`Results`).
        With ``collect_failures``, a failed analyzer has ``status == "failed"`` and an
        ``error`` sentence.

    Raises:
        RunError: The run directory is missing or not a run, or the epoch is not in it.
        PluginError: An unknown analyzer name.
        AnalyzerError: An unknown option or invalid option value.
        AnalysisFailed: An analyzer failed (after all of them ran), unless
            ``collect_failures``.
    """
    from explainkit.manager import get_analyzers, load_plugins

    rundir = RunDir(run).check()
    if pm is None:
        pm = load_plugins(plugins_dir)
    entries = get_analyzers(pm)
    per_analyzer = split_options(entries, {**(options or {}), **kw_options})
    say = echo or (lambda line: None)

    def warn(line: str) -> None:
        if echo is not None:
            echo(f"warning: {line}")
        else:
            warnings.warn(line, stacklevel=3)

    explicit = plugins is not None
    selected = list(dict.fromkeys(plugins)) if explicit else list(entries)  # type: ignore[arg-type]
    for name in selected:
        if name not in entries:
            raise PluginError(unknown_name_message("analyzer", name, list(entries)))

    shared = _SharedRun(rundir, device, pm, say)
    try:
        store = shared.store if rundir.has_store else None
        epoch = _resolve_epoch(store, epoch, rundir)
        todo: list[tuple[str, type[Analyzer], list[str]]] = []
        for name in selected:
            cls = entries[name].cls
            reasons = unmet_needs(cls, rundir, store, epoch)
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
            shared.device  # noqa: B018 - fail early on an unusable device, before any run
        manifests = Results(rundir.path)
        for name, cls, reasons in todo:
            context = _new_context(shared, name, epoch, batch_size, seed)
            manifest = _run_one(cls, context, reasons, per_analyzer.get(name, {}))
            manifests.append(manifest)
            if manifest["status"] == "ok":
                n = len(manifest["artifacts"])
                where = rundir.analysis(name)
                say(f"ok      {name}: {n} file(s) in {where} ({manifest['seconds']:.1f} s)")
            else:
                say(f"failed  {name}: {manifest['error']}")
        if not collect_failures and any(m["status"] != "ok" for m in manifests):
            raise AnalysisFailed(manifests)
        return manifests
    finally:
        shared.close()


def _flags(cls: type[Analyzer], values: Mapping[str, Any]) -> list[str]:
    by_name = {opt.name: opt for opt in cls.options}
    return [by_name[k].flag(cls.name) for k in values if k in by_name]


def _resolve_epoch(store: Any, epoch: int | None, run: RunDir) -> int:
    if store is None:
        if epoch is None:
            raise RunError(
                f"{run.path} has no predictions.h5, so there is no best epoch; pass --epoch"
            )
        return int(epoch)
    epochs = list(store.epochs)
    if not epochs:
        raise RunError(f"{run.path} has no completed epoch yet; train it further first")
    if epoch is None:
        best = store.best_epoch
        return int(best if best is not None else epochs[-1])
    if epoch not in epochs:
        raise RunError(
            f"epoch {epoch} is not in {run.path}; available epochs: "
            f"{', '.join(str(e) for e in epochs)}"
        )
    return int(epoch)


def _new_context(
    shared: _SharedRun, name: str, epoch: int, batch_size: int, seed: int
) -> AnalysisContext:
    """A fresh context writing to a private temporary folder of this process."""
    analyses = shared.run.analyses
    analyses.mkdir(exist_ok=True)
    _remove_stale_tmp(analyses, name)
    tmp = analyses / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return AnalysisContext(
        run_dir=shared.run.path,
        epoch=epoch,
        batch_size=batch_size,
        seed=seed,
        output_dir=tmp,
        analyzer_name=name,
        resources=shared,
    )


def _run_one(
    cls: type[Analyzer], context: AnalysisContext, reasons: list[str], given: dict[str, Any]
) -> dict:
    """Run one analyzer in isolation: any exception becomes a failed manifest."""
    name, tmp = context.analyzer_name, context.output_dir
    options = {**cls.option_defaults(), **given}
    manifest: dict[str, Any] = {
        "analyzer": name,
        "title": cls.title or name,
        "summary": cls.summary,
        "order": cls.order,
        "epoch": context.epoch,
        "status": "ok",
        "error": None,
        "seconds": 0.0,
        "options": _jsonable(options),
        "artifacts": [],
    }
    start = time.perf_counter()
    try:
        try:
            if reasons:
                raise AnalyzerError(f"{name} needs {'; '.join(reasons)}")
            artifacts = cls().run(context, **options)
            manifest["artifacts"] = _check_artifacts(name, artifacts, tmp)
        except (Exception, SystemExit) as e:  # a plugin's sys.exit() ends only its own run
            manifest["status"] = "failed"
            manifest["error"] = error_sentence(e)
            if not isinstance(e, ExplainkitError):
                manifest["traceback"] = traceback.format_exc()
            manifest["artifacts"] = []
        manifest["seconds"] = round(time.perf_counter() - start, 3)
        _publish(context.resources.run, name, tmp, manifest)
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


def _publish(run: RunDir, name: str, tmp: Path, manifest: dict) -> None:
    """Move a finished output folder into place; a failure never replaces a good result."""
    final = run.analysis(name)
    if manifest["status"] != "ok" and _has_ok_result(final):
        _write_json_atomic(final / FAILED_MANIFEST, manifest)
        return
    if manifest["status"] != "ok":
        for child in tmp.iterdir():  # keep only the manifest of a failed first attempt
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    _write_json_atomic(tmp / RunDir.MANIFEST, manifest)
    for attempt in range(20):
        try:
            os.replace(tmp, final)  # works when final is absent or an empty folder
            return
        except OSError:
            if attempt == 19:
                raise
        old = run.analyses / f".{name}.old-{os.getpid()}-{attempt}"
        try:
            os.replace(final, old)
        except FileNotFoundError:
            continue  # someone else moved it away first: try again
        shutil.rmtree(old, ignore_errors=True)


def _has_ok_result(folder: Path) -> bool:
    try:
        return json.loads((folder / RunDir.MANIFEST).read_text()).get("status") == "ok"
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
