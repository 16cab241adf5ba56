"""The quality analyzer's figures: curves, sanity check and localization, one color per method.

Kept apart from the ``quality`` analyzer (:mod:`explainkit.plugins.quality`), which stays
about choosing images and running metrics; every function here takes the report's numbers.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "curves_figure",
    "method_colors",
    "localization_figure",
    "per_class_figure",
    "road_figure",
    "sanity_figure",
]


def method_colors(names: list[str]) -> dict[str, Any]:
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


def curves_figure(summary: dict[str, Any], n: int, baseline: str, epoch: int) -> Any:
    from explainkit import figures

    fig = figures.new_figure(12, 4.4)
    axes = fig.subplots(1, 2)
    colors = method_colors(list(summary))
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


def road_figure(summary: dict[str, Any], n: int, epoch: int) -> Any:
    """ROAD curves: target probability as pixels are imputed, MoRF and LeRF side by side."""
    from explainkit import figures

    fig = figures.new_figure(12, 4.4)
    axes = fig.subplots(1, 2)
    colors = method_colors(list(summary))
    titles = {"morf": "Most relevant first (lower is better)",
              "lerf": "Least relevant first (higher is better)"}  # fmt: skip
    for ax, kind in zip(axes, ("morf", "lerf"), strict=True):
        for name, s in summary.items():
            x = s["fractions"]
            style = "--" if name == "random" else "-"
            ax.plot(x, s[kind]["mean"], style, marker="o", ms=3, color=colors[name], label=name)
            ax.fill_between(x, s[kind]["ci_low"], s[kind]["ci_high"], color=colors[name],
                            alpha=0.15, lw=0)  # fmt: skip
        ax.set_xlabel("fraction of pixels imputed")
        ax.set_ylabel("probability of the target class")
        ax.set_title(titles[kind])
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 6), fontsize=8)
    fig.suptitle(f"ROAD (noisy linear imputation), epoch {epoch}: {n} images")
    return fig


def sanity_figure(verdicts: dict[str, Any], n: int) -> Any:
    from explainkit import figures

    names = list(verdicts["methods"])
    colors = method_colors(names)
    fig = figures.new_figure(12, 4.4)
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


def localization_figure(rows: list[dict], names: list[str], mask_fraction: float, n: int) -> Any:
    import numpy as np

    from explainkit import figures

    colors = method_colors(names)
    fig = figures.new_figure(12, 4.4)
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
            # Above the error bar's cap, never under it; the axis leaves room up to 1.15.
            top = v + err[1][i]
            ax.text(i, top + 0.015, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
        chance = ax.axhline(mask_fraction, color="k", ls="--", lw=1)
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=9)
        ax.set_ylim(0, 1.15)
        ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    # One legend outside the axes, below them: it can cover no bar, error bar or label.
    fig.legend([chance], ["chance (mean mask area)"], loc="outside lower center", fontsize=8)
    fig.suptitle(f"Localization with ground-truth masks ({n} images, 95% bootstrap CI)")
    return fig


def per_class_figure(class_rows: list[dict], names: list[str], classes: list[str]) -> Any:
    import numpy as np

    from explainkit import figures

    colors = method_colors(names)
    width = max(10.0, 0.35 * len(classes) * len(names) + 2)
    fig = figures.new_figure(min(width, 30), 7.5)
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
        ax.set_xticks(np.arange(len(classes)), [figures.short(c) for c in classes],
                      fontsize=figures.class_font_size(len(classes)), rotation=30)  # fmt: skip
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{title} per true class (95% bootstrap CI)")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8, ncol=len(names))
    return fig
