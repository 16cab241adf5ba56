"""Built-in analyzer ``quality``: can these saliency maps be trusted?

Faithfulness (deletion/insertion against a random order), the model-parameter randomization
sanity check and, when the store has object masks, localization (pointing game, energy in the
mask). Every number comes with the image count and a bootstrap confidence interval. The
metrics live in :mod:`explainkit.explain.metrics`; this module chooses images, runs them and
writes tables and figures. See docs/explanation-quality.md for how to read them.
"""

from __future__ import annotations

from typing import Any

import click

from explainkit import hookimpl
from explainkit.analyzer import AnalysisContext, Analyzer, Option
from explainkit.errors import AnalyzerError

__all__ = ["QualityAnalyzer", "parse_methods", "select_images", "resolve_targets", "table_row"]

TARGETS = ("predicted", "true")
HEADER = ("method", "metric", "mean", "ci_low", "ci_high", "n")
CLASS_HEADER = ("method", "metric", "class", "mean", "ci_low", "ci_high", "n")


def _default_methods() -> str:
    import importlib.util

    names = ["gradcam", "gradcampp", "random"]
    if importlib.util.find_spec("captum") is not None:
        names.append("saliency")
    return ",".join(names)


class QualityAnalyzer(Analyzer):
    """Faithfulness, sanity and localization of attribution methods, with confidence intervals.

    Example:
        explainkit analyze runs/shapes --plugin quality --quality-methods gradcam,saliency,random
    """

    name = "quality"
    title = "Explanation quality"
    summary = (
        "Are the maps true? Deletion/insertion AUC, randomization sanity check and "
        "localization (masks), with bootstrap CIs."
    )
    order = 70
    needs = frozenset({"store", "checkpoint"})
    options = (
        Option(
            "methods",
            str,
            _default_methods(),
            "Comma-separated attribution methods (gradcam, gradcampp, xgradcam, layercam; with "
            "Captum: saliency, integrated_gradients, guided_gradcam; random). random is always "
            "added as the baseline.",
        ),
        Option("count", click.IntRange(1), 256, "Eval images to evaluate (seeded sample)."),
        Option("steps", click.IntRange(1, 256), 16, "Deletion/insertion steps."),
        Option(
            "baseline",
            str,
            "blur",
            "What removed pixels become: the blurred image or the dataset mean.",
            choices=("blur", "mean"),
        ),
        Option("sanity", bool, True, "Run the model-parameter randomization sanity check."),
        Option("layer", str, None, "Target layer of the CAM methods (default: the run's)."),
        Option(
            "target",
            str,
            "predicted",
            "Class each map explains: the model's prediction or the true label.",
            choices=TARGETS,
        ),
    )

    def run(
        self,
        context: AnalysisContext,
        *,
        methods: str | None,
        count: int,
        steps: int,
        baseline: str,
        sanity: bool,
        layer: str | None,
        target: str,
    ) -> list[dict]:
        import torch

        from explainkit.explain import metrics as M
        from explainkit.explain.gradcam import resolve_layer

        store = context.store
        layer = layer or store.attrs.get("default_layer") or "layer4"
        model = context.model()
        resolve_layer(model, layer)  # a clear error before any work
        registry = M.attribution_methods(layer, seed=context.seed)
        names = parse_methods(methods or _default_methods(), registry)
        indices = select_images(store.num_images, count, context.rng)
        images = context.normalize(store.images(indices))
        labels = store.targets[indices]
        bs = context.batch_size
        targets = resolve_targets(model, images, labels, target, bs)
        masks = None
        if store.has_masks:
            masks = torch.from_numpy(store.masks[indices]).to(context.device)

        gen = torch.Generator().manual_seed(context.seed)
        maps: dict[str, torch.Tensor] = {}
        curves: dict[str, Any] = {}
        per_image: dict[tuple[str, str], torch.Tensor] = {}
        for name in context.progress(names, desc="deletion/insertion"):
            maps[name] = M.attribute(registry[name], model, images, targets, bs)
            c = M.perturbation_curves(
                model, images, maps[name], targets, steps=steps, baseline=baseline,
                max_batch=8 * bs, generator=gen,
            )  # fmt: skip
            curves[name] = c
            per_image[(name, "deletion_auc")] = c.deletion_auc
            per_image[(name, "insertion_auc")] = c.insertion_auc
        for name in names:
            if name == "random":
                continue
            rnd = curves["random"]
            per_image[(name, "deletion_gain_vs_random")] = (
                rnd.deletion_auc - curves[name].deletion_auc
            )
            per_image[(name, "insertion_gain_vs_random")] = (
                curves[name].insertion_auc - rnd.insertion_auc
            )
        if masks is not None:
            for name in names:
                per_image[(name, "pointing_game")] = M.pointing_game(maps[name], masks).double()
                per_image[(name, "energy_in_mask")] = M.energy_in_mask(maps[name], masks)
        sanity_results: dict[str, Any] = {}
        if sanity:
            chosen = {name: registry[name] for name in names}
            sanity_results = M.randomization_check(
                model, images, targets, chosen, batch_size=bs, seed=context.seed, original=maps
            )
            for name, res in sanity_results.items():
                for i, step in enumerate(res.layers):
                    per_image[(name, f"sanity_spearman:{step}")] = res.spearman[i]
                    per_image[(name, f"sanity_ssim:{step}")] = res.ssim[i]

        # One transfer to the CPU for everything that gets bootstrapped.
        host = {k: v.detach().double().cpu().numpy() for k, v in per_image.items()}
        seed = context.seed
        rows = [table_row(name, metric, host[(name, metric)], seed) for name, metric in host]
        class_rows = []
        if masks is not None:
            classes = context.classes
            for name in names:
                for metric in ("pointing_game", "energy_in_mask"):
                    values = host[(name, metric)]
                    for k, cls in enumerate(classes):
                        sel = values[labels == k]
                        if sel.size:
                            class_rows.append({"class": cls, **table_row(name, metric, sel, seed)})
        curve_summary = {
            name: _curve_summary(c, seed) for name, c in curves.items()
        }  # small: steps + 1 points per method
        verdicts = _sanity_summary(sanity_results) if sanity else None
        mask_fraction = float(masks.double().mean()) if masks is not None else None

        out = context.output_dir
        from explainkit.plugins import _plot

        _plot.write_csv(out / "quality.csv", HEADER, [[r[h] for h in HEADER] for r in rows])
        artifacts = [
            context.artifact(
                "quality.csv",
                "Explanation quality table",
                "table",
                f"Mean and 95% bootstrap CI (1000 resamples) over {len(indices)} eval images, "
                "per method and metric.",
            )  # fmt: skip
        ]
        report = {
            "epoch": context.epoch,
            "layer": layer,
            "target": target,
            "count": int(len(indices)),
            "steps": steps,
            "baseline": baseline,
            "methods": names,
            "confidence": 0.95,
            "bootstrap_resamples": 1000,
            "table": rows,
            "per_class": class_rows,
            "curves": curve_summary,
            "localization": (
                {"mask_fraction": mask_fraction, "chance_note": _CHANCE_NOTE}
                if masks is not None
                else None
            ),
            "localization_skipped": None if masks is not None else "the store has no masks",
            "sanity": verdicts,
        }
        _plot.write_json(out / "quality.json", report)
        artifacts.append(
            context.artifact(
                "quality.json",
                "Explanation quality (all results)",
                "json",
                "Table, per-class localization, mean curves and the sanity-check verdicts.",
            )  # fmt: skip
        )
        if class_rows:
            _plot.write_csv(
                out / "localization_per_class.csv",
                CLASS_HEADER,
                [[r[h] for h in CLASS_HEADER] for r in class_rows],
            )
            artifacts.append(
                context.artifact(
                    "localization_per_class.csv",
                    "Localization per class",
                    "table",
                    "Pointing game and energy in mask per true class, with 95% bootstrap CIs.",
                )  # fmt: skip
            )

        n = len(indices)
        fig = _curves_figure(curve_summary, n, baseline, context.epoch)
        _plot.save_figure(fig, out / "deletion_insertion.png")
        artifacts.append(
            context.artifact(
                "deletion_insertion.png",
                "Deletion and insertion curves",
                "image",
                f"Mean target-class probability as the most-attributed pixels are removed "
                f"(deletion, lower AUC is better) or added (insertion, higher is better); "
                f"{baseline} baseline, {steps} steps, {n} images, bands: 95% bootstrap CI.",
            )  # fmt: skip
        )
        if verdicts is not None:
            _plot.save_figure(_sanity_figure(verdicts, n), out / "sanity.png")
            failed = ", ".join(verdicts["failed"]) or "none"
            artifacts.append(
                context.artifact(
                    "sanity.png",
                    "Model-parameter randomization sanity check",
                    "image",
                    f"Similarity of each method's maps to the trained model's as layers are "
                    f"re-initialized from the top; {n} images, error bars: 95% bootstrap CI. "
                    f"Fails (rank correlation > {M.SANITY_THRESHOLD} with layers down to "
                    f"{M.SANITY_DEPTH} randomized): {failed}.",
                )  # fmt: skip
            )
        if masks is not None:
            fig = _localization_figure(rows, names, mask_fraction, n)
            _plot.save_figure(fig, out / "localization.png")
            artifacts.append(
                context.artifact(
                    "localization.png",
                    "Localization (pointing game, energy in mask)",
                    "image",
                    f"{n} images; error bars: 95% bootstrap CI; dashed: a map that knows "
                    "nothing (mean mask area).",
                )  # fmt: skip
            )
            fig = _per_class_figure(class_rows, names, context.classes)
            _plot.save_figure(fig, out / "localization_per_class.png")
            artifacts.append(
                context.artifact(
                    "localization_per_class.png",
                    "Localization per class",
                    "image",
                    "Pointing-game hit rate and energy in mask per true class, 95% CIs.",
                )  # fmt: skip
            )
        return artifacts


_CHANCE_NOTE = (
    "A map that knows nothing about the object hits it in the pointing game, and puts energy "
    "inside it, in proportion to the mask's area: mask_fraction is that chance level."
)


def parse_methods(text: str, registry: dict[str, Any]) -> list[str]:
    """Comma list -> known method names (order kept, no duplicates, ``random`` appended)."""
    from explainkit.explain.metrics import CAPTUM_METHODS

    names = list(dict.fromkeys(n.strip() for n in str(text).split(",") if n.strip()))
    for name in names:
        if name not in registry:
            if name in CAPTUM_METHODS:
                raise AnalyzerError(
                    f"--quality-methods {name} needs Captum, which is not installed; "
                    "pip install captum or leave it out."
                )
            raise AnalyzerError(
                f"--quality-methods: unknown method {name!r}; available: {', '.join(registry)}."
            )
    if "random" not in names:
        names.append("random")
    return names


def select_images(num_images: int, count: int, rng: Any) -> Any:
    """A seeded sample of ``count`` store positions, sorted (all images when fewer)."""
    import numpy as np

    if num_images == 0:
        raise AnalyzerError("the store has no eval images to explain.")
    if count >= num_images:
        return np.arange(num_images)
    return np.sort(rng.choice(num_images, size=count, replace=False))


def resolve_targets(model: Any, images: Any, labels: Any, target: str, batch_size: int) -> Any:
    """(N,) class each map explains: the model's prediction (one no-grad pass) or the label."""
    import torch

    if target == "true":
        return torch.as_tensor(labels, dtype=torch.int64, device=images.device)
    with torch.no_grad():
        return torch.cat(
            [
                model(images[s : s + batch_size]).argmax(1)
                for s in range(0, images.shape[0], batch_size)
            ]
        )


def table_row(method: str, metric: str, values: Any, seed: int = 0) -> dict[str, Any]:
    """One table row: mean, 95% bootstrap CI and n of per-image values."""
    from explainkit.explain.metrics import bootstrap_ci

    mean, low, high, n = bootstrap_ci(values, seed=seed)
    return {"method": method, "metric": metric, "mean": mean, "ci_low": low, "ci_high": high,
            "n": n}  # fmt: skip


def _curve_summary(curves: Any, seed: int) -> dict[str, Any]:
    import numpy as np

    from explainkit.explain.metrics import bootstrap_ci

    out: dict[str, Any] = {"fractions": curves.fractions.cpu().numpy().tolist()}
    for kind in ("deletion", "insertion"):
        data = getattr(curves, kind).detach().double().cpu().numpy()
        stats = np.array([bootstrap_ci(data[:, k], seed=seed)[:3] for k in range(data.shape[1])])
        out[kind] = {"mean": stats[:, 0].tolist(), "ci_low": stats[:, 1].tolist(),
                     "ci_high": stats[:, 2].tolist()}  # fmt: skip
        mean, low, high, n = bootstrap_ci(getattr(curves, f"{kind}_auc"), seed=seed)
        out[f"{kind}_auc"] = {"mean": mean, "ci_low": low, "ci_high": high, "n": n}
    return out


def _sanity_summary(results: dict[str, Any]) -> dict[str, Any]:
    from explainkit.explain import metrics as M

    methods = {}
    for name, res in results.items():
        passed, value, step = M.sanity_verdict(res)
        if passed:
            verdict = (
                f"{name} PASSES: with the layers down to {step} re-initialized its maps keep a "
                f"mean rank correlation of {value:.2f} (<= {M.SANITY_THRESHOLD}) with the trained "
                "model's maps, so they depend on what the model learned."
            )
        else:
            verdict = (
                f"{name} FAILS: with the layers down to {step} re-initialized its maps still have "
                f"a mean rank correlation of {value:.2f} (> {M.SANITY_THRESHOLD}) with the trained "
                "model's maps; they do not depend on the learned weights and should not be "
                "trusted as explanations of this model."
            )
        steps = []
        for i, layer in enumerate(res.layers):
            sp = M.bootstrap_ci(res.spearman[i])
            ss = M.bootstrap_ci(res.ssim[i])
            steps.append({
                "randomized": layer,
                "spearman": {"mean": sp[0], "ci_low": sp[1], "ci_high": sp[2], "n": sp[3]},
                "ssim": {"mean": ss[0], "ci_low": ss[1], "ci_high": ss[2], "n": ss[3]},
            })  # fmt: skip
        methods[name] = {
            "passed": passed,
            "spearman_at_depth": value,
            "depth_step": step,
            "verdict": verdict,
            "steps": steps,
        }
    return {
        "rule": (
            f"A method fails when the mean Spearman rank correlation between its maps on the "
            f"trained model and on the model with the layers down to {M.SANITY_DEPTH} "
            f"re-initialized (cascading from the top) exceeds {M.SANITY_THRESHOLD}."
        ),
        "threshold": M.SANITY_THRESHOLD,
        "depth": M.SANITY_DEPTH,
        "passed": [n for n, m in methods.items() if m["passed"]],
        "failed": [n for n, m in methods.items() if not m["passed"]],
        "methods": methods,
    }


def _colors(names: list[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    out, k = {}, 0
    for name in names:
        if name == "random":
            out[name] = "0.45"
        else:
            out[name] = cmap(k % 10)
            k += 1
    return out


def _curves_figure(summary: dict[str, Any], n: int, baseline: str, epoch: int) -> Any:
    from explainkit.plugins import _plot

    fig = _plot.new_figure(12, 4.4)
    axes = fig.subplots(1, 2)
    colors = _colors(list(summary))
    for ax, kind, better in zip(axes, ("deletion", "insertion"), ("lower", "higher"), strict=True):
        for name, s in summary.items():
            x = s["fractions"]
            a = s[f"{kind}_auc"]
            style = "--" if name == "random" else "-"
            label = f"{name}: AUC {a['mean']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}]"
            ax.plot(x, s[kind]["mean"], style, color=colors[name], label=label, lw=1.8)
            ax.fill_between(x, s[kind]["ci_low"], s[kind]["ci_high"], color=colors[name],
                            alpha=0.15, lw=0)  # fmt: skip
        ax.set_xlabel("fraction of pixels " + ("removed" if kind == "deletion" else "added"))
        ax.set_ylabel("probability of the target class")
        ax.set_title(f"{kind.capitalize()} ({better} AUC is better)")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right" if kind == "deletion" else "lower right")
    fig.suptitle(f"Deletion / insertion, epoch {epoch}: {n} images, {baseline} baseline")
    return fig


def _sanity_figure(verdicts: dict[str, Any], n: int) -> Any:
    from explainkit.plugins import _plot

    names = list(verdicts["methods"])
    colors = _colors(names)
    fig = _plot.new_figure(12, 4.4)
    axes = fig.subplots(1, 2)
    for ax, key, label in zip(axes, ("spearman", "ssim"), ("Spearman rank corr.", "SSIM"),
                              strict=True):  # fmt: skip
        for name in names:
            m = verdicts["methods"][name]
            xs = ["none"] + [s["randomized"] for s in m["steps"]]
            means = [1.0] + [s[key]["mean"] for s in m["steps"]]
            low = [0.0] + [s[key]["mean"] - s[key]["ci_low"] for s in m["steps"]]
            high = [0.0] + [s[key]["ci_high"] - s[key]["mean"] for s in m["steps"]]
            tag = "pass" if m["passed"] else "FAIL"
            ax.errorbar(range(len(xs)), means, yerr=[low, high], marker="o", capsize=3,
                        color=colors[name], label=f"{name} ({tag})",
                        ls="--" if name == "random" else "-")  # fmt: skip
            ax.set_xticks(range(len(xs)), xs, rotation=30, fontsize=8)
        if key == "spearman":
            ax.axhline(verdicts["threshold"], color="red", ls=":", lw=1, label="fail threshold")
        ax.set_xlabel("re-initialized down to (cascading from the top)")
        ax.set_ylabel(f"{label} vs trained maps")
        ax.set_ylim(-0.2 if key == "spearman" else 0, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Model-parameter randomization sanity check ({n} images)")
    return fig


def _localization_figure(rows: list[dict], names: list[str], mask_fraction: float, n: int) -> Any:
    import numpy as np
    from explainkit.plugins import _plot

    colors = _colors(names)
    fig = _plot.new_figure(12, 4.4)
    axes = fig.subplots(1, 2)
    lookup = {(r["method"], r["metric"]): r for r in rows}
    for ax, metric, title in zip(
        axes, ("pointing_game", "energy_in_mask"), ("Pointing game hit rate", "Energy in mask"),
        strict=True,
    ):  # fmt: skip
        vals = [lookup[(m, metric)] for m in names]
        means = np.array([v["mean"] for v in vals])
        err = np.array([[v["mean"] - v["ci_low"] for v in vals],
                        [v["ci_high"] - v["mean"] for v in vals]])  # fmt: skip
        ax.bar(range(len(names)), means, yerr=err, capsize=4,
               color=[colors[m] for m in names])  # fmt: skip
        for i, v in enumerate(means):
            ax.text(i, min(v + 0.03, 0.98), f"{v:.2f}", ha="center", fontsize=8)
        ax.axhline(mask_fraction, color="k", ls="--", lw=1, label="chance (mask area)")
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=9)
        ax.set_ylim(0, 1)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Localization with ground-truth masks ({n} images, 95% bootstrap CI)")
    return fig


def _per_class_figure(class_rows: list[dict], names: list[str], classes: list[str]) -> Any:
    import numpy as np
    from explainkit.plugins import _plot

    colors = _colors(names)
    width = max(10.0, 0.35 * len(classes) * len(names) + 2)
    fig = _plot.new_figure(min(width, 30), 7.5)
    axes = fig.subplots(2, 1)
    lookup = {(r["method"], r["metric"], r["class"]): r for r in class_rows}
    bar = 0.8 / len(names)
    for ax, metric, title in zip(
        axes, ("pointing_game", "energy_in_mask"), ("Pointing game hit rate", "Energy in mask"),
        strict=True,
    ):  # fmt: skip
        for j, name in enumerate(names):
            xs, means, lo, hi = [], [], [], []
            for k, cls in enumerate(classes):
                r = lookup.get((name, metric, cls))
                if r is None:
                    continue
                xs.append(k + (j - (len(names) - 1) / 2) * bar)
                means.append(r["mean"])
                lo.append(r["mean"] - r["ci_low"])
                hi.append(r["ci_high"] - r["mean"])
            ax.bar(xs, means, width=bar, yerr=[lo, hi], capsize=2, color=colors[name],
                   label=name, error_kw={"lw": 0.8})  # fmt: skip
        ax.set_xticks(np.arange(len(classes)), [_plot.short(c) for c in classes],
                      fontsize=_plot.class_font_size(len(classes)), rotation=30)  # fmt: skip
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{title} per true class (95% bootstrap CI)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, ncol=len(names))
    return fig


@hookimpl
def register_analyzers(register):
    register(QualityAnalyzer)
