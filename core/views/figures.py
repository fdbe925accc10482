"""The dashboard's plotly figures, built from the data core.views.dashboard reads (no SQL here)."""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from core.views.dashboard import CalibrationData, ConfusionData, Dashboard


def shown_names(names: Sequence[object]) -> list[str]:
    """Category names as plotly text: plotly renders a subset of HTML in axis labels, hover, legends and titles,
    so a category called `<b>x</b>` would show bold (or `<a href=...>` as a link) unless escaped."""
    return [html.escape(str(name)) for name in names]


def confusion_figure(data: ConfusionData, *, normalised: bool = True, clickable: bool = True) -> go.Figure:
    """Heatmap, true category down, predicted across; hover shows count and row share.

    clickable: a click on a cell selects a point whose x and y are the cell's predicted and true category names
    (what `cell_review_filters` takes). Streamlit's `st.plotly_chart(on_select=...)` reports nothing for heatmap
    traces (streamlit/streamlit#8760, #15042), so an invisible square marker sits on every cell and takes over
    the heatmap's hover text; clicking the cell selects its marker.
    """
    shares = data.normalised
    text = [[f"{int(c)}" for c in row] for row in data.counts]
    customdata = np.dstack([data.counts, shares])
    hovertemplate = (
        "true %{y}<br>predicted %{x}<br>%{customdata[0]} images (%{customdata[1]:.0%} of row)<extra></extra>"
    )
    # Axis values are the full names (each cell's identity and its hover text); ticks show them cut to TICK_CHARS, so a
    # long name cannot squeeze the heatmap, and the left margin is fixed. Quotes are not escaped: plotly shows
    # `&quot;` literally, and its labels have no attributes for a quote to break out of.
    names = [html.escape(str(name), quote=False) for name in data.class_names]
    ticks = [html.escape(_cut(str(name)), quote=False) for name in data.class_names]
    fig = go.Figure(
        go.Heatmap(
            z=shares if normalised else data.counts,
            x=names,
            y=names,
            text=text,
            texttemplate="%{text}",
            customdata=customdata,
            hovertemplate=None if clickable else hovertemplate,
            hoverinfo="skip" if clickable else None,
            colorscale="Blues",
            zmin=0,
            zmax=1 if normalised else None,
        )
    )
    if clickable:
        # Row-major like the heatmap: marker k is cell (true k // n, predicted k % n) (see `cell_filters_for_point`).
        predicted, true = np.meshgrid(np.asarray(names, dtype=object), np.asarray(names, dtype=object))
        fig.add_trace(
            go.Scatter(
                x=predicted.ravel(),
                y=true.ravel(),
                mode="markers",
                marker={"symbol": "square", "size": 36, "opacity": 0},
                customdata=customdata.reshape(-1, 2),
                hovertemplate=hovertemplate,
                showlegend=False,
            )
        )
    fig.update_layout(
        title=f"Confusion matrix, v{data.version_id} on {data.split} ({data.n_images} images)",
        xaxis_title="predicted",
        yaxis_title="true label",
        # Names like "42" stay categories instead of becoming a numeric axis.
        xaxis_type="category",
        yaxis_type="category",
        yaxis_autorange="reversed",
        xaxis={"tickmode": "array", "tickvals": names, "ticktext": ticks, "tickangle": -45, "automargin": False},
        yaxis={"tickmode": "array", "tickvals": names, "ticktext": ticks, "automargin": False},
        margin={"l": TICK_MARGIN_PX, "r": 10, "t": 40, "b": TICK_MARGIN_PX},
    )
    return fig


TICK_CHARS = 22  # characters of a category name shown on the confusion matrix's axes (the hover shows it all)

TICK_MARGIN_PX = 170  # room for TICK_CHARS characters of 12 px text, whatever the names


def _cut(name: str) -> str:
    return name if len(name) <= TICK_CHARS else name[: TICK_CHARS - 1].rstrip() + "…"


def history_figure(history: pd.DataFrame) -> go.Figure:
    """Accuracy and macro F1 per version, one category per version on the x axis (v1, v2...; hover shows the date).

    Versions rather than a time axis: with one version (or several on one day) a time axis shows millisecond ticks.
    """
    labels = [f"v{v}" for v in history["version"]]
    dates = [pd.Timestamp(c).strftime("%Y-%m-%d %H:%M") if pd.notna(c) else "" for c in history["created_at"]]
    fig = go.Figure()
    for column, name in (("accuracy", "accuracy"), ("macro_f1", "macro F1")):
        fig.add_trace(
            go.Scatter(
                x=labels,
                y=history[column],
                mode="lines+markers",
                name=name,
                customdata=dates,
                hovertemplate=f"%{{x}} (%{{customdata}} UTC)<br>{name} %{{y:.1%}}<extra></extra>",
            )
        )
    fig.update_layout(
        title="Test accuracy and macro F1 per model version",
        xaxis_type="category",
        xaxis_title="model version",
        yaxis_range=[0, 1.05],
        yaxis_tickformat=".0%",
        yaxis_title="",
    )
    return fig


def balance_figure(balance: pd.DataFrame) -> go.Figure:
    """Stacked bars: images per category, one colour per split."""
    fig = go.Figure(
        [
            go.Bar(name=split, x=shown_names(part["category"]), y=part["images"])
            for split, part in balance.groupby("split", sort=False)
        ]
    )
    fig.update_layout(
        barmode="stack", title="Images per category and split", yaxis_title="images", xaxis_type="category"
    )
    return fig


def confidence_histogram_figure(data: CalibrationData) -> go.Figure:
    """How confident the model is on labelled test images, right and wrong predictions stacked."""
    fig = go.Figure(
        [
            go.Histogram(x=data.confidence[data.correct], name="right", xbins={"start": 0, "end": 1, "size": 0.05}),
            go.Histogram(x=data.confidence[~data.correct], name="wrong", xbins={"start": 0, "end": 1, "size": 0.05}),
        ]
    )
    fig.update_layout(barmode="stack", title="Confidence on labelled test images", xaxis_title="confidence")
    return fig


def reliability_figure(data: CalibrationData) -> go.Figure:
    """Accuracy per confidence bin against the diagonal of perfect calibration, with the ECE in the title."""
    used = data.bins[data.bins["count"] > 0]
    fig = go.Figure(
        [
            go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfectly calibrated", line={"dash": "dash"}),
            go.Scatter(
                x=used["mean_confidence"],
                y=used["accuracy"],
                mode="lines+markers",
                name="model",
                customdata=used["count"],
                hovertemplate="confidence %{x:.2f}<br>accuracy %{y:.2f}<br>%{customdata} images<extra></extra>",
            ),
        ]
    )
    ece = f"{data.ece:.3f}" if data.ece is not None else "n/a"
    fig.update_layout(
        title=f"Reliability (ECE {ece})", xaxis_title="confidence", yaxis_title="accuracy", xaxis_range=[0, 1]
    )
    return fig


def corrections_figure(frame: pd.DataFrame) -> go.Figure:
    """Bars per day: label changes, and among them the corrections."""
    fig = go.Figure(
        [
            go.Bar(x=frame["date"], y=frame["label_changes"], name="label changes"),
            go.Bar(x=frame["date"], y=frame["corrections"], name="corrections"),
        ]
    )
    fig.update_layout(barmode="overlay", title="Label changes and corrections per day (UTC)")
    return fig


def dashboard_figures(board: Dashboard) -> dict[str, go.Figure]:
    """The plotly figures for what has data: confusion, history, balance, confidence, reliability, corrections."""
    figs: dict[str, go.Figure] = {}
    if board.confusion is not None:
        figs["confusion"] = confusion_figure(board.confusion)
    if not board.history.empty:
        figs["history"] = history_figure(board.history)
    if not board.balance.empty and board.balance["images"].sum() > 0:
        figs["balance"] = balance_figure(board.balance)
    if board.calibration is not None:
        figs["confidence"] = confidence_histogram_figure(board.calibration)
        figs["reliability"] = reliability_figure(board.calibration)
    if not board.corrections.empty:
        figs["corrections"] = corrections_figure(board.corrections)
    return figs
