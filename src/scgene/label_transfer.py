"""Label transfer: a labelled reference's cell types onto a query, and "Unknown" where the reference has no match.

    scgene.transfer_labels(query, reference, label_key="cell_type")  # -> query.obs["scgene_label"], ...

Both files are embedded on the genes **both** measure, each normalised over those genes, so that two files with
different gene panels (two HVG selections, a panel and a whole transcriptome) are read on one footing. A logistic
regression on the reference's embeddings names each query cell's type, with confidences calibrated by a temperature
fitted on held-out reference cells. A query cell whose mean distance to its nearest reference cells exceeds what
`unknown_quantile` of held-out reference cells show is labelled "Unknown": a softmax over the reference's types has
no way to say "none of these", a distance does.

`ReferenceAnnotator` is that classifier on any features (the leave-one-dataset-out protocol scores the baselines
with it too: expression, PCs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
from transformers.utils import logging

from .inference import UNKNOWN_LABEL, embeddings_and_coverage, load_model, load_tokenizer, run_record
from .tokenization_scgene import PANEL_WARNING_GENES, expression_source, opened

logger = logging.get_logger(__name__)

MIN_CELLS_PER_LABEL = 5  # fewer reference cells than this cannot be split for calibration


@dataclass
class ReferenceCalls:
    """What a `ReferenceAnnotator` says of query cells: label ("Unknown" where rejected), the best reference type (also
    where rejected), its calibrated confidence, and mean distance to the nearest reference cells (standardised
    features)."""

    labels: np.ndarray
    best: np.ndarray
    confidence: np.ndarray
    distance: np.ndarray


class ReferenceAnnotator:
    """A classifier of reference cells (their features and labels) with calibrated confidences and a reject option.

    `classifier`: "logistic" (standardised features, logits divided by a temperature fitted on a held-out 20% of the
    reference) or "knn" (the vote share of `n_neighbors` neighbours). Query cells farther from the reference (mean
    distance to `n_neighbors` reference cells) than the `unknown_quantile` of held-out reference cells are "Unknown";
    `unknown_quantile=None` turns the reject option off. Features are standardised first unless `standardize=False`
    (principal components, whose scale is their variance, keep it).
    """

    def __init__(self, classifier: str = "logistic", n_neighbors: int = 15, unknown_quantile: float | None = 0.95,
                 seed: int = 0, standardize: bool = True):
        if classifier not in ("logistic", "knn"):
            raise ValueError(f"classifier must be 'logistic' or 'knn', got {classifier!r}.")
        if unknown_quantile is not None and not 0 < unknown_quantile <= 1:
            raise ValueError(f"unknown_quantile is a quantile between 0 and 1 (e.g. 0.95), got {unknown_quantile}.")
        if not isinstance(n_neighbors, int) or n_neighbors < 1:
            raise ValueError(f"n_neighbors must be a positive integer, got {n_neighbors!r}.")
        self.classifier, self.n_neighbors, self.unknown_quantile, self.seed = classifier, n_neighbors, unknown_quantile, seed
        self.standardize = standardize

    def _model(self):
        from sklearn.linear_model import LogisticRegression
        from sklearn.neighbors import KNeighborsClassifier

        if self.classifier == "knn":
            return KNeighborsClassifier(self.n_neighbors)
        return LogisticRegression(max_iter=2000)

    @staticmethod
    def _logits(model, features) -> np.ndarray:
        scores = model.decision_function(features)
        return np.c_[np.zeros(len(scores)), scores] if scores.ndim == 1 else scores  # binary: softmax([0, d]) = sigmoid

    def fit(self, features, labels) -> ReferenceAnnotator:
        """Fit on reference `features` (cells, dims) and their `labels`; labels of fewer than 5 cells are left out."""
        from sklearn.model_selection import train_test_split
        from sklearn.neighbors import NearestNeighbors
        from sklearn.preprocessing import StandardScaler

        from .training import fit_temperature

        features, labels = np.asarray(features, np.float64), np.asarray(labels).astype(str)
        if len(features) != len(labels):
            raise ValueError(f"{len(features)} reference cells but {len(labels)} labels.")
        names, counts = np.unique(labels, return_counts=True)
        rare = names[counts < MIN_CELLS_PER_LABEL]
        if len(rare):
            logger.warning(f"Reference labels with fewer than {MIN_CELLS_PER_LABEL} cells are left out: {list(rare)}.")
        keep = ~np.isin(labels, rare)
        features, labels = features[keep], labels[keep]
        if len(np.unique(labels)) < 2:
            raise ValueError(f"The reference needs two or more labels with {MIN_CELLS_PER_LABEL}+ cells each to tell "
                             f"types apart; it has {list(np.unique(labels))}.")
        self.scaler_ = StandardScaler(with_mean=self.standardize, with_std=self.standardize).fit(features)
        scaled = self.scaler_.transform(features)
        fit_cells, held_cells = train_test_split(np.arange(len(labels)), test_size=0.2, random_state=self.seed,
                                                 stratify=labels)
        probe = self._model().fit(scaled[fit_cells], labels[fit_cells])
        self.temperature_ = 1.0
        if self.classifier == "logistic":
            self.temperature_ = fit_temperature(self._logits(probe, scaled[held_cells]),
                                                np.searchsorted(probe.classes_, labels[held_cells]))
        held_distance = self._mean_distance(NearestNeighbors(n_neighbors=self.n_neighbors).fit(scaled[fit_cells]),
                                            scaled[held_cells])
        self.distance_threshold_ = (float(np.quantile(held_distance, self.unknown_quantile))
                                    if self.unknown_quantile is not None else float("inf"))
        self.model_ = self._model().fit(scaled, labels)
        self.neighbors_ = NearestNeighbors(n_neighbors=self.n_neighbors).fit(scaled)
        self.classes_ = self.model_.classes_
        return self

    def _mean_distance(self, neighbors, scaled) -> np.ndarray:
        return neighbors.kneighbors(scaled, n_neighbors=min(self.n_neighbors, neighbors.n_samples_fit_))[0].mean(axis=1)

    def predict(self, features, min_confidence: float | None = None) -> ReferenceCalls:
        """Labels of query cells; "Unknown" beyond the distance threshold or below `min_confidence`."""
        from scipy.special import softmax

        if not hasattr(self, "model_"):
            raise RuntimeError("Call fit(reference_features, labels) before predict.")
        scaled = self.scaler_.transform(np.asarray(features, np.float64))
        if self.classifier == "logistic":
            probabilities = softmax(self._logits(self.model_, scaled) / self.temperature_, axis=1)
        else:
            probabilities = self.model_.predict_proba(scaled)
        confidence = probabilities.max(axis=1)
        distance = self._mean_distance(self.neighbors_, scaled)
        best = self.classes_[probabilities.argmax(axis=1)].astype(object)
        rejected = (distance > self.distance_threshold_) | (confidence < (min_confidence or 0))
        labels = np.where(rejected, UNKNOWN_LABEL, best).astype(object)
        return ReferenceCalls(labels, best, confidence.astype(np.float32), distance.astype(np.float32))


def shared_gene_ids(query, reference, tokenizer, *, gene_column=None, layer=None, use_raw=False) -> np.ndarray:
    """Vocabulary ids of the genes that both files measure (ascending)."""
    ids = [tokenizer.map_genes(expression_source(cells, layer, use_raw), gene_column).vocab_ids
           for cells in (query, reference)]
    shared = np.intersect1d(*ids)
    if not len(shared):
        raise ValueError("The query and the reference share no vocabulary gene: check both hold gene names of the same "
                         "species (pass gene_column= where a var column holds them).")
    return shared


def transfer_labels(
    query,
    reference,
    *,
    label_key: str,
    model=None,
    tokenizer=None,
    key_added: str = "scgene_label",
    unknown_quantile: float | None = 0.95,
    min_confidence: float | None = None,
    n_neighbors: int = 15,
    seed: int = 0,
    batch_size: int | None = None,
    max_tokens_per_batch: int | None = None,
    device=None,
    progress: bool = True,
    **tokenize_kwargs,
) -> pd.DataFrame:
    """Label `query`'s cells with `reference.obs[label_key]` (both AnnData or .h5ad paths, never modified).

    Both are embedded by `model` (default: the shipped `DEFAULT_CHECKPOINT`) on the genes both measure; a calibrated
    logistic regression on the reference's embeddings labels the query; cells farther from the reference than the
    `unknown_quantile` of held-out reference cells, or below `min_confidence`, and cells without counts on the shared
    genes, are "Unknown". `tokenize_kwargs` (`layer`, `use_raw`, `gene_column`, `max_length`) apply to both files.

    Writes `obs[key_added]`, `obs[key_added + "_confidence"]`, `obs[key_added + "_distance"]` and `uns[key_added]`
    (the model, the reference, the genes shared, the temperature and distance threshold) on an AnnData query.
    Returns the three obs columns as a DataFrame.
    """
    if min_confidence is not None and not 0 <= min_confidence <= 1:
        raise ValueError(f"min_confidence is a probability between 0 and 1, got {min_confidence}.")
    if "genes" in tokenize_kwargs:
        raise ValueError("transfer_labels reads the genes both files measure; leave out genes= (subset the files "
                         "first to read fewer).")
    annotator = ReferenceAnnotator("logistic", n_neighbors=n_neighbors, unknown_quantile=unknown_quantile, seed=seed)
    encoder = load_model(model, classifier=False, device=device)
    tokenizer = load_tokenizer(tokenizer, encoder)
    reading = {key: tokenize_kwargs[key] for key in ("gene_column", "layer", "use_raw") if key in tokenize_kwargs}
    options = dict(batch_size=batch_size, max_tokens_per_batch=max_tokens_per_batch, progress=progress, **tokenize_kwargs)
    with opened(query) as query_cells, opened(reference) as reference_cells:
        if label_key not in reference_cells.obs:
            raise KeyError(f"label_key {label_key!r} is not a column of the reference's obs (it has "
                           f"{list(reference_cells.obs.columns)}).")
        genes = shared_gene_ids(query_cells, reference_cells, tokenizer, **reading)
        (logger.warning if len(genes) < PANEL_WARNING_GENES else logger.info)(
            f"The query and the reference share {len(genes)} vocabulary genes; both are read on those only"
            + (" (a whole transcriptome has 15,000 or more: two HVG selections share few, so give both files all the "
               "genes they measured)." if len(genes) < PANEL_WARNING_GENES else "."))
        labels = reference_cells.obs[label_key]
        labelled = labels.notna().to_numpy() & (labels.astype(str).str.strip() != "").to_numpy()
        reference_embeddings = embeddings_and_coverage(reference_cells, encoder, tokenizer, genes=genes, **options)[0]
        annotator.fit(reference_embeddings[labelled], labels.astype(str).to_numpy()[labelled])
        query_embeddings, coverage, has_counts = embeddings_and_coverage(query_cells, encoder, tokenizer, genes=genes,
                                                                         **options)
        calls = annotator.predict(query_embeddings, min_confidence)
        empty = ~has_counts
        obs_names = query_cells.obs_names.copy()
    if empty.any():
        logger.warning(f"{int(empty.sum())} query cells have no counts on the shared genes: labelled "
                       f"{UNKNOWN_LABEL!r} with confidence 0.")
        calls.labels[empty], calls.confidence[empty] = UNKNOWN_LABEL, 0.0
    result = pd.DataFrame({
        key_added: pd.Categorical(calls.labels, categories=list(dict.fromkeys([*annotator.classes_, UNKNOWN_LABEL]))),
        f"{key_added}_confidence": calls.confidence,
        f"{key_added}_distance": calls.distance,
    }, index=obs_names)
    unknown = float((result[key_added] == UNKNOWN_LABEL).mean()) if len(result) else 0.0
    logger.info(f"{unknown:.1%} of the query cells are {UNKNOWN_LABEL!r} (distance threshold "
                f"{annotator.distance_threshold_:.3g}, the {unknown_quantile} quantile of held-out reference cells).")
    if not isinstance(query, (str, os.PathLike)):
        for column in result.columns:
            query.obs[column] = result[column].values
        reference_name = str(reference) if isinstance(reference, (str, os.PathLike)) else "in-memory AnnData"
        query.uns[key_added] = {"labels": [str(name) for name in annotator.classes_]} | run_record(
            encoder, tokenizer, coverage, reference=reference_name, label_key=label_key, genes_shared=int(len(genes)),
            temperature=annotator.temperature_, distance_threshold=annotator.distance_threshold_,
            unknown_quantile=unknown_quantile, n_neighbors=n_neighbors, min_confidence=min_confidence)
    return result
