"""Figures of scgene's results, written atomically in the format the file name asks for (png, pdf, svg, ...)."""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from .fileio import atomic_path


def image_format(path: str | os.PathLike) -> str:
    """The image format of `path`, from its suffix, checked before any work is done."""
    from matplotlib.figure import Figure

    suffix = os.path.splitext(str(path))[1].lstrip(".").lower()
    supported = Figure().canvas.get_supported_filetypes()
    if suffix not in supported:
        raise ValueError(f"{path}: the suffix names no image format; end it with one of {sorted(supported)} "
                         "(e.g. figure.png or figure.pdf).")
    return suffix


def regulation_heatmap(network: pd.DataFrame, path: str | os.PathLike, regulators=None, n_regulators: int = 10,
                       n_targets: int = 5) -> pd.DataFrame:
    """Regulators x targets coloured by signed weight (red: activation, blue: repression), saved to `path`.

    `network`: `scgene.regulation`'s table (one group's rows). `regulators`: the rows to show (default: the
    `n_regulators` with the largest summed |weight|); columns: the union of each one's `n_targets` strongest targets.
    Returns the plotted matrix (regulators x targets, 0 where the network has no edge)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    suffix = image_format(path)
    if regulators is None:
        regulators = network.groupby("source")["abs_weight"].sum().nlargest(n_regulators).index.tolist()
    shown = network[network["source"].isin(regulators)]
    if shown.empty:
        raise ValueError(f"None of the regulators {list(regulators)[:10]} has an edge in the network.")
    strongest = shown.sort_values("abs_weight", ascending=False).groupby("source", sort=False).head(n_targets)
    targets = list(dict.fromkeys(strongest["target"]))
    matrix = (shown[shown["target"].isin(targets)].pivot_table(index="source", columns="target", values="weight")
              .reindex(index=[r for r in regulators if r in set(shown["source"])], columns=targets).fillna(0.0))
    limit = float(np.abs(matrix.to_numpy()).max()) or 1.0
    figure, axes = plt.subplots(figsize=(1.2 + 0.32 * len(targets), 1.0 + 0.32 * len(matrix)))
    image = axes.imshow(matrix.to_numpy(), cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -limit, limit), aspect="auto")
    axes.set_xticks(range(len(targets)), targets, rotation=90, fontsize=8)
    axes.set_yticks(range(len(matrix)), matrix.index, fontsize=8)
    axes.set_xlabel("target")
    axes.set_ylabel("regulator")
    figure.colorbar(image, ax=axes, label="signed weight (> 0 activation, < 0 repression)", shrink=0.8)
    with atomic_path(path) as staged:
        figure.savefig(staged, dpi=120, bbox_inches="tight", format=suffix)
    plt.close(figure)
    return matrix


def perturbation_changes(top_changes: pd.DataFrame, path: str | os.PathLike, perturbations=None,
                         n_genes: int = 10, max_panels: int = 6) -> None:
    """Bars of each perturbation's largest predicted changes (red: up, blue: down), one panel per perturbation, saved
    to `path`. `top_changes`: `PerturbationResult.top_changes()`; `perturbations`: the panels (default: the first
    `max_panels`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suffix = image_format(path)
    names = list(dict.fromkeys(top_changes["perturbation"])) if perturbations is None else list(perturbations)
    missing = sorted(set(names) - set(top_changes["perturbation"]))
    if missing or not names:
        raise ValueError(f"No predicted changes to plot for {missing or 'any perturbation'}: perturbations with "
                         f"changes are {sorted(set(top_changes['perturbation']))[:20]}.")
    names = names[:max_panels]
    figure, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 0.8 + 0.3 * n_genes), squeeze=False)
    for axis, name in zip(axes[0], names):
        rows = top_changes[top_changes["perturbation"] == name].nsmallest(n_genes, "rank").iloc[::-1]
        axis.barh(rows["gene"], rows["change"], color=np.where(rows["change"] > 0, "#b2182b", "#2166ac"))
        axis.axvline(0, color="black", linewidth=0.5)
        axis.set_title(name, fontsize=9)
        axis.set_xlabel("predicted change (log1p)")
        axis.tick_params(axis="y", labelsize=8)
    figure.tight_layout()
    with atomic_path(path) as staged:
        figure.savefig(staged, dpi=120, bbox_inches="tight", format=suffix)
    plt.close(figure)
