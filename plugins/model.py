"""Built-in analyzer ``model``: the layer-by-layer model summary the seed notebook printed."""

from __future__ import annotations

from typing import Any

from explainkit import hookimpl
from explainkit.analyzer import AnalysisContext, Analyzer

__all__ = ["ModelAnalyzer"]

CSV_HEADER = ("layer", "type", "output_shape", "params", "trainable")


class ModelAnalyzer(Analyzer):
    """One row per layer call (name, type, output shape, parameters), then the totals.

    Runs the model of the analyzed epoch once on a single zero image of the run's input shape
    (``explainkit.models.summary.summarize_model``) and writes the table as CSV, JSON and text,
    like ``torchsummary``: total, trainable and non-trainable parameters and the memory
    estimate (input, forward/backward pass, parameters).

    Example:
        explainkit analyze runs/cifar --plugin model
    """

    name = "model"
    title = "Model summary"
    summary = "Layers with output shapes and parameters, parameter totals, memory estimate."
    order = 10
    needs = frozenset({"store", "checkpoint"})

    def run(self, context: AnalysisContext) -> list[dict]:
        from explainkit.models.summary import summarize_model

        model = context.model()
        summary = summarize_model(
            model, _input_shape(context), trainable=_trained_parameters(model)
        )
        label = _model_label(context, model)
        _write_files(context, summary, label)
        return _artifacts(context, summary, label)


# -- step 1: what to summarize ---------------------------------------------------------------


def _input_shape(context: AnalysisContext) -> tuple[int, ...]:
    """(C, H, W) of the images the model was evaluated on, as the store records it."""
    return tuple(int(v) for v in context.store.attrs["input_shape"])


def _model_label(context: AnalysisContext, model: Any) -> str:
    """The architecture the run recorded, e.g. ``resnet18-s8 (ResNet)``, else the class name."""
    spec = context.store.attrs.get("model")
    arch = spec.get("arch") if isinstance(spec, dict) else None
    kind = type(model).__name__
    return f"{arch} ({kind})" if arch else kind


def _trained_parameters(model: Any) -> list[str]:
    """Every parameter: training optimizes all of them (``explainkit.train.optim``).

    The host freezes the model it loads for analysis (``requires_grad=False``), so the flags
    no longer say what was trained.
    """
    return [name for name, _ in model.named_parameters()]


# -- step 2: the files -----------------------------------------------------------------------


def _write_files(context: AnalysisContext, summary: Any, label: str) -> None:
    from explainkit import tables
    from explainkit.models.summary import format_table

    out = context.output_dir
    rows = [
        [r["layer"], r["type"], _shape_cell(r["output_shape"]), r["params"], r["trainable"]]
        for r in summary.rows
    ]
    tables.write_csv(out / "model_summary.csv", CSV_HEADER, rows)
    tables.write_json(
        out / "model_summary.json",
        {
            "model": label,
            "epoch": context.epoch,
            "input_shape": list(summary.input_shape),
            "totals": summary.totals,
            "rows": summary.rows,
        },
    )
    (out / "model_summary.txt").write_text(format_table(summary))
    t = summary.totals
    totals = [
        ["total parameters", t["total_params"]],
        ["trainable parameters", t["trainable_params"]],
        ["non-trainable parameters", t["non_trainable_params"]],
        ["input size (MB)", round(t["input_size_mb"], 2)],
        ["forward/backward pass size (MB)", round(t["forward_backward_pass_size_mb"], 2)],
        ["parameters size (MB)", round(t["params_size_mb"], 2)],
        ["estimated total size (MB)", round(t["estimated_total_size_mb"], 2)],
    ]
    tables.write_csv(out / "model_totals.csv", ["quantity", "value"], totals)


def _shape_cell(shape: list[int]) -> str:
    return "x".join(str(v) for v in shape)


# -- step 3: the manifest ----------------------------------------------------------------------


def _artifacts(context: AnalysisContext, summary: Any, label: str) -> list[dict]:
    t = summary.totals
    shape = "x".join(str(v) for v in summary.input_shape)
    caption = (
        f"{label}: {t['total_params']:,} parameters ({t['trainable_params']:,} trainable, "
        f"{t['non_trainable_params']:,} non-trainable), {len(summary.rows)} layer calls on one "
        f"{shape} input; estimated total size {t['estimated_total_size_mb']:.2f} MB."
    )
    totals = (
        f"Totals: {t['total_params']:,} parameters; input {t['input_size_mb']:.2f} MB, "
        f"forward/backward pass {t['forward_backward_pass_size_mb']:.2f} MB, parameters "
        f"{t['params_size_mb']:.2f} MB, estimated total {t['estimated_total_size_mb']:.2f} MB "
        "(MB = 2^20 bytes, float32). The text table is model_summary.txt."
    )
    return [
        context.artifact("model_totals.csv", "Model totals", "table", totals),
        context.artifact("model_summary.csv", "Model summary", "table", caption),
        context.artifact("model_summary.json", "Model summary (all data)", "json", totals),
    ]


@hookimpl
def register_analyzers(register):
    register(ModelAnalyzer)
