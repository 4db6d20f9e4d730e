"""A Layer Card as a picture: four panels written as PNG and SVG.

matplotlib is the client's optional ``render`` extra, imported only when a figure is asked for, so the client
stays light for services that only call the API. Output is byte-for-byte reproducible (fixed SVG hash salt, no
date in the metadata), so figures can be committed and diffed next to the card's JSON.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from layercard.v1 import layer_card_pb2
from layercard_client.cardview import coupling_rows, dataset_line, module_types
from layercard_client.errors import ClientConfigError

__all__ = ["FIGURE_SUFFIXES", "require_matplotlib", "step_seconds_from", "write_figure"]

FIGURE_SUFFIXES = (".png", ".svg")
_INSTALL_HINT = "writing a figure needs matplotlib: pip install 'layercard-client[render]'"
_RC = {
    "svg.hashsalt": "layercard",  # element ids from a fixed salt instead of a random one
    "svg.fonttype": "path",  # glyphs as paths: the SVG looks the same without the fonts installed
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
}


def require_matplotlib() -> Any:
    """matplotlib, or ``ClientConfigError`` with the install command; call it before long work to fail early."""
    try:
        return importlib.import_module("matplotlib")
    except ImportError as exc:
        raise ClientConfigError(_INSTALL_HINT) from exc


def step_seconds_from(card: layer_card_pb2.LayerCard) -> list[float]:
    """Predicted training step time when adapting layers k..L-1, for each k.

    Every step runs the forward pass through all blocks, but backward stops at the lowest adapted block
    (METHOD.md, "Cost"): time(≥k) = fixed + Σ_all forward + Σ_{ℓ≥k} backward. ``fixed_seconds`` is the
    embedding, head and loss, as the service's cost model computes it.
    """
    layers = list(card.layers)
    forward = sum(layer.forward_seconds for layer in layers)
    base = card.training_cost.fixed_seconds + forward
    return [base + sum(layer.backward_seconds for layer in layers[k:]) for k in range(len(layers))]


def write_figure(card: layer_card_pb2.LayerCard, path_without_suffix: str | Path) -> list[Path]:
    """Writes ``<path>.png`` and ``<path>.svg`` and returns their paths.

    The suffix is appended, not substituted, so a stem such as ``cards/tiny.v2`` keeps its dot.
    """
    matplotlib = require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    stem = str(path_without_suffix)
    paths = [Path(stem + suffix) for suffix in FIGURE_SUFFIXES]
    with matplotlib.rc_context(_RC):
        # A bare Figure with the Agg canvas: no pyplot, so no global figure registry and no GUI backend.
        figure = Figure(figsize=(12, 8.5))
        FigureCanvasAgg(figure)
        # Fixed margins rather than constrained layout: that one measures every label and was half of the time.
        # The top leaves room for the three title lines (card, model, dataset).
        grid = {"left": 0.06, "right": 0.95, "bottom": 0.07, "top": 0.87, "wspace": 0.28, "hspace": 0.3}
        (share, energy), (cost, coupling) = figure.subplots(2, 2, gridspec_kw=grid)
        _share_panel(share, card)
        _energy_panel(energy, card)
        _cost_panel(cost, card)
        _coupling_panel(figure, coupling, card)
        title = f"{card.model} · {card.architecture} · {card.num_layers} layers"
        figure.suptitle(f"Layer Card {card.name}\n{title}\ndataset {dataset_line(card)}", fontsize=11)
        figure.savefig(paths[0], dpi=110, metadata={"Software": None})
        figure.savefig(paths[1], metadata={"Date": None, "Creator": None})
    return paths


def _indices(card: layer_card_pb2.LayerCard) -> list[int]:
    return [layer.index for layer in card.layers]


def _share_panel(ax: Any, card: layer_card_pb2.LayerCard) -> None:
    x = _indices(card)
    ax.bar(x, [layer.resnorm_share for layer in card.layers], width=0.8, color="#4c72b0", label="Res² share")
    plain_total = sum(layer.resnorm_sq for layer in card.layers)
    if plain_total > 0 and any(layer.resnorm_sq_split_half for layer in card.layers):
        # The split-half estimate is unbiased for the signal. Over the same total as the bars, so that where it
        # falls short of its bar, that part of the bar is probe noise.
        split = [layer.resnorm_sq_split_half / plain_total for layer in card.layers]
        ax.bar(x, split, width=0.35, color="#dd8452", label="split-half Res² (same scale)")
    gains = [(layer.index, layer.measured_gain) for layer in card.layers if layer.HasField("measured_gain")]
    gain_total = sum(g for _, g in gains if g > 0)
    if gain_total > 0:
        ax.plot(
            [i for i, _ in gains], [g / gain_total for _, g in gains], "k^", markersize=5, label="measured gain share"
        )
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set(title="Where the gradient signal is", xlabel="layer", ylabel="share of the model's Res²")
    ax.yaxis.set_major_formatter(_percent())
    _layer_ticks(ax, x)
    ax.legend(loc="upper left", frameon=False, fontsize=8)


def _energy_panel(ax: Any, card: layer_card_pb2.LayerCard) -> None:
    x = _indices(card)
    types = module_types(card)
    plotted = False
    for name in types:
        points = [
            (layer.index, m.activation_energy)
            for layer in card.layers
            for m in layer.modules
            if m.module_type == name and m.activation_energy > 0
        ]
        if points:
            ax.plot([i for i, _ in points], [e for _, e in points], marker="o", markersize=3, label=name)
            plotted = True
    if not plotted:  # no per-module figures: the layer sums are all there is
        points = [(layer.index, layer.activation_energy) for layer in card.layers if layer.activation_energy > 0]
        if points:
            ax.plot([i for i, _ in points], [e for _, e in points], marker="o", markersize=3, label="layer sum")
            plotted = True
    if plotted:
        ax.set_yscale("log")
        ax.legend(loc="best", frameon=False, fontsize=8)
    ax.set(title="Activation energy E_act (compare within a type)", xlabel="layer", ylabel="E‖x‖²")
    _layer_ticks(ax, x)


def _cost_panel(ax: Any, card: layer_card_pb2.LayerCard) -> None:
    x = _indices(card)
    forward = [layer.forward_seconds * 1e3 for layer in card.layers]
    backward = [layer.backward_seconds * 1e3 for layer in card.layers]
    ax.bar(x, forward, width=0.8, color="#8fbcd4", label="block forward ms")
    ax.bar(x, backward, width=0.8, bottom=forward, color="#2a6f97", label="block backward ms")
    ax.set(title="Training step cost", xlabel="layer k (adapt layers ≥ k)", ylabel="per-block ms")
    _layer_ticks(ax, x)
    handles, labels = ax.get_legend_handles_labels()
    if card.HasField("training_cost") and x:
        tc = card.training_cost
        steps = ax.twinx()
        steps.spines["right"].set_visible(True)
        steps.plot(
            x,
            [s * 1e3 for s in step_seconds_from(card)],
            "-o",
            color="#c44e52",
            markersize=3,
            label="predicted step ms, layers ≥ k",
        )
        measured = [(x[0], tc.measured_full_step_seconds)]
        if tc.validation_layers:
            measured.append((min(tc.validation_layers), tc.measured_partial_step_seconds))
        measured = [(k, s) for k, s in measured if s > 0]
        if measured:
            steps.plot(
                [k for k, _ in measured], [s * 1e3 for _, s in measured], "kx", markersize=7, label="measured step ms"
            )
        steps.set_ylim(0, max(step_seconds_from(card) + [s for _, s in measured]) * 1e3 * 1.45)
        steps.set_ylabel("step ms")
        more_handles, more_labels = steps.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    top = max((f + b for f, b in zip(forward, backward)), default=0.0)
    if top > 0:
        ax.set_ylim(0, top * 1.45)  # headroom for the legend above the bars
    ax.legend(handles, labels, loc="upper center", ncols=2, frameon=False, fontsize=8)


def _coupling_panel(figure: Any, ax: Any, card: layer_card_pb2.LayerCard) -> None:
    rows = coupling_rows(card)
    ax.set_title("Coupling ρ between layers")
    if not rows:
        ax.set_axis_off()
        ax.text(
            0.5,
            0.5,
            "coupling not computed\n(card compute --coupling)",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="0.4",
        )
        return
    image = ax.imshow(rows, cmap="RdBu_r", vmin=-1.0, vmax=1.0, interpolation="nearest")
    figure.colorbar(image, ax=ax, shrink=0.85, label="cosine of the layers' best corrections")
    ax.set(xlabel="layer", ylabel="layer")
    _layer_ticks(ax, list(range(len(rows))))
    if len(rows) <= 16:
        ax.set_yticks(range(len(rows)))


def _layer_ticks(ax: Any, x: list[int]) -> None:
    """Every layer labelled on small models; integer ticks only on deep ones (no "layer 2.5")."""
    from matplotlib.ticker import MaxNLocator

    if x and len(x) <= 16:
        ax.set_xticks(x)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _percent() -> Any:
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(xmax=1.0, decimals=0)
