"""The ``explainkit`` command line.

Only the standard library, click and explainkit's light modules are imported here; torch,
h5py and matplotlib are imported inside the commands that need them, so ``--help`` is fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from explainkit import __version__
from explainkit.cli_params import (
    PLUGINS_DIR_OPTION,
    TRUST_IMPORTS_OPTION,
    AnalyzeCommand,
    check_device,
    config_options,
)
from explainkit.config import EvalConfig, TrainConfig
from explainkit.errors import ExplainkitError, unknown_name_message
from explainkit.rundir import RunDir


class ExplainkitGroup(click.Group):
    """Turns ExplainkitError into one line on stderr and exit 1, or 2 for a bad value
    (ConfigError); a traceback with --verbose."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ExplainkitError as e:
            if ctx.params.get("verbose"):
                raise
            error = click.ClickException(str(e))
            # A bad value (ConfigError) is a usage error like click's own: exit 2.
            error.exit_code = e.exit_code
            raise error from e
        except OSError as e:
            # Disk full, permission denied, ...: the OS's own sentence is the clearest one.
            if ctx.params.get("verbose"):
                raise
            where = f" ({e.filename})" if getattr(e, "filename", None) else ""
            raise click.ClickException(f"{e.strerror or e}{where}") from e

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        # Plugin commands are loaded only for a name that is not built in, so --help stays light.
        return super().get_command(ctx, cmd_name) or _plugin_command(self, cmd_name)


@click.group(cls=ExplainkitGroup)
@click.version_option(__version__, prog_name="explainkit")
@click.option("--verbose", is_flag=True, help="Show full tracebacks for errors.")
def cli(verbose: bool) -> None:
    """Train image classifiers and explain what they learned.

    A training run writes a run directory (config, checkpoints, HDF5 prediction store);
    analyzers read it and write figures and tables under RUN/analyses/.
    """
    if not verbose:  # warnings as one line each, without the source line Python adds
        import warnings

        warnings.formatwarning = _one_line_warning


def _one_line_warning(message: Warning | str, *args: Any, **kwargs: Any) -> str:
    return f"warning: {message}\n"


@cli.command()
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False),
    help="JSON or YAML file of options; options on the command line override it.",
)
@click.option(
    "--out", type=click.Path(file_okay=False), help="Run directory (default runs/<time>)."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing run directory.")
@click.option(
    "--resume",
    type=click.Path(file_okay=False),
    help="Continue the run in this directory from its last checkpoint (--epochs may grow).",
)
@click.option("--quiet", is_flag=True, help="No progress bars; only the per-epoch summary lines.")
@TRUST_IMPORTS_OPTION
@PLUGINS_DIR_OPTION
@config_options(TrainConfig)
@click.pass_context
def train(
    ctx: click.Context,
    config_file: str | None,
    out: str | None,
    overwrite: bool,
    resume: str | None,
    quiet: bool,
    plugins_dir: Path | None,
    **values: Any,
) -> None:
    """Train a model and write a run directory.

    --model and --dataset take any registered name: explainkit's own, torchvision:NAME,
    timm:NAME, or one a plugin registers (installed, or in --plugins-dir).
    """
    from explainkit.config import resolve_config
    from explainkit.manager import load_registries

    registries = load_registries(plugins_dir)  # where --model and --dataset are looked up

    explicit = {
        name
        for name in values
        if ctx.get_parameter_source(name)
        in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    }
    if resume:
        if out or overwrite or config_file:
            raise click.UsageError(
                "--resume takes the run's own config; drop --out/--overwrite/--config"
            )
        from explainkit.config import check_value
        from explainkit.train.trainer import resume_config

        given = {k: check_value(k, values[k]) for k in explicit}  # a bad value: exit 2 first
        config = resume_config(Path(resume), given, registries)
        out = resume
    else:
        config = resolve_config(values, explicit, config_file, registries)
    from explainkit.train.tasks import train as run_training

    run_dir = run_training(
        config, registries, out=out, overwrite=overwrite, quiet=quiet, resume=bool(resume)
    )
    if os.environ.get("RANK", "0") == "0":
        click.echo(f"run written to {run_dir}", err=True)


@cli.command("evaluate")
@click.option(
    "--out", type=click.Path(file_okay=False), help="Run directory (default runs/<time>)."
)
@click.option("--overwrite", is_flag=True, help="Replace an existing run directory.")
@TRUST_IMPORTS_OPTION
@PLUGINS_DIR_OPTION
@config_options(EvalConfig)
def evaluate_command(
    out: str | None, overwrite: bool, plugins_dir: Path | None, **values: Any
) -> None:
    """Evaluate a model explainkit did not train and write a run directory for it.

    The model (--model, any registered name) with --weights (a state_dict file, an
    explainkit checkpoint or a weights name) is evaluated once on the eval split of
    --dataset (every image of a folder without train/ and val/); every analyzer and
    `explainkit report` then read the run as a trained one. Images are fitted to the model's
    expected input (--image-size, --fit); the two lines printed first say what was read and
    used.
    """
    from explainkit.evaluation import evaluate_run
    from explainkit.manager import load_registries

    registries = load_registries(plugins_dir)
    main = int(os.environ.get("RANK", "0")) == 0  # under torchrun, rank 0 speaks and writes
    run_dir = evaluate_run(
        EvalConfig(**values), registries, out=out, overwrite=overwrite,
        say=(lambda line: click.echo(line, err=True)) if main else None,
    )  # fmt: skip
    if main:
        click.echo(f"run written to {run_dir}", err=True)


@cli.command()
@click.argument("run", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@TRUST_IMPORTS_OPTION
def inspect(run: str, as_json: bool) -> None:
    """Summarize a run: config, epochs, accuracy, checkpoints, store, analyses."""
    import json

    from explainkit.manager import load_registries
    from explainkit.run_summary import format_summary, summarize_run

    summary = summarize_run(RunDir(run), load_registries())
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(format_summary(summary))


# -- analyze and plugins (analyzers come from the plugin registry, loaded only when needed) --


@cli.command("analyze", cls=AnalyzeCommand)
@click.argument("run", type=click.Path(path_type=Path))
@click.option(
    "--plugin",
    "plugin_names",
    multiple=True,
    metavar="NAME",
    help="Analyzer to run (repeatable); default: every analyzer this run supports.",
)
@click.option(
    "--epoch", type=click.IntRange(min=1), help="Epoch to analyze (default: best eval accuracy)."
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    callback=check_device,
    help="auto (CUDA when available), cpu, cuda or cuda:N.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=64,
    show_default=True,
    help="Images per batch for model passes.",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for sampling.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifests as JSON on stdout.")
@TRUST_IMPORTS_OPTION
@PLUGINS_DIR_OPTION
@click.pass_context
def analyze_command(
    ctx: click.Context,
    run: Path,
    plugin_names: tuple[str, ...],
    epoch: int | None,
    device: str,
    batch_size: int,
    seed: int,
    as_json: bool,
    plugins_dir: Path | None,
    **analyzer_options: Any,
) -> None:
    """Run analyzers on a run directory; results go to RUN/analyses/<name>/.

    Prints one status line per analyzer on stderr and the manifest paths (or, with --json,
    the manifests) on stdout. Exits 1 when any analyzer failed; the others still ran.

    Under torchrun (torchrun --nproc-per-node N -m explainkit analyze ...), shardable
    analyzers such as gradcam share the images among the processes; rank 0 runs the others
    and reports (docs/distributed.md).
    """
    import json

    from explainkit.manager import load_registries
    from explainkit.runner import analyze as run_analyzers

    registries = load_registries(plugins_dir)
    entries = registries.analyzers
    for name in plugin_names:
        if name not in entries:
            raise click.BadParameter(
                unknown_name_message("analyzer", name, list(entries)), param_hint="--plugin"
            )
    rundir = RunDir(run).check()
    given = {
        key: value
        for key, value in analyzer_options.items()
        if ctx.get_parameter_source(key)
        in (ParameterSource.COMMANDLINE, ParameterSource.ENVIRONMENT)
    }
    manifests = run_analyzers(
        run,
        plugins=list(plugin_names) or None,
        epoch=epoch,
        device=device,
        batch_size=batch_size,
        seed=seed,
        registries=registries,
        echo=lambda line: click.echo(line, err=True),
        collect_failures=True,
        **given,
    )
    failed = [m for m in manifests if m["status"] != "ok"]
    if not manifests.is_main:  # another torchrun rank: rank 0 reports for the job
        ctx.exit(1 if failed or not manifests else 0)
    if not manifests:
        raise click.ClickException(f"no analyzer can run on {run}; see the skipped lines above")
    if as_json:
        click.echo(json.dumps(manifests, indent=2))
    else:
        for m in manifests:
            click.echo(str(rundir.analysis(m["analyzer"]) / RunDir.MANIFEST))
    if failed:
        verbose = ctx.find_root().params.get("verbose")
        for m in failed:
            if verbose and m.get("traceback"):
                click.echo(m["traceback"], err=True)
        names = ", ".join(m["analyzer"] for m in failed)
        raise click.ClickException(
            f"{len(failed)} of {len(manifests)} analyzers failed: {names} "
            "(errors above; rerun with --verbose for tracebacks)"
        )


@cli.command("plugins")
@click.option("--all", "show_all", is_flag=True, help="Include explainkit's built-in plugins.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of text.")
@click.option("--hook", metavar="NAME", help="Only plugins that implement this hook.")
@PLUGINS_DIR_OPTION
def plugins_command(
    show_all: bool, as_json: bool, hook: str | None, plugins_dir: Path | None
) -> None:
    """List installed plugins: version, source, analyzers and options, models, datasets,
    hooks, load errors."""
    import json

    from explainkit.manager import hook_names, load_plugins, plugin_info

    pm = load_plugins(plugins_dir)
    if hook is not None and hook not in hook_names(pm):
        raise click.BadParameter(
            unknown_name_message("hook", hook, hook_names(pm)), param_hint="--hook"
        )
    rows = plugin_info(pm, include_builtin=show_all)
    if hook is not None:
        rows = [r for r in rows if hook in r["hooks"]]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("No third-party plugins installed (--all also lists built-ins).", err=True)
    for row in rows:
        version = f" {row['version']}" if row["version"] else ""
        where = row["source"] + (f" ({row['package']})" if row["package"] else "")
        click.echo(f"{row['name']}{version}  [{where}]")
        if row["hooks"]:
            click.echo(f"  hooks: {', '.join(row['hooks'])}")
        for a in row["analyzers"]:
            click.echo(f"  analyzer {a['name']}: {a['summary']}")
            for o in a["options"]:
                default = f" (default: {o['default']})" if o["default"] is not None else ""
                kind = "|".join(o["choices"]) if o["choices"] else o["type"].upper()
                click.echo(f"    {o['flag']} {kind}{default}  {o['help']}")
        for m in row["models"]:
            layer = f" [layer {m['default_layer']}]" if m.get("default_layer") else ""
            click.echo(f"  model {m['name']}: {m['summary']}{layer}".rstrip(": "))
        for d in row["datasets"]:
            click.echo(f"  dataset {d['name']}: {d['summary']}".rstrip(": "))
        for error in row["errors"]:
            click.echo(f"  error: {error}")


_plugin_commands_loaded = False


def _plugin_command(group: click.Group, name: str) -> click.Command | None:
    """Look ``name`` up among plugin commands (``register_commands``), loading them once.

    Meant for ``ExplainkitGroup.get_command`` when a name is not a built-in command, so that
    plugin commands cost nothing for ``explainkit --help`` and built-in commands.
    """
    global _plugin_commands_loaded
    if not _plugin_commands_loaded:
        from explainkit.manager import load_plugins, register_plugin_commands

        _plugin_commands_loaded = True
        register_plugin_commands(group, load_plugins())
    return group.commands.get(name)


# -- report and demo -------------------------------------------------------------------------


@cli.command("report")
@click.argument("run", type=click.Path(path_type=Path))
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to write the HTML file (default RUN/report.html).",
)
@click.option("--open", "open_browser", is_flag=True, help="Open the report in a web browser.")
@click.option("--overwrite", is_flag=True, help="Replace an existing file given with --out.")
@TRUST_IMPORTS_OPTION
@PLUGINS_DIR_OPTION
def report_command(
    run: Path, out: Path | None, open_browser: bool, overwrite: bool, plugins_dir: Path | None
) -> None:
    """Build one self-contained HTML page of a run and all its analyses.

    Prints the path of the written file. The page embeds its images and needs no network.
    RUN/report.html is the run's own and is replaced; a file given with --out is replaced
    only with --overwrite.
    """
    from explainkit.manager import load_registries
    from explainkit.report import build_report

    RunDir(run).check()
    if out is not None and out.exists() and not overwrite:
        raise click.ClickException(
            f"{out} already exists; pass --overwrite to replace it or choose another --out"
        )
    path = build_report(run, load_registries(plugins_dir), out=out)
    click.echo(str(path))
    if open_browser:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())


@cli.command("serve")
@click.argument("runs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=8000,
    show_default=True,
    help="Port to listen on (0: any free port, printed).",
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; any other than 127.0.0.1 lets that network read the runs.",
)
@click.option(
    "--device",
    default=None,
    callback=lambda c, p, v: v and check_device(c, p, v),
    help="Where maps no analysis stored are computed (default: the run's device).",
)
@PLUGINS_DIR_OPTION
def serve_command(
    runs: tuple[Path, ...], port: int, host: str, device: str | None, plugins_dir: Path | None
) -> None:
    """Explore every eval image of one or more runs in a web browser (read-only).

    A thumbnail grid with filters, sorts and the confusion matrix; each image's maps side by
    side, computed on demand when no analysis stored them; two runs on the same eval set
    compared. Needs the [explorer] extra (Starlette, uvicorn). docs/explorer.md.
    """
    from explainkit.manager import load_registries
    from explainkit.serve import serve

    for run in runs:
        RunDir(run).check()
    serve(list(runs), host, port, load_registries(plugins_dir), device, say=click.echo)


@cli.command("demo")
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs/demo"),
    show_default=True,
    help="Run directory to create.",
)
@click.option(
    "--dataset",
    type=click.Choice(["shapes", "cifar10"]),
    default="shapes",
    show_default=True,
    help="shapes: synthetic, offline; cifar10: real photos from --data-dir.",
)
@click.option("--data-dir", type=click.Path(file_okay=False), help="CIFAR-10 folder (cifar10).")
@click.option("--epochs", type=click.IntRange(min=1), help="Override the demo's epochs.")
@click.option(
    "--device",
    default="auto",
    show_default=True,
    callback=check_device,
    help="auto (CUDA when available), cpu, cuda or cuda:N.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing run directory.")
@click.option("--open", "open_browser", is_flag=True, help="Open the report when done.")
@click.option("--limit", type=click.IntRange(min=16), hidden=True, help="Train on N images.")
@PLUGINS_DIR_OPTION
def demo_command(
    out: Path,
    dataset: str,
    data_dir: str | None,
    epochs: int | None,
    device: str,
    overwrite: bool,
    open_browser: bool,
    limit: int | None,
    plugins_dir: Path | None,
) -> None:
    """Train a small ResNet18, run every analyzer and build the report, offline.

    A few minutes on a laptop CPU (reduced width and data); full width on a GPU. The settings
    are in explainkit/demo.py. Prints the report's path on stdout.
    """
    from explainkit.demo import run_demo
    from explainkit.manager import load_registries

    if dataset == "cifar10" and data_dir is None:
        raise click.BadParameter("--dataset cifar10 needs --data-dir", param_hint="--data-dir")
    result = run_demo(
        out=out,
        dataset=dataset,
        data_dir=data_dir,
        epochs=epochs,
        device=device,
        overwrite=overwrite,
        limit=limit,
        registries=load_registries(plugins_dir),
        echo=lambda line: click.echo(line, err=True),
        quiet=not sys.stderr.isatty(),
    )
    click.echo(f"demo: report written to {result.report}", err=True)
    click.echo(str(result.report))
    if open_browser:
        import webbrowser

        webbrowser.open(result.report.resolve().as_uri())
    if result.failed:
        raise click.ClickException(
            f"{len(result.failed)} analyzer(s) failed: {', '.join(result.failed)} "
            "(errors above and in the report)"
        )


def main() -> None:
    """Console-script entry point."""
    try:
        cli(prog_name="explainkit")
    except SystemExit as e:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            _exit_without_finalizing(e.code)
        raise


def _exit_without_finalizing(code: Any) -> None:
    """Leave a torchrun rank without tearing down the interpreter.

    The process group is already destroyed, but gloo's worker threads may still hold
    tensors; freeing them while the interpreter finalizes aborts the process
    ("terminate called without an active exception", pytorch#179291) after all the work
    was done. Everything is flushed first, so nothing is lost.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
