"""The host that runs analyzers on a run directory: ``analyze()``.

It owns everything around an analyzer (:mod:`explainkit.analyzer` is the contract): choosing
analyzers, checking what they need, validating options, the output folder, the manifest and
failure isolation, so a plugin only writes files and describes them.

Outputs of one analyzer are written to ``analyses/.<name>.tmp-<pid>`` and moved into
``analyses/<name>`` only when complete: concurrent runs never mix files, and a failed run
never destroys an earlier good result.

Under torchrun (``torchrun --nproc-per-node N -m explainkit analyze ...``) every rank calls
``analyze``: an analyzer that declares ``shardable = True`` runs on every rank, each on its
own block of images (:mod:`explainkit.sharding`), and any other runs on rank 0 while the
others wait. Only rank 0 writes the run directory's analyses and speaks; every rank returns
rank 0's manifests.

Only the standard library and explainkit's light modules are imported at module level; torch
and h5py are imported when a run's store or model is first needed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from explainkit.analyzer import RESERVED_NAMES, AnalysisContext, Analyzer, Option
from explainkit.atomic import write_atomic
from explainkit.errors import (
    AnalysisFailed,
    AnalyzerError,
    ExplainkitError,
    PluginError,
    RunError,
    error_sentence,
    unknown_name_message,
)
from explainkit.rundir import RunDir, remove_stale_tmp
from explainkit.said import Said
from explainkit.sharding import (
    Shard,
    ShardMaker,
    check_same_plan,
    is_shardable,
    join_torchrun,
    leave_torchrun,
    run_on_ranks,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from explainkit.registries import AnalyzerEntry, Registries
    from explainkit.store import StoreReader
    from explainkit.train.distributed import DistContext

__all__ = ["Results", "analyze", "split_options", "unmet_needs"]

FAILED_MANIFEST = "failed.json"
assert RunDir.MANIFEST in RESERVED_NAMES and FAILED_MANIFEST in RESERVED_NAMES


class Results(list):
    """The manifests of one ``analyze`` call, as a list of dicts.

    In a notebook the list shows itself: each analysis with its figures and tables, as the
    report would show them (``_repr_html_``).
    """

    def __init__(self, run_dir: Path, manifests: Iterable[dict] = (), is_main: bool = True) -> None:
        super().__init__(manifests)
        self.run_dir = run_dir
        self.is_main = is_main  # False on torchrun's other ranks: rank 0 reports for all

    def _repr_html_(self) -> str:
        from explainkit.report import render_analyses

        return render_analyses(self.run_dir, self)


class _SharedRun:
    """What all analyzers of one ``analyze`` call share: config, store, models (all lazy)."""

    def __init__(
        self,
        run: RunDir,
        device: Any,
        registries: Registries,
        say: Callable[[str], None] | None = None,
        live: torch.nn.Module | None = None,
    ) -> None:
        self.live = live  # the caller's module, when the run's model cannot be rebuilt
        self.run = run
        self.device_name = device
        self.registries = registries
        self.say = say or (lambda line: None)
        self._device: Any = None
        self._config: dict | None = None
        self._store: StoreReader | None = None
        self._models: dict[int | None, Any] = {}
        self.dist: DistContext | None = None  # set under torchrun
        self.shard: Shard | None = None  # the running analyzer's share, when it is sharded

    @property
    def is_main(self) -> bool:
        return self.dist is None or self.dist.rank == 0

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

    def model(self, epoch: int, keep: bool) -> torch.nn.Module:
        """The model at ``epoch``, frozen; kept for the later analyzers when ``keep``."""
        model = self._models.get(epoch)
        if model is None:
            from explainkit.train.checkpoint import live_model_at, load_model

            if self.live is not None:
                model = live_model_at(self.live, self.run.path, self.registries, epoch)
                model = model.to(self.device)
            else:
                model = load_model(self.run.path, self.registries, epoch, self.device)
            for p in model.parameters():
                p.requires_grad_(False)
            model.eval()
            if keep:
                self._models[epoch] = model
        return model

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
    task = getattr(store, "task", "classification")
    if store is not None and task not in cls.tasks and "*" not in cls.tasks:
        reasons.append(f"a {' or '.join(cls.tasks)} run, and this run's task is {task}")
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
    """Map ``{"gallery_count": 8}`` (options named like their flags) to per-analyzer options.

    Raises:
        AnalyzerError: An unknown option or a value its declared type refuses.
    """
    lookup: dict[str, tuple[str, Option]] = {}
    for name, entry in entries.items():
        for opt in entry.cls.options:
            lookup[opt.key(name)] = (name, opt)
    out: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
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
    *,
    registries: Registries | None = None,
    plugins_dir: str | os.PathLike[str] | None = None,
    echo: Callable[[str], None] | None = None,
    collect_failures: bool = False,
    model: torch.nn.Module | None = None,
    **options: Any,
) -> Results:
    """Run analyzers on a run directory and return their manifests (sorted by ``order``).

    Args:
        run: The run directory.
        plugins: Analyzer names; None runs every analyzer whose needs the run meets.
        epoch: Epoch to analyze (default: the best by eval accuracy).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:N``.
        batch_size: Batch size for model passes.
        seed: Seed of each analyzer's generators.
        registries: What the plugins registered (default: ``load_registries(plugins_dir)``).
        plugins_dir: Folder of plugin modules, when ``registries`` is not given.
        echo: Receives one status line per analyzer and warnings (default: ``warnings``).
        collect_failures: Return a failed analyzer's manifest (``status == "failed"``) instead
            of raising; the other analyzers run either way.
        model: The live module the run was written from (``explainkit.evaluate(model, ...)``
            in a notebook): used instead of rebuilding the run's model from its recorded
            architecture, which a plain ``nn.Sequential`` or a class without ``num_classes``
            cannot be. A copy is given each epoch's weights from the run's checkpoints; the
            module itself is not changed.
        **options: Analyzer options as keywords named like their flags, e.g.
            ``gradcam_layer="layer3"`` for ``--gradcam-layer layer3``.

    Returns:
        One manifest dict per analyzer run, as written to ``analyses/<name>/manifest.json``,
        in a list that a notebook shows as figures and tables (:class:`Results`).
        With ``collect_failures``, a failed analyzer has ``status == "failed"`` and an
        ``error`` sentence. Under torchrun every rank gets rank 0's manifests
        (``results.is_main`` is False on the others).

    Raises:
        RunError: The run directory is missing or not a run, or the epoch is not in it; under
            torchrun, another process stopped or the ranks disagree on what to run.
        PluginError: An unknown analyzer name.
        AnalyzerError: An unknown option or invalid option value.
        AnalysisFailed: An analyzer failed (after all of them ran), unless
            ``collect_failures``.
    """
    from explainkit.manager import load_registries

    rundir = RunDir(run).check()
    if registries is None:
        registries = load_registries(plugins_dir)
    entries = registries.analyzers
    per_analyzer = split_options(entries, options)
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

    shared = _SharedRun(rundir, device, registries, say, live=model)
    joined = _join_torchrun(shared)
    if not shared.is_main:  # rank 0 speaks for the job
        say = shared.say = warn = lambda line: None  # type: ignore[assignment]
    failed = True
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
        if shared.dist is not None:
            check_same_plan(shared.dist, epoch, [name for name, _, _ in todo])
        manifests = Results(rundir.path, is_main=shared.is_main)
        for name, cls, reasons in todo:
            given = per_analyzer.get(name, {})
            if shared.dist is None:
                context = _new_context(shared, name, epoch, batch_size, seed)
                manifest = _run_one(cls, context, reasons, given)
            else:
                manifest = _run_on_ranks(shared, cls, reasons, given, epoch, batch_size, seed)
            manifests.append(manifest)
            if manifest["status"] == "ok":
                n = len(manifest["artifacts"])
                where = rundir.analysis(name)
                warned = sum(w["category"] != "log" for w in manifest.get("warnings", []))
                note = f", {warned} warning(s) recorded for the report" if warned else ""
                say(f"ok      {name}: {n} file(s) in {where} ({manifest['seconds']:.1f} s{note})")
            else:
                say(f"failed  {name}: {manifest['error']}")
        failed = False
        if not collect_failures and any(m["status"] != "ok" for m in manifests):
            raise AnalysisFailed(manifests)
        return manifests
    finally:
        shared.close()
        if joined:
            leave_torchrun(failed)


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


# -- torchrun: one analyze call over several processes -------------------------------------


def _join_torchrun(shared: _SharedRun) -> bool:
    """Join torchrun's process group when launched by it; True when this call joined."""
    joined = join_torchrun(shared.device_name)
    if joined is None:
        return False
    shared.dist, shared._device, ours = joined
    return ours


def _run_on_ranks(
    shared: _SharedRun,
    cls: type[Analyzer],
    reasons: list[str],
    given: dict[str, Any],
    epoch: int,
    batch_size: int,
    seed: int,
) -> dict:
    """One analyzer under torchrun (:func:`explainkit.sharding.run_on_ranks`)."""
    assert shared.dist is not None
    name = cls.name

    def run_main(make_shard: ShardMaker | None) -> dict:
        context = _new_context(shared, name, epoch, batch_size, seed)
        shared.shard = make_shard(context.output_dir) if make_shard else None
        return _run_one(cls, context, reasons, given)

    def run_share(make_shard: ShardMaker) -> None:
        with tempfile.TemporaryDirectory(prefix=f"explainkit-{name}-") as tmp:
            context = _host_context(shared, name, epoch, batch_size, seed, Path(tmp))
            shared.shard = make_shard(context.output_dir)
            _run_share(cls, context, given)

    sharded = is_shardable(cls) and not reasons
    try:
        return run_on_ranks(
            shared.dist, shared.run.analyses, name, shared.store.num_images, sharded,
            run_main, run_share,
        )  # fmt: skip
    finally:
        shared.shard = None


def _run_share(cls: type[Analyzer], context: AnalysisContext, given: dict[str, Any]) -> None:
    """A rank other than 0 runs a sharded analyzer: its parts only; rank 0 publishes."""
    error = None
    try:
        cls().run(context, **{**cls.option_defaults(), **given})
    except (Exception, SystemExit) as e:
        error = error_sentence(e)
    assert context.resources.shard is not None  # type: ignore[attr-defined]
    context.resources.shard.sync(error)  # type: ignore[attr-defined]


def _other_ranks_failed(context: AnalysisContext, error: str | None) -> str | None:
    """On rank 0, after a sharded analyzer's run: wait for the others (unless ``merge`` did)
    and return the first failure among them."""
    shard = getattr(context.resources, "shard", None)
    return None if shard is None else shard.sync(error)


class _HostContext(AnalysisContext):
    """The context the host hands out: progress bars only on rank 0 under torchrun."""

    def progress(
        self, iterable: Iterable[Any], desc: str | None = None, total: int | None = None
    ) -> Iterable[Any]:
        if not getattr(self.resources, "is_main", True):
            return iterable
        shard = getattr(self.resources, "shard", None)
        if shard is not None and desc:
            desc = f"{desc} (rank 0 of {shard.world_size})"
        return super().progress(iterable, desc=desc, total=total)


def _host_context(
    shared: _SharedRun, name: str, epoch: int, batch_size: int, seed: int, output_dir: Path
) -> AnalysisContext:
    return _HostContext(
        run_dir=shared.run.path,
        epoch=epoch,
        batch_size=batch_size,
        seed=seed,
        output_dir=output_dir,
        analyzer_name=name,
        resources=shared,
    )


def _new_context(
    shared: _SharedRun, name: str, epoch: int, batch_size: int, seed: int
) -> AnalysisContext:
    """A fresh context writing to a private temporary folder of this process."""
    analyses = shared.run.analyses
    analyses.mkdir(exist_ok=True)
    remove_stale_tmp(analyses, name)
    tmp = analyses / f".{name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    return _host_context(shared, name, epoch, batch_size, seed, tmp)


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
    said = Said(tmp)  # its warnings go into the manifest, beside the figures they concern
    try:
        try:
            if reasons:
                raise AnalyzerError(f"{name} needs {'; '.join(reasons)}")
            with said:
                artifacts = cls().run(context, **options)
            elsewhere = _other_ranks_failed(context, None)
            if elsewhere:
                raise AnalyzerError(elsewhere)
            manifest["artifacts"] = _check_artifacts(name, artifacts, tmp)
        except (Exception, SystemExit) as e:  # a plugin's sys.exit() ends only its own run
            _other_ranks_failed(context, error_sentence(e))  # they must not wait for rank 0
            manifest["status"] = "failed"
            manifest["error"] = error_sentence(e)
            if not isinstance(e, ExplainkitError):
                manifest["traceback"] = traceback.format_exc()
            manifest["artifacts"] = []
        manifest["seconds"] = round(time.perf_counter() - start, 3)
        manifest["warnings"] = said.records(manifest["artifacts"])
        if said.omitted:
            manifest["warnings_omitted"] = said.omitted
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


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in values.items():
        out[k] = v if isinstance(v, str | int | float | bool | type(None) | list) else str(v)
    return out
