"""Does an embedding carry cell identity? `evaluate` scores a checkpoint's cell embeddings on a labelled AnnData next to
baselines computed on the same cells in the same run.

Rows (embeddings):
- `ScGene`: the checkpoint's `pooler_output` (via `scgene.embed`);
- `ScGene untrained`: the same architecture, freshly initialised with the same frozen prior (what pretraining adds);
- `prior only`: each cell's expression-weighted mean of the prior rows of its tokens (what the transformer adds);
- `PCA`: 50 principal components of scaled log1p expression of the highly variable genes (the classical pipeline);
- `expression`: the scaled log1p HVG expression itself, scored with logistic regression only (the supervised reference).

Metrics (columns), all on the raw vectors except the logistic regression (standardised features):
- `knn_f1`, `knn_accuracy`: k-nearest-neighbour (k=15) label prediction, stratified 5-fold;
- `logreg_f1`: logistic regression, same folds;
- `leiden_ari`, `leiden_nmi`: Leiden clusters of the 15-neighbour graph (scanpy, igraph) against the labels;
- `kmeans_ari`, `kmeans_nmi`: KMeans with as many clusters as labels;
- `silhouette`: of the labels (Euclidean);
- `pc1_variance`: the first principal component's share of the variance, `pc1_corr_genes` / `pc1_corr_counts`: its
  |Pearson correlation| with genes detected / log total counts (depth collapse shows as values near 1);
- `label_pc1_corr_genes`: the same inside each label (the main axis of the label's cells against their genes
  detected), averaged over labels of 10+ cells weighted by cells: depth that the labels' spread hides globally;
- with a batch column: `transfer_f1` (each batch's labels predicted by kNN from the other batches, mean macro-F1),
  `batch_ilisi` (neighbourhood batch diversity: inverse Simpson index of batches among 15 neighbours, scaled to 0-1 and
  averaged over cells; 1 is perfect mixing) and `batch_knn_accuracy` (how well kNN predicts the batch: lower is
  better mixing).
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch

from .encoding_scgene import is_log_normalized
from .inference import embed, iter_batches, load_model, load_tokenizer
from .reports import SavedReport, markdown_table, target_lines
from .tokenization_scgene import expression_source

logger = logging.getLogger(__name__)

METRICS = (
    "knn_f1", "knn_accuracy", "logreg_f1", "leiden_ari", "leiden_nmi", "kmeans_ari", "kmeans_nmi", "silhouette",
    "pc1_variance", "pc1_corr_genes", "pc1_corr_counts", "label_pc1_corr_genes", "transfer_f1", "batch_ilisi", "batch_knn_accuracy",
)
BASELINES = ("untrained", "prior", "pca", "expression")
HIGHER_IS_BETTER = {"pc1_variance": False, "pc1_corr_genes": False, "pc1_corr_counts": False,
                    "label_pc1_corr_genes": False, "batch_knn_accuracy": False}
MIN_LABEL_CELLS = 10  # labels with fewer cells have no stable main axis of their own


@dataclass
class EvaluationSettings:
    """How the metrics are computed; one setting for every row of a report."""

    n_neighbors: int = 15
    n_folds: int = 5
    leiden_resolution: float = 1.0
    n_pcs: int = 50
    n_top_genes: int = 2000
    silhouette_cells: int = 5000
    seed: int = 0


# ----------------------------------------------------------------------------------------------------------------------
# Metrics of one embedding
# ----------------------------------------------------------------------------------------------------------------------


def _fold_scores(features, labels, make_classifier, settings: EvaluationSettings) -> tuple[float, float]:
    """Macro-F1 and accuracy of out-of-fold predictions (stratified folds)."""
    from sklearn.metrics import accuracy_score, f1_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    folds = StratifiedKFold(settings.n_folds, shuffle=True, random_state=settings.seed)
    predicted = cross_val_predict(make_classifier(), features, labels, cv=folds)
    return float(f1_score(labels, predicted, average="macro")), float(accuracy_score(labels, predicted))


def _knn(settings: EvaluationSettings):
    from sklearn.neighbors import KNeighborsClassifier

    return lambda: KNeighborsClassifier(n_neighbors=settings.n_neighbors)


def _logistic_regression():
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))


def classification_scores(features, labels, settings: EvaluationSettings, logreg: bool = True) -> dict:
    knn_f1, knn_accuracy = _fold_scores(features, labels, _knn(settings), settings)
    scores = {"knn_f1": knn_f1, "knn_accuracy": knn_accuracy}
    if logreg:
        scores["logreg_f1"] = _fold_scores(features, labels, _logistic_regression, settings)[0]
    return scores


def clustering_scores(features, labels, settings: EvaluationSettings) -> dict:
    """Leiden and KMeans against the labels, and the labels' silhouette."""
    import anndata
    import scanpy as sc
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, silhouette_score

    view = anndata.AnnData(obsm={"X_embedding": features}, obs=pd.DataFrame(index=[str(i) for i in range(len(features))]))
    sc.pp.neighbors(view, n_neighbors=settings.n_neighbors, use_rep="X_embedding", random_state=settings.seed)
    sc.tl.leiden(view, resolution=settings.leiden_resolution, flavor="igraph", n_iterations=2, directed=False,
                 random_state=settings.seed)
    leiden = view.obs["leiden"].to_numpy()
    kmeans = KMeans(n_clusters=len(np.unique(labels)), n_init=10, random_state=settings.seed).fit_predict(features)
    n_sample = min(settings.silhouette_cells, len(features))
    return {
        "leiden_ari": float(adjusted_rand_score(labels, leiden)),
        "leiden_nmi": float(normalized_mutual_info_score(labels, leiden)),
        "kmeans_ari": float(adjusted_rand_score(labels, kmeans)),
        "kmeans_nmi": float(normalized_mutual_info_score(labels, kmeans)),
        "silhouette": float(silhouette_score(features, labels, sample_size=n_sample, random_state=settings.seed)),
    }


def depth_scores(features, genes_detected, log_counts) -> dict:
    """The first principal component's share of variance and its |correlation| with the cells' depth."""
    centred = features - features.mean(axis=0)
    _, singular, components = np.linalg.svd(centred, full_matrices=False)
    pc1 = centred @ components[0]
    variance = singular**2

    def abs_corr(covariate):
        return float(abs(np.corrcoef(pc1, covariate)[0, 1])) if np.std(pc1) > 0 and np.std(covariate) > 0 else float("nan")

    return {"pc1_variance": float(variance[0] / variance.sum()) if variance.sum() > 0 else float("nan"),
            "pc1_corr_genes": abs_corr(genes_detected), "pc1_corr_counts": abs_corr(log_counts)}


def within_label_depth(features, labels, genes_detected) -> float:
    """Cell-weighted mean over labels of |corr(PC1 of the label's cells, their genes detected)|."""
    correlations, weights = [], []
    for label in np.unique(labels):
        inside = labels == label
        if inside.sum() < MIN_LABEL_CELLS:
            continue
        correlation = depth_scores(features[inside], genes_detected[inside], genes_detected[inside])["pc1_corr_genes"]
        if np.isfinite(correlation):
            correlations.append(correlation)
            weights.append(inside.sum())
    return float(np.average(correlations, weights=weights)) if correlations else float("nan")


def batch_scores(features, labels, batches, settings: EvaluationSettings) -> dict:
    """Label transfer across batches, and how well the batches mix among neighbours."""
    from sklearn.metrics import f1_score
    from sklearn.neighbors import NearestNeighbors

    transfer = []
    for batch in np.unique(batches):
        held_out = batches == batch
        train_labels = labels[~held_out]
        if len(train_labels) < settings.n_neighbors:
            continue
        classifier = _knn(settings)().fit(features[~held_out], train_labels)
        known = np.isin(labels[held_out], train_labels)  # types absent from the other batches cannot be transferred
        if known.any():
            predicted = classifier.predict(features[held_out][known])
            transfer.append(f1_score(labels[held_out][known], predicted, average="macro"))
    codes = pd.factorize(batches)[0]
    n_batches = codes.max() + 1
    neighbours = NearestNeighbors(n_neighbors=settings.n_neighbors + 1).fit(features).kneighbors(features)[1][:, 1:]
    shares = np.stack([(codes[neighbours] == b).mean(axis=1) for b in range(n_batches)], axis=1)  # (cells, batches)
    inverse_simpson = 1.0 / (shares**2).sum(axis=1)
    ilisi = (inverse_simpson - 1) / (n_batches - 1) if n_batches > 1 else np.zeros(len(codes))
    batch_accuracy = _fold_scores(features, codes, _knn(settings), settings)[1] if n_batches > 1 else float("nan")
    return {"transfer_f1": float(np.mean(transfer)) if transfer else float("nan"),
            "batch_ilisi": float(ilisi.mean()), "batch_knn_accuracy": batch_accuracy}


def score_embedding(features, labels, *, genes_detected, log_counts, batches=None, settings=None) -> dict:
    """Every metric of one (cells, dims) embedding against `labels` (strings or codes, one per cell)."""
    settings = settings or EvaluationSettings()
    features = np.asarray(features, np.float64)
    labels = np.asarray(labels).astype(str)
    if len(features) != len(labels):
        raise ValueError(f"{len(features)} embedding rows but {len(labels)} labels: they must be the same cells.")
    if not np.isfinite(features).all():
        raise ValueError("The embedding contains NaN or infinite values; it cannot be scored.")
    scores = dict.fromkeys(METRICS, float("nan"))
    scores.update(classification_scores(features, labels, settings))
    scores.update(clustering_scores(features, labels, settings))
    scores.update(depth_scores(features, genes_detected, log_counts))
    scores["label_pc1_corr_genes"] = within_label_depth(features, labels, np.asarray(genes_detected, np.float64))
    if batches is not None:
        scores.update(batch_scores(features, labels, np.asarray(batches).astype(str), settings))
    return scores


# ----------------------------------------------------------------------------------------------------------------------
# Baselines on the same cells
# ----------------------------------------------------------------------------------------------------------------------


def log1p_hvg_expression(adata, settings: EvaluationSettings) -> np.ndarray:
    """Scaled log1p expression (normalize_total 1e4) of the `n_top_genes` most variable genes, dense (cells, genes)."""
    import scanpy as sc

    view = sc.AnnData(X=sp.csr_matrix(adata.X, dtype=np.float32))
    if not is_log_normalized(view.X.data):
        sc.pp.normalize_total(view, target_sum=1e4)
        sc.pp.log1p(view)
    if view.n_vars > settings.n_top_genes:
        sc.pp.highly_variable_genes(view, n_top_genes=settings.n_top_genes, subset=True)
    view.X = view.X.toarray()
    sc.pp.scale(view, max_value=10)
    return np.asarray(view.X, np.float32)


def highly_variable_genes(adata, settings: EvaluationSettings) -> list[str] | None:
    """The names of the `n_top_genes` most variable genes, the ones the PCA baseline reads (None: the file has no more
    genes than that, so all are read)."""
    import scanpy as sc

    if adata.n_vars <= settings.n_top_genes:
        return None
    view = sc.AnnData(X=sp.csr_matrix(adata.X[:] if adata.isbacked else adata.X, dtype=np.float32), var=pd.DataFrame(index=adata.var_names))
    if not is_log_normalized(view.X.data):
        sc.pp.normalize_total(view, target_sum=1e4)
        sc.pp.log1p(view)
    sc.pp.highly_variable_genes(view, n_top_genes=settings.n_top_genes)
    return [str(name) for name in view.var_names[view.var["highly_variable"].to_numpy()]]


def pca_embedding(expression: np.ndarray, settings: EvaluationSettings) -> np.ndarray:
    from sklearn.decomposition import PCA

    n_components = min(settings.n_pcs, expression.shape[0] - 1, expression.shape[1] - 1)
    return PCA(n_components=n_components, random_state=settings.seed).fit_transform(expression).astype(np.float32)


def prior_only_embedding(adata, encoder, tokenizer, tokenize_kwargs: dict) -> np.ndarray:
    """Each cell's expression-weighted mean of the prior rows of the tokens the model would see (no transformer)."""
    prior = encoder.get_gene_prior().detach().float().cpu()
    result = np.zeros((adata.n_obs, prior.shape[1]), np.float32)
    for batch in iter_batches(tokenizer, adata, 1 << 16, None, tokenize_kwargs | {"progress": False}):
        ids, values = batch.inputs["input_ids"], batch.inputs["expression_values"]  # (B, G)
        weights = values * batch.inputs["attention_mask"]
        pooled = (weights[..., None] * prior[ids]).sum(1) / weights.sum(1, keepdim=True).clamp(min=1e-8)  # (B, d)
        result[batch.cells] = pooled.numpy()
    return result


def untrained_copy(encoder, seed: int):
    """The encoder's architecture freshly initialised (seeded), with its frozen prior: the step-0 model."""
    torch.manual_seed(seed)
    fresh = type(encoder)(encoder.config)
    fresh.set_gene_prior(encoder.get_gene_prior().detach().cpu())
    return fresh.to(encoder.device).eval()


# ----------------------------------------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class EvaluationReport(SavedReport):
    """Rows: embeddings; columns: `METRICS` (NaN where a metric does not apply); `info`: cells, labels, settings and
    the seconds each embedding took to compute and score."""

    table: pd.DataFrame
    info: dict = field(default_factory=dict)

    def to_markdown(self, digits: int = 3) -> str:
        columns = [c for c in self.table.columns if self.table[c].notna().any()]
        table = markdown_table(self.table[columns].rename_axis("embedding").reset_index(), digits)
        facts = f"{self.info.get('n_cells')} cells, {self.info.get('n_labels')} labels in `{self.info.get('label_key')}`"
        if self.info.get("batch_key"):
            facts += f", {self.info.get('n_batches')} batches in `{self.info.get('batch_key')}`"
        return facts + "\n\n" + table + "\n\nTargets:\n" + target_lines(self.target_checks())

    def target_checks(self) -> list[tuple[str, float, float, bool]]:
        """The cell-identity targets (issue 9) that this report can check: (target, value, threshold, met)."""
        model, table = self.info.get("name", "ScGene"), self.table
        pca = next((row for row in table.index if row.startswith("PCA")), None)
        untrained = f"{model} untrained" if f"{model} untrained" in table.index else None
        depth = float(table.at[model, "pc1_corr_genes"])
        checks = [("|corr(PC1, genes detected)| < 0.3", depth, 0.3, bool(depth < 0.3))]
        for reference, metric, threshold_of, wording in (
            (pca, "knn_f1", lambda ref: ref - 0.02, "kNN macro-F1 >= PCA - 0.02"),
            (pca, "kmeans_ari", lambda ref: 0.9 * ref, "KMeans ARI >= 0.9 x PCA"),
            (pca, "leiden_ari", lambda ref: 0.9 * ref, "Leiden ARI >= 0.9 x PCA"),
            (untrained, "knn_f1", lambda ref: ref + 0.02, "kNN macro-F1 >= untrained + 0.02"),
            (untrained, "kmeans_ari", lambda ref: ref + 0.05, "KMeans ARI >= untrained + 0.05"),
            (untrained, "leiden_ari", lambda ref: ref + 0.05, "Leiden ARI >= untrained + 0.05"),
        ):
            if reference is not None:
                value, threshold = table.at[model, metric], threshold_of(table.at[reference, metric])
                checks.append((wording, float(value), float(threshold), bool(value >= threshold)))
        return checks

    def to_json(self) -> str:
        rows = {name: {k: (None if pd.isna(v) else v) for k, v in row.items()} for name, row in self.table.iterrows()}
        checks = [{"target": t, "value": v, "threshold": h, "met": m} for t, v, h, m in self.target_checks()]
        return json.dumps({"info": self.info, "scores": rows, "targets": checks}, indent=2)


def labelled_cells(adata, label_key: str, batch_key: str | None, n_folds: int):
    """The cells to score: labelled, in labels with at least `n_folds` cells (needed by stratified folds)."""
    for key in (label_key, batch_key):
        if key is not None and key not in adata.obs.columns:
            raise KeyError(f"{key!r} is not an obs column; available: {list(adata.obs.columns)}")
    labels = adata.obs[label_key]
    keep = labels.notna().to_numpy()
    counts = labels[keep].astype(str).value_counts()
    rare = counts[counts < n_folds].index
    if len(rare):
        logger.warning(f"Labels with fewer than {n_folds} cells are left out of the evaluation: {list(rare)}")
        keep &= ~labels.astype(str).isin(rare).to_numpy()
    if batch_key is not None:
        keep &= adata.obs[batch_key].notna().to_numpy()
    if labels[keep].astype(str).nunique() < 2:
        cells_per_label = {str(label): int(cells) for label, cells in counts.items()}
        raise ValueError(f"obs[{label_key!r}] needs at least two labels with {n_folds}+ cells each to evaluate against; "
                         f"it has {cells_per_label} over {len(labels)} cells. Pass more labelled cells, or another "
                         "label_key.")
    return keep


def depth_covariates(adata) -> tuple[np.ndarray, np.ndarray]:
    """Genes detected and log1p total counts of each cell (of X as given)."""
    matrix = sp.csr_matrix(adata.X)
    return np.diff(matrix.indptr).astype(np.float64), np.log1p(np.asarray(matrix.sum(axis=1)).ravel())


def evaluate(
    adata,
    model=None,
    *,
    label_key: str,
    batch_key: str | None = None,
    tokenizer=None,
    baselines=BASELINES,
    name: str = "ScGene",
    settings: EvaluationSettings | None = None,
    device=None,
    pooling_layer: int | None = None,
    progress: bool = True,
    depth_reference=None,
    **tokenize_kwargs,
) -> EvaluationReport:
    """Score `model`'s cell embeddings of `adata` (raw counts in X; an AnnData or a path, never modified) against
    `obs[label_key]`, next to `baselines` (any of "untrained", "prior", "pca", "expression") on the same cells.

    `model`: checkpoint folder, Hub id or loaded ScGene model (default: the shipped `DEFAULT_CHECKPOINT`); `pooling_layer` and `tokenize_kwargs` as for
    `scgene.embed` (the untrained model reads the same layer). `genes="hvg"` makes the model, the untrained model and
    the prior read only the highly variable genes that the PCA baseline reads. `depth_reference`: the same cells before
    a change of depth (e.g. `sc.pp.downsample_counts`), whose genes detected and counts the depth metrics use instead
    of those of the matrix read.
    """
    import anndata

    settings = settings or EvaluationSettings()
    unknown = set(baselines) - set(BASELINES)
    if unknown:
        raise ValueError(f"Unknown baselines {sorted(unknown)}; choose from {BASELINES}.")
    if isinstance(adata, (str, os.PathLike)):
        adata = anndata.read_h5ad(adata)
    layer, use_raw = tokenize_kwargs.pop("layer", None), tokenize_kwargs.pop("use_raw", False)
    if layer is not None or use_raw:  # the model and every baseline read the same matrix
        source = expression_source(adata, layer, use_raw)
        adata = anndata.AnnData(X=source.X, obs=adata.obs, var=source.var)
    keep = labelled_cells(adata, label_key, batch_key, settings.n_folds)
    cells = adata[keep]
    labels = cells.obs[label_key].astype(str).to_numpy()
    batches = cells.obs[batch_key].astype(str).to_numpy() if batch_key else None
    if depth_reference is not None and not depth_reference.obs_names.equals(adata.obs_names):
        raise ValueError("depth_reference must hold the same cells as adata, in the same order (its obs_names differ).")
    genes_detected, log_counts = depth_covariates(cells if depth_reference is None else depth_reference[keep])
    read = dict(tokenize_kwargs)
    if isinstance(read.get("genes"), str):
        if read["genes"] != "hvg":
            raise ValueError(f"genes={read['genes']!r}: pass 'hvg' (the PCA baseline's highly variable genes) or a "
                             "list of genes.")
        read["genes"] = highly_variable_genes(cells, settings)
        if read["genes"] is None:
            del read["genes"]
    encoder = load_model(model, classifier=False, device=device, pooling_layer=pooling_layer)
    tokenizer = load_tokenizer(tokenizer, encoder)

    def embed_with(which):
        return lambda: embed(cells, which, tokenizer=tokenizer, key_added=None, progress=progress, **read)

    expression = None

    def hvg_expression():
        nonlocal expression
        if expression is None:
            expression = log1p_hvg_expression(cells, settings)
        return expression

    makers = {name: embed_with(encoder)}
    if "untrained" in baselines:
        makers[f"{name} untrained"] = embed_with(untrained_copy(encoder, settings.seed))
    if "prior" in baselines:
        makers["prior only"] = lambda: prior_only_embedding(cells, encoder, tokenizer, read)
    if "pca" in baselines:
        makers[f"PCA ({settings.n_pcs} PCs of log1p HVGs)"] = lambda: pca_embedding(hvg_expression(), settings)

    rows, seconds = {}, {}
    for row_name, make in makers.items():
        start = time.perf_counter()
        rows[row_name] = score_embedding(make(), labels, genes_detected=genes_detected, log_counts=log_counts,
                                         batches=batches, settings=settings)
        seconds[row_name] = round(time.perf_counter() - start, 1)
        logger.info(f"Scored {row_name} in {seconds[row_name]} s")
    if "expression" in baselines:
        start = time.perf_counter()
        rows["expression (logistic regression on log1p HVGs)"] = dict.fromkeys(METRICS, float("nan")) | {
            "logreg_f1": _fold_scores(hvg_expression(), labels, _logistic_regression, settings)[0]}
        seconds["expression"] = round(time.perf_counter() - start, 1)
    info = {
        "n_cells": int(len(labels)), "n_labels": int(len(np.unique(labels))), "label_key": label_key,
        "batch_key": batch_key, "n_batches": int(len(np.unique(batches))) if batches is not None else None,
        "name": name, "model": str(getattr(encoder, "name_or_path", "") or name), "settings": settings.__dict__,
        "tokenize_kwargs": {key: value if key != "genes" or isinstance(value, str) else f"{len(value)} genes"
                            for key, value in tokenize_kwargs.items()}, "seconds": seconds,
    }
    return EvaluationReport(pd.DataFrame.from_dict(rows, orient="index")[list(METRICS)], info)


__all__ = ["EvaluationReport", "EvaluationSettings", "evaluate", "score_embedding"]
