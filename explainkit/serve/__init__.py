"""``explainkit serve``: every eval image of one or more runs, explored in a browser.

A local, read-only web app (Starlette on uvicorn, the ``[explorer]`` extra): a paged, filtered
thumbnail grid, a confusion matrix to click, a detail view with every method's map side by
side (computed on demand when no analysis stored it), the map at each saved epoch, CSV export
of a selection and two runs compared on the same eval set. docs/explorer.md describes it.

Modules: :mod:`.runs` (a served run: per-image columns, the files it may read), :mod:`.maps`
(PNG images and maps, the on-demand engine), :mod:`.tasks` (a task run's columns, boxes and
masks), :mod:`.items` (a task run's maps, one per detection, region or label), :mod:`.app`
(the routes).
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from explainkit.errors import ConfigError, ExplainkitError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
EXTRA = "the explorer needs Starlette and uvicorn: pip install 'explainkit[explorer]'"


def open_runs(paths: Sequence[str | Path]) -> list[Any]:
    """Open every run for serving (closing those already open when one fails)."""
    from explainkit.serve.runs import open_run

    runs: list[Any] = []
    try:
        for position, path in enumerate(paths):
            runs.append(open_run(position, path))
    except BaseException:
        for run in runs:
            run.close()
        raise
    names = [r.name for r in runs]
    for r in runs:  # two runs called "run" in different folders: show their parents too
        if names.count(r.name) > 1:
            r.name = f"{r.run.path.parent.name}/{r.name}"
    return runs


def build_app(
    paths: Sequence[str | Path], registries: Any = None, device: str | None = None
) -> Any:
    """The explorer's ASGI app over the run directories ``paths``.

    ``registries`` (``explainkit.load_registries()``) load the runs' models to compute maps
    the analyses did not store; without them those maps are an error on their view.
    """
    try:
        from explainkit.serve.app import create_app
    except ImportError as e:
        raise ExplainkitError(EXTRA) from e
    from explainkit.serve.maps import Engine

    return create_app(open_runs(paths), Engine(registries, device))


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on ``host``:``port`` (0: any free port); one sentence when taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    sock.listen(128)
    return sock


def serve(
    paths: Sequence[str | Path],
    host: str = "127.0.0.1",
    port: int = 8000,
    registries: Any = None,
    device: str | None = None,
    say: Callable[[str], None] = print,
) -> None:
    """Serve the explorer until interrupted (Ctrl-C)."""
    try:
        import uvicorn
    except ImportError as e:
        raise ExplainkitError(EXTRA) from e
    app = build_app(paths, registries, device)
    sock = bind(host, port)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{shown}:{sock.getsockname()[1]}/"
    if host not in LOCAL_HOSTS:
        say(
            f"warning: listening on {host}: anyone who can reach this machine on that network "
            "can read these runs (images, predictions, maps); use --host 127.0.0.1 to keep "
            "them local"
        )
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=2)

    class Server(uvicorn.Server):
        """Says where it listens once started: by then Ctrl-C is uvicorn's to handle, so a
        client that stops it as soon as it reads the line never interrupts the startup."""

        async def startup(self, sockets: Any = None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                say(f"explorer of {len(paths)} run(s) at {url} (Ctrl-C to stop)")

    try:
        Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn stops on Ctrl-C, then raises it again: done
        pass
    finally:
        sock.close()
        for run in app.state.runs:
            run.close()
    say("explorer stopped")
