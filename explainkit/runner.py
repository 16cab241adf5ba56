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
import logging
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
    AnalyzerError,
    ExplainkitError,
    PluginError,
    RunError,
    error_sentence,
    unknown_name_message,
)
from explainkit.rundir import RunDir, pid_alive
from explainkit.sharding import Shard, is_shardable

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from explainkit.manager import AnalyzerEntry, ExplainkitPluginManager
    from explainkit.store import StoreReader
    from explainkit.train.distributed import DistContext

__all__ = ["AnalysisFailed", "Results", "analyze", "split_options", "unmet_needs"]

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
        _check_same_plan(shared, epoch, [name for name, _, _ in todo])
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
                say(f"ok      {name}: {n} file(s) in {where} ({manifest['seconds']:.1f} s)")
            else:
                say(f"failed  {name}: {manifest['error']}")
        failed = False
        if not collect_failures and any(m["status"] != "ok" for m in manifests):
            raise AnalysisFailed(manifests)
        return manifests
    finally:
        shared.close()
        if joined:
            _leave_torchrun(failed)


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

# Ranks wait at a collective while rank 0 runs an analyzer that is not sharded: allow long ones.
WAIT_FOR_RANK_0 = 12 * 3600


def _join_torchrun(shared: _SharedRun) -> bool:
    """Join torchrun's process group (gloo: only small Python objects travel) and give this
    rank its own device, ``cuda:LOCAL_RANK`` when CUDA is asked for. True when it joined."""
    from explainkit.train.distributed import launched_by_torchrun

    if not launched_by_torchrun():
        return False
    from datetime import timedelta

    import torch.distributed

    from explainkit.device import resolve_device
    from explainkit.train.distributed import init_from_env

    requested = resolve_device(shared.device_name)  # an unusable device is one sentence
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    gpus = torch.cuda.device_count() if requested.type == "cuda" else 0
    if requested.type == "cuda" and local_rank >= gpus:
        raise RunError(
            f"torchrun started local process {local_rank} but this machine has {gpus} GPU(s), "
            f"one per process; use --nproc-per-node {gpus} or fewer, or --device cpu"
        )
    if int(os.environ.get("RANK", "0")) != 0:  # rank 0 speaks for the job; errors still show
        logging.getLogger("explainkit").setLevel(logging.ERROR)
    initialized = torch.distributed.is_initialized()  # by the caller: leave it to them
    dist = init_from_env(requested.type, "gloo", timedelta(seconds=WAIT_FOR_RANK_0))
    shared.dist = dist
    shared._device = dist.device if requested.type == "cuda" else requested
    return not initialized


def _leave_torchrun(failed: bool) -> None:
    """Leave the process group; after a failure a peer may be gone, so do not wait for it."""
    import torch.distributed as dist

    from explainkit.train.distributed import shutdown

    if failed:
        if dist.is_initialized():
            dist.destroy_process_group()
        return
    try:
        shutdown()
    except RuntimeError as e:
        raise RunError(_gone(e)) from e


def _gone(e: BaseException) -> str:
    """What a rank says when a collective fails because another rank is gone (``e`` is
    gloo's connection error, which names no rank: torchrun's own report does)."""
    return (
        "another process of this torchrun job stopped (torchrun names it below); analyses "
        "published before it stopped are complete, the one running was not published"
    )


def _check_same_plan(shared: _SharedRun, epoch: int, names: list[str]) -> None:
    """Every rank must run the same analyzers on the same epoch, or the collectives of one
    analyzer would meet those of another."""
    if shared.dist is None:
        return
    try:
        plans = shared.dist.gather_objects((epoch, names))
    except RuntimeError as e:
        raise RunError(_gone(e)) from e
    if any(plan != plans[0] for plan in plans):
        raise RunError(
            f"the ranks of this torchrun job disagree on what to run ({plans[0]} on rank 0); "
            "do all nodes see the same run directory and plugins?"
        )


def _run_on_ranks(
    shared: _SharedRun,
    cls: type[Analyzer],
    reasons: list[str],
    given: dict[str, Any],
    epoch: int,
    batch_size: int,
    seed: int,
) -> dict:
    """One analyzer under torchrun: a shardable one on every rank, any other on rank 0 while
    the others wait. Every rank returns rank 0's manifest."""
    dist, name = shared.dist, cls.name
    assert dist is not None
    sharded = is_shardable(cls) and not reasons
    parts = None
    try:
        if sharded:
            parts = _parts_folder(shared, name)
        if dist.rank == 0:
            context = _new_context(shared, name, epoch, batch_size, seed)
            if sharded:
                shared.shard = _shard(shared, context, parts)
            manifest = _run_one(cls, context, reasons, given)
        elif sharded:
            with tempfile.TemporaryDirectory(prefix=f"explainkit-{name}-") as tmp:
                context = _host_context(shared, name, epoch, batch_size, seed, Path(tmp))
                shared.shard = _shard(shared, context, parts)
                _run_share(cls, context, given)
            manifest = None
        else:
            manifest = None
        try:
            return dist.broadcast_object(manifest)
        except RuntimeError as e:
            raise RunError(_gone(e)) from e
    finally:
        shared.shard = None
        if parts is not None and dist.rank == 0:
            shutil.rmtree(parts, ignore_errors=True)


def _parts_folder(shared: _SharedRun, name: str) -> Path:
    """``analyses/.<name>.parts-<pid of rank 0>``, made by rank 0 and named to all ranks."""
    assert shared.dist is not None
    folder = None
    if shared.dist.rank == 0:
        shared.run.analyses.mkdir(exist_ok=True)
        _remove_stale_tmp(shared.run.analyses, name)
        folder = shared.run.analyses / f".{name}.parts-{os.getpid()}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
    try:
        return Path(shared.dist.broadcast_object(str(folder)))
    except RuntimeError as e:
        raise RunError(_gone(e)) from e


def _shard(shared: _SharedRun, context: AnalysisContext, parts: Path | None) -> Shard:
    assert shared.dist is not None
    n = shared.store.num_images
    rank, world = shared.dist.rank, shared.dist.world_size
    return Shard(rank, world, n, context.output_dir, parts, context.analyzer_name, shared.dist)


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
    _remove_stale_tmp(analyses, name)
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
    try:
        try:
            if reasons:
                raise AnalyzerError(f"{name} needs {'; '.join(reasons)}")
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
    for prefix in (f".{name}.tmp-", f".{name}.old-", f".{name}.parts-"):
        for path in analyses.glob(f"{prefix}*"):
            pid_text = path.name[len(prefix) :].split("-")[0]
            if pid_text.isdigit() and int(pid_text) != os.getpid() and not pid_alive(int(pid_text)):
                shutil.rmtree(path, ignore_errors=True)


def _jsonable(values: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in values.items():
        out[k] = v if isinstance(v, str | int | float | bool | type(None) | list) else str(v)
    return out
