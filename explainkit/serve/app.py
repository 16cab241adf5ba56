"""The explorer's web app: Starlette routes over the served runs, read-only.

Every route names a run by its position in the command line, an image by its index and a map
by a key found when the run opened (:mod:`explainkit.serve.runs`); each value is checked
before anything is read, and nothing in a request becomes a path. Handlers are plain
functions, which Starlette runs in its thread pool, so a slow map does not hold up the grid.
A view whose file is missing or damaged answers with that one error; the server goes on.
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import (
    HTMLResponse,
    JSONResponse,
    PlainTextResponse,
    RedirectResponse,
    Response,
)
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from explainkit.errors import ExplainkitError
from explainkit.serve.items import item_detail
from explainkit.serve.maps import (
    Engine,
    MapError,
    NotExplained,
    Thumbnails,
    colorize,
    explained,
    image_png,
    png,
    stored_map,
)
from explainkit.serve.runs import OUTCOMES, Filters, ServedRun, inside, number
from explainkit.serve.tasks import SETS, mask_png

HERE = Path(__file__).parent
PER_PAGE = (24, 48, 96, 192)
MAX_IDS = 10_000
THUMB = 112  # the grid's thumbnail size (explorer.js asks for it)
MATRIX_CLASSES = 40  # a confusion matrix up to this many classes; above, the top pairs
PNG_HEADERS = {"Cache-Control": "private, max-age=3600"}


class BadRequest(ValueError):
    """A query value the explorer cannot use: answered with 400 and this sentence."""


def _templates() -> Any:
    import jinja2

    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
    )


class Explorer:
    """The served runs, the map engine and the routes over them."""

    def __init__(self, runs: list[ServedRun], engine: Engine) -> None:
        self.runs = runs
        self.engine = engine
        self.thumbs = Thumbnails()
        self.env = _templates()

    # -- lookups: every request value is checked here ------------------------------------

    def run(self, request: Request, name: str = "run") -> ServedRun:
        text = str(request.path_params.get(name, ""))
        position = number(text)
        if position is None or position >= len(self.runs):
            raise LookupError(
                f"no run {text[:40]!r}; this server shows runs 0..{len(self.runs) - 1}"
            )
        return self.runs[position]

    def filters(self, run: ServedRun, q: Any) -> Filters:
        """The grid's query string as :class:`Filters`; BadRequest names a bad value."""
        f = Filters()
        f.true = _class(run, q.get("true"), "true")
        f.pred = _class(run, q.get("pred"), "pred")
        f.label = _class(run, q.get("label"), "label")
        f.has = q.get("has") or "true"
        if f.has not in SETS:
            raise BadRequest(f"has must be one of {', '.join(SETS)}")
        if run.is_task and (f.true is not None or f.pred is not None):
            raise BadRequest(
                f"a {run.task} run has no single true or predicted class per image; "
                "filter by label and has"
            )
        correct = q.get("correct") or ""
        if correct not in ("", "1", "0"):
            raise BadRequest("correct must be 1 (right), 0 (wrong) or empty")
        f.correct = None if correct == "" else correct == "1"
        f.conf_min = _fraction(q.get("conf_min"), 0.0, "conf_min")
        f.conf_max = _fraction(q.get("conf_max"), 1.0, "conf_max")
        ids = q.get("ids") or ""
        if ids:
            parts = ids.split(",")
            if len(parts) > MAX_IDS:
                raise BadRequest(f"ids names more than {MAX_IDS} images")
            try:
                f.ids = [run.image_index(p.strip()) for p in parts]
            except LookupError as e:
                raise BadRequest(str(e)) from None
        other = q.get("vs") or ""
        if other:
            position = number(other)
            if position is None or position >= len(self.runs):
                raise BadRequest(f"vs must be a run number in 0..{len(self.runs) - 1}")
            f.other = self.runs[position]
            if f.other.eval_set != run.eval_set:
                raise BadRequest(
                    f"runs {run.name} and {f.other.name} were not evaluated on the same "
                    "images; only runs with the same eval set compare"
                )
            f.outcome = q.get("outcome") or None
            if f.outcome not in (None, *OUTCOMES):
                raise BadRequest(f"outcome must be one of {', '.join(OUTCOMES)}")
        f.sort = q.get("sort") or "index"
        if f.sort not in run.sorts:
            raise BadRequest(f"sort must be one of {', '.join(run.sorts)}")
        f.desc = (q.get("desc") or "") == "1"
        return f

    def source(self, run: ServedRun, key: str) -> Any:
        if key not in run.sources:
            if run.items is not None and key in run.items.sources:
                raise LookupError(
                    f"the {key} maps of a {run.task} run are per item (a detection, a class "
                    "region, a label): ask /map/RUN/IMAGE/item/ITEM/KEY.png"
                )
            raise LookupError(f"no map {key[:40]!r} in run {run.name}")
        return run.sources[key]

    # -- pages -----------------------------------------------------------------------------

    def page(self, name: str, **values: Any) -> HTMLResponse:
        html = self.env.get_template(name).render(runs=self.runs, **values)
        return HTMLResponse(html, headers={"Content-Security-Policy": CSP})

    def index(self, request: Request) -> Response:
        if len(self.runs) == 1:
            return RedirectResponse("/runs/0/", status_code=302)
        return self.page("index.html")

    def grid_page(self, request: Request) -> Response:
        run = self.run(request)
        comparable = [r for r in self.runs if r is not run and r.eval_set == run.eval_set]
        from explainkit.serve.tasks import RIGHT_MEANS

        return self.page(
            "grid.html",
            run=run,
            comparable=comparable,
            per_page=PER_PAGE,
            right_means=RIGHT_MEANS.get(run.task, ""),
        )

    def detail_page(self, request: Request) -> Response:
        run = self.run(request)
        i = run.image_index(request.path_params["image"])
        h, w = run.store.images([i]).shape[1:3]
        scale = max(1, 256 // max(h, w))
        return self.page(
            "detail.html",
            image_width=w,
            image_height=h,
            run=run,
            i=i,
            source=run.store.sources([i])[0],
            info=self.detail(run, i),
            width=w * scale,
            height=h * scale,
        )

    def report(self, request: Request) -> Response:
        """The run's own report.html, whose figures link back here (``explore/NAME``)."""
        run = self.run(request)
        path = run.run.report_path
        if not inside(run.run, path):
            raise LookupError(f"run {run.name} has no report.html; run explainkit report first")
        return HTMLResponse(path.read_bytes())

    def explore(self, request: Request) -> Response:
        """A report's link into the explorer: the grid, with the analysis's maps first."""
        run = self.run(request)
        key = str(request.path_params["analysis"])
        known = key in run.sources or (run.items is not None and key in run.items.sources)
        query = {"method": key} if known else {}
        suffix = f"?{urlencode(query)}" if query else ""
        return RedirectResponse(f"/runs/{run.position}/{suffix}", status_code=302)

    # -- data ------------------------------------------------------------------------------

    def api_runs(self, request: Request) -> Response:
        return JSONResponse([self.summary(r) for r in self.runs])

    def summary(self, run: ServedRun) -> dict[str, Any]:
        return {
            "position": run.position,
            "name": run.name,
            "num_images": run.num_images,
            "epoch": run.epoch,
            "classes": run.classes,
            "task": run.task,
            "accuracy": float(run.right.mean()) if run.num_images else None,
            "sorts": run.sorts,
            "methods": [{"key": s.key, "label": s.label} for s in run.sources.values()],
            "item_methods": [{"key": s.key, "label": s.label} for s in run.items.sources.values()]
            if run.items is not None
            else [],
            "comparable": [
                r.position for r in self.runs if r is not run and r.eval_set == run.eval_set
            ],
        }

    def api_images(self, request: Request) -> Response:
        run = self.run(request)
        q = request.query_params
        f = self.filters(run, q)
        per_page = _integer(q.get("per_page"), 48, "per_page")
        if per_page not in PER_PAGE:
            raise BadRequest(f"per_page must be one of {', '.join(map(str, PER_PAGE))}")
        chosen = run.select(f)
        pages = max(1, math.ceil(len(chosen) / per_page))
        page = min(_integer(q.get("page"), 0, "page"), pages - 1)
        shown = chosen[page * per_page : (page + 1) * per_page]
        sources = run.store.sources(shown) if len(shown) else []
        if len(shown):
            self.thumbs.prefetch(run, shown, THUMB)
        items = [run.row(int(i), s) for i, s in zip(shown, sources, strict=True)]
        if not run.is_task and f.sort not in ("index", "confidence", "loss"):
            for item in items:
                value = float(run.scores[f.sort][item["index"]])
                item["score"] = None if math.isnan(value) else round(value, 6)
        return JSONResponse(
            {"total": int(len(chosen)), "page": page, "pages": pages, "items": items}
        )

    def selection_csv(self, request: Request) -> Response:
        """The filtered images as CSV, their file names first, in the grid's order."""
        run = self.run(request)
        chosen = run.select(self.filters(run, request.query_params))
        out = io.StringIO()
        writer = csv.writer(out)
        header = ["source", "index", "true", "predicted", "correct", "confidence", "loss"]
        if run.is_task:
            from explainkit.serve.tasks import COLUMNS

            header = ["source", "index", "correct", *COLUMNS[run.task]]
            header += [f"{s}_classes" for s in SETS]
        writer.writerow(header)
        for start in range(0, len(chosen), 4096):  # file names in blocks: bounded memory
            block = chosen[start : start + 4096]
            for i, source in zip(block, run.store.sources(block), strict=True):
                row = run.row(int(i), source)
                if run.is_task:
                    row.update(run.label_sets(int(i)))
                writer.writerow(["" if row[h] is None else row[h] for h in header])
        name = f"{run.name}-selection.csv".replace('"', "")
        return Response(
            out.getvalue(),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    def confusion(self, request: Request) -> Response:
        run = self.run(request)
        if run.is_task:  # per class: images holding it in their truth, prediction, mistakes
            counts = run.task_columns().counts()
            return JSONResponse(
                {
                    "classes": run.classes,
                    "task": run.task,
                    "labels": [
                        {"class": c, **{s: int(counts[s][k]) for s in SETS}}
                        for k, c in enumerate(run.classes)
                    ],
                }
            )
        m = run.confusion()
        k = len(run.classes)
        pairs = [(int(t), int(p), int(m[t, p])) for t, p in zip(*m.nonzero(), strict=True)]
        pairs = sorted((x for x in pairs if x[0] != x[1]), key=lambda x: -x[2])[:50]
        return JSONResponse(
            {
                "classes": run.classes,
                "matrix": m.tolist() if k <= MATRIX_CLASSES else None,
                "top": [{"true": t, "pred": p, "count": c} for t, p, c in pairs],
            }
        )

    def compare(self, request: Request) -> Response:
        a, b = self.run(request), self.run(request, "other")
        f = self.filters(a, {"vs": str(b.position)})
        counts = {}
        for outcome in OUTCOMES:
            f.outcome = outcome
            counts[outcome] = int(len(a.select(f)))
        return JSONResponse({"run": a.name, "other": b.name, "counts": counts})

    def api_image(self, request: Request) -> Response:
        run = self.run(request)
        return JSONResponse(self.detail(run, run.image_index(request.path_params["image"])))

    def detail(self, run: ServedRun, i: int) -> dict[str, Any]:
        classes = run.classes
        task: dict[str, Any] = {}
        if run.is_task:
            from explainkit.serve.tasks import detail

            task = detail(run.store, run.epoch, run.task_columns(), i)
            task.update(item_detail(run, i))
            if run.task == "segmentation":
                task["masks"] = {
                    w: f"/mask/{run.position}/{i}/{w}.png" for w in ("predicted", "true")
                }
        scores = {}
        for name, column in run.scores.items():
            value = float(column[i])
            scores[name] = None if math.isnan(value) else value
        return {
            **run.row(i, run.store.sources([i])[0]),
            "task": run.task,
            **task,
            "top": [
                {"class": classes[int(c)], "probability": float(p)}
                for c, p in zip(run.top_idx[i], run.top_prob[i], strict=True)
            ]
            if not run.is_task
            else [],
            "methods": [
                {
                    "key": s.key,
                    "label": s.label,
                    "stored": s.path is not None,
                    "url": f"/map/{run.position}/{i}/{s.key}.png",
                }
                for s in run.sources.values()
                if s.path is None or explained(s, i)
            ],
            "unexplained": [
                s.label for s in run.sources.values() if s.path is not None and not explained(s, i)
            ],
            "epochs": [
                {"epoch": e, "url": f"/map/{run.position}/{i}/epoch/{e}.png"}
                for e in run.checkpoints
            ],
            "scores": scores,
        }

    # -- images ----------------------------------------------------------------------------

    def image(self, request: Request) -> Response:
        run = self.run(request)
        i = run.image_index(str(request.path_params["image"]).removesuffix(".png"))
        size = _integer(request.query_params.get("size"), 0, "size")
        return Response(
            image_png(run, i, size or None), media_type="image/png", headers=PNG_HEADERS
        )

    def map(self, request: Request) -> Response:
        run = self.run(request)
        i = run.image_index(request.path_params["image"])
        source = self.source(run, str(request.path_params["key"]).removesuffix(".png"))
        if source.path is not None:
            if not inside(run.run, source.path):
                raise MapError(f"{source.key}/attributions.h5 is missing")
            m = stored_map(source, i, run.num_images)
        else:
            m = self.engine.compute(run, i, source.method, run.epoch, "predicted")
        return Response(png(colorize(m)), media_type="image/png", headers=PNG_HEADERS)

    def item_map(self, request: Request) -> Response:
        """One item's map of a task image: its row of a per-item file, or computed here."""
        from explainkit.serve.items import ItemError

        run = self.run(request)
        i = run.image_index(request.path_params["image"])
        if run.items is None:
            raise LookupError(f"run {run.name} is a classifier: its maps are per image")
        key = str(request.path_params["key"]).removesuffix(".png")
        source = run.items.sources.get(key)
        if source is None:
            raise LookupError(f"no item map {key[:40]!r} in run {run.name}")
        text = str(request.path_params["item"])
        item = run.items.item(run, i, number(text), text)
        if source.path is None:
            m = self.engine.compute_item(run, i, item, source.method)
        else:
            if not inside(run.run, source.path):
                raise MapError(f"{source.key}/attributions.h5 is missing")
            try:
                row = source.row_of(i, item, run.num_images)
                if row is None:
                    raise NotExplained(
                        f"the {source.key} analysis did not explain item {item.index} of image "
                        f"{i} (it explains its {source.target} items of epoch {source.epoch})"
                    )
                m = source.read_map(row)
            except ItemError as e:
                raise MapError(str(e)) from e
        return Response(png(colorize(m)), media_type="image/png", headers=PNG_HEADERS)

    def mask(self, request: Request) -> Response:
        """A segmentation run's predicted or true class mask of one image, coloured per class
        (background transparent) at the image's own resolution."""
        run = self.run(request)
        i = run.image_index(request.path_params["image"])
        which = str(request.path_params["which"]).removesuffix(".png")
        if run.task != "segmentation" or which not in ("predicted", "true"):
            raise LookupError(f"run {run.name} has no {which[:20]!r} mask; masks are 'predicted' "
                              "or 'true' of a segmentation run")  # fmt: skip
        return Response(mask_png(run.store, run.epoch, i, which), media_type="image/png",
                        headers=PNG_HEADERS)  # fmt: skip

    def epoch_map(self, request: Request) -> Response:
        """Grad-CAM of the true class with the checkpoint of one saved epoch (as the
        evolution analyzer draws them)."""
        run = self.run(request)
        i = run.image_index(request.path_params["image"])
        text = str(request.path_params["epoch"]).removesuffix(".png")
        epoch = number(text)
        if epoch is None or epoch not in run.checkpoints:
            raise LookupError(f"run {run.name} kept no checkpoint of epoch {text[:12]!r}")
        m = self.engine.compute(run, i, "gradcam", epoch, "true")
        return Response(png(colorize(m)), media_type="image/png", headers=PNG_HEADERS)


# The pages load only their own script and style; images are served by this server.
CSP = "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'"


def _integer(value: Any, default: int, name: str) -> int:
    if value in (None, ""):
        return default
    text = str(value)
    result = number(text)
    if result is None or result > 10**9:
        raise BadRequest(f"{name} must be a whole number, got {text[:40]!r}")
    return result


def _fraction(value: Any, default: float, name: str) -> float:
    if value in (None, ""):
        return default
    try:
        number = float(value)
    except ValueError:
        raise BadRequest(f"{name} must be a number from 0 to 1, got {str(value)[:40]!r}") from None
    if not 0.0 <= number <= 1.0:
        raise BadRequest(f"{name} must be a number from 0 to 1, got {str(value)[:40]!r}")
    return number


def _class(run: ServedRun, value: Any, name: str) -> int | None:
    if value in (None, ""):
        return None
    k = number(value)
    if k is not None and k < len(run.classes):
        return k
    raise BadRequest(f"{name} must be a class number in 0..{len(run.classes) - 1}")


def _errors(request: Request, exc: Exception) -> Response:
    """One sentence for the failed view; the status says whose fault it was."""
    if isinstance(exc, BadRequest):
        status = 400
    elif isinstance(exc, LookupError) and not isinstance(exc, MapError):
        status = 404
    else:
        status = 500
    message = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    if isinstance(exc, OSError) and not isinstance(exc, ExplainkitError):
        message = f"a file of the run cannot be read: {exc.strerror or exc}"
    if request.url.path.startswith("/api/"):
        return JSONResponse({"error": message}, status_code=status)
    return PlainTextResponse(message, status_code=status)


def create_app(runs: list[ServedRun], engine: Engine) -> Starlette:
    """The ASGI app over ``runs`` (opened with :func:`explainkit.serve.runs.open_run`)."""
    x = Explorer(runs, engine)
    routes = [
        Route("/", x.index),
        Route("/runs/{run}/", x.grid_page),
        Route("/runs/{run}/images/{image}", x.detail_page),
        Route("/runs/{run}/report.html", x.report),
        Route("/runs/{run}/explore/{analysis}", x.explore),
        Route("/api/runs", x.api_runs),
        Route("/api/runs/{run}/images", x.api_images),
        Route("/api/runs/{run}/images/{image}", x.api_image),
        Route("/api/runs/{run}/selection.csv", x.selection_csv),
        Route("/api/runs/{run}/confusion", x.confusion),
        Route("/api/runs/{run}/compare/{other}", x.compare),
        Route("/img/{run}/{image}", x.image),
        Route("/map/{run}/{image}/epoch/{epoch}", x.epoch_map),
        Route("/map/{run}/{image}/item/{item}/{key}", x.item_map),
        Route("/map/{run}/{image}/{key}", x.map),
        Route("/mask/{run}/{image}/{which}", x.mask),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    handlers = {
        BadRequest: _errors,
        LookupError: _errors,
        ExplainkitError: _errors,
        OSError: _errors,
        ValueError: _errors,
        RuntimeError: _errors,
    }
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.state.runs = runs
    app.state.thumbs = x.thumbs
    return app
