"""What the frozen gene prior knows of regulation: a linear probe fitted on a curated signed network.

The prior (seed 000's fused gene embedding, a frozen buffer of every ScGene checkpoint) is built from gene
descriptions, co-expression and expression. `RegulationProbe` asks how much of a curated network it holds: fitted on
the edges of some regulators, it predicts the edges of others from their prior rows alone.

- **Features of a pair** (regulator j, target i): the two genes' unit prior rows and their product.
- **Edge**: a logistic regression tells the reference's edges from *shuffled-target* pairs (the same regulators with
  the edges' targets permuted), so knowing which genes are frequent targets does not help.
- **Sign**: a second logistic regression on the edges, activating and repressing weighing the same.
- Both choose their strength by cross-validation over groups of regulators. A pair's weight is P(edge) with the
  predicted sign.

`prior_regulation(adata)` fits it on a reference (default CollecTRI) and writes the signed network of the chosen
regulators over the genes the cells measure. For a regulator the reference lacks, the edges are the probe's guess
from what its prior row shares with the curated regulators'. `scgene.regulation_benchmark` scores the probe only on
TFs it was not fitted on ("prior probe"). It reads no expression: the network is the same for any cells measuring
the same genes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from .gene_regulation import DEFAULT_REGULATION_CHECKPOINT, GeneIndex, collectri, varp_matrix
from .inference import load_model, load_tokenizer
from .tokenization_scgene import opened

PROBE_NULL_RATIO = 3  # shuffled-target pairs per reference edge in the probe's training
PROBE_STRENGTHS = [0.01, 0.1, 1.0, 10.0, 100.0]  # inverse regularisation strengths the probe chooses from
PRIOR_REGULATION_KEY = "scgene_prior_regulation"


def checked_reference(reference) -> pd.DataFrame:
    """A reference network (`source, target, weight`, weight's sign = the edge's sign; default CollecTRI)."""
    if reference is None:
        return collectri()
    if isinstance(reference, (str, os.PathLike)):
        reference = pd.read_csv(reference, sep=None, engine="python")
    missing = {"source", "target", "weight"} - set(reference.columns)
    if missing:
        raise ValueError(f"The reference network needs the columns source, target, weight (as decoupler's networks); "
                         f"missing {sorted(missing)}.")
    return reference[["source", "target", "weight"]]


@dataclass
class EdgeSet:
    """Gene pairs (vocabulary ids, or positions of a `GeneIndex`): reference edges with their sign, and negatives."""

    positive_sources: np.ndarray
    positive_targets: np.ndarray
    signs: np.ndarray  # +1 / -1 of each positive
    negative_sources: np.ndarray
    negative_targets: np.ndarray

    @property
    def sources(self) -> np.ndarray:
        return np.concatenate([self.positive_sources, self.negative_sources])

    @property
    def targets(self) -> np.ndarray:
        return np.concatenate([self.positive_targets, self.negative_targets])

    @property
    def labels(self) -> np.ndarray:
        return np.r_[np.ones(len(self.positive_sources)), np.zeros(len(self.negative_sources))]


def reference_ids(reference: pd.DataFrame, tokenizer) -> pd.DataFrame:
    """The reference's edges between vocabulary genes, as vocabulary ids (`source`, `target`, `sign`), self-edges and
    unsigned (weight 0) edges dropped, duplicates kept once."""
    names = pd.unique(pd.concat([reference["source"], reference["target"]]).astype(str))
    id_of = {name: -1 if i is None else i for name, i in zip(names, (tokenizer._lookup(name) for name in names))}
    edges = pd.DataFrame({"source": reference["source"].astype(str).map(id_of),
                          "target": reference["target"].astype(str).map(id_of),
                          "sign": np.sign(reference["weight"].to_numpy(float))})
    edges = edges[(edges["source"] >= 0) & (edges["target"] >= 0) & (edges["source"] != edges["target"])
                  & (edges["sign"] != 0)]
    return edges.drop_duplicates(["source", "target"]).reset_index(drop=True)


def shuffled_target_edges(edges: pd.DataFrame, held_out: np.ndarray, null_ratio: int, seed: int) -> EdgeSet:
    """Positives: the edges of the held-out sources. Negatives: the same sources with the positives' targets permuted,
    `null_ratio` times, minus any reference edge and self pair, each pair once."""
    positives = edges[edges["source"].isin(held_out)]
    known = set(zip(edges["source"], edges["target"]))
    rng = np.random.default_rng(seed)
    sources = np.tile(positives["source"].to_numpy(), null_ratio)
    targets = np.concatenate([rng.permutation(positives["target"].to_numpy()) for _ in range(null_ratio)])
    keep = [(s, t) not in known and s != t for s, t in zip(sources, targets)]
    negatives = pd.DataFrame({"source": sources[keep], "target": targets[keep]}).drop_duplicates()
    return EdgeSet(positives["source"].to_numpy(), positives["target"].to_numpy(), positives["sign"].to_numpy(),
                   negatives["source"].to_numpy(), negatives["target"].to_numpy())


def _fitted_regression(features: np.ndarray, labels: np.ndarray, groups: np.ndarray, **options):
    """Logistic regression whose strength is chosen from `PROBE_STRENGTHS` by 3-fold CV over `groups`."""
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import GroupKFold

    folds = list(GroupKFold(n_splits=3).split(features, labels, groups=groups))
    return LogisticRegressionCV(Cs=PROBE_STRENGTHS, cv=folds, l1_ratios=(0.0,), max_iter=2000,
                                use_legacy_attributes=False, **options).fit(features, labels)


@dataclass
class RegulationProbe:
    """Two linear read-outs of a pair's prior features (see the module docstring): `edge` scores P(edge) and `sign`
    the sign (`sign=None`: every edge gets `constant_sign`, when the reference taught one sign only). Each is
    (weights of the regulator row, of the target row, of their product, intercept)."""

    prior: np.ndarray  # (vocab, d) unit rows
    edge: tuple[np.ndarray, np.ndarray, np.ndarray, float]
    sign: tuple[np.ndarray, np.ndarray, np.ndarray, float] | None
    constant_sign: float = 1.0

    @classmethod
    def fit(cls, prior: torch.Tensor, edges: pd.DataFrame, regulator_ids, seed: int = 0) -> RegulationProbe:
        """Fit on the `edges` (vocabulary ids `source, target, sign`, as `reference_ids` gives) of `regulator_ids`."""
        unit = torch.nn.functional.normalize(prior.detach().float().cpu(), dim=1).numpy()
        training = shuffled_target_edges(edges, np.asarray(regulator_ids), PROBE_NULL_RATIO, seed + 1)
        if not len(training.signs) or not len(training.negative_sources):
            raise ValueError("The reference has too few edges among these regulators to fit a probe on: pass more "
                             "regulators, or a reference with more of their edges.")

        def features(sources, targets):
            regulator, target = unit[sources], unit[targets]
            return np.hstack([regulator, target, regulator * target])

        def parts(regression):
            coef, d = regression.coef_.ravel(), unit.shape[1]
            return coef[:d], coef[d:2 * d], coef[2 * d:], float(regression.intercept_[0])

        edge = _fitted_regression(features(training.sources, training.targets), training.labels, training.sources,
                                  scoring="roc_auc")
        activating = training.signs > 0
        if activating.all() or not activating.any():
            return cls(unit, parts(edge), None, 1.0 if activating.all() else -1.0)
        sign = _fitted_regression(features(training.positive_sources, training.positive_targets), activating,
                                  training.positive_sources, scoring="balanced_accuracy", class_weight="balanced")
        return cls(unit, parts(edge), parts(sign))

    def _logits(self, read_out, sources: np.ndarray, targets: np.ndarray, every_pair: bool) -> np.ndarray:
        """Logits of the pairs (`sources[k]`, `targets[k]`), or with `every_pair` of every regulator-target pair
        (len(sources), len(targets)): the read-out is linear, so no pair's features are built."""
        regulator_weights, target_weights, product_weights, intercept = read_out
        regulators, genes = self.prior[sources], self.prior[targets]
        if every_pair:
            return ((regulators @ regulator_weights)[:, None] + (genes @ target_weights)[None, :]
                    + (regulators * product_weights) @ genes.T + intercept)
        return (regulators @ regulator_weights + genes @ target_weights
                + (regulators * product_weights * genes).sum(axis=1) + intercept)

    def _signed(self, sources, targets, every_pair: bool) -> np.ndarray:
        sources, targets = np.asarray(sources), np.asarray(targets)
        probability = 1 / (1 + np.exp(-self._logits(self.edge, sources, targets, every_pair)))
        if self.sign is None:
            return probability * self.constant_sign
        return probability * np.where(self._logits(self.sign, sources, targets, every_pair) > 0, 1.0, -1.0)

    def matrix(self, sources, targets) -> np.ndarray:
        """Signed P(edge) of every regulator in `sources` (vocabulary ids) over every gene in `targets`."""
        return self._signed(sources, targets, every_pair=True)

    def weights(self, sources, targets) -> np.ndarray:
        """Signed P(edge) of each pair (`sources[k]`, `targets[k]`)."""
        return self._signed(sources, targets, every_pair=False)


def prior_regulation(
    adata,
    model=None,
    *,
    regulators=None,
    reference=None,
    top_k: int = 100,
    key_added: str | None = PRIOR_REGULATION_KEY,
    tokenizer=None,
    gene_column: str | None = None,
    seed: int = 0,
) -> pd.DataFrame:
    """The signed regulator -> target network a checkpoint's frozen prior predicts over the genes `adata` measures,
    from a probe fitted on `reference` (`source, target, weight`; default CollecTRI; see the module docstring).

    `regulators`: gene names (default: the reference's regulators that are measured). Returns `source, target,
    weight, abs_weight, rank, in_reference` (the `top_k` targets of largest |weight| per regulator; `in_reference`
    marks the curated edges, which the probe learned from). With an AnnData in memory and `key_added`, writes
    `adata.varp[key_added]` (sparse, rows = regulators) and `adata.uns[key_added]` (the settings)."""
    if not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ValueError(f"top_k must be a positive number of targets per regulator, got {top_k!r}.")
    encoder = load_model(DEFAULT_REGULATION_CHECKPOINT if model is None else model)
    tokenizer = load_tokenizer(tokenizer, encoder)
    reference = checked_reference(reference)
    edges = reference_ids(reference, tokenizer)
    with opened(adata) as cells:
        genes = GeneIndex(cells, tokenizer, gene_column, encoder.config.vocab_size)
    if regulators is None:
        regulators = reference["source"].astype(str).unique()
    regulator_positions = genes.subset([regulators] if isinstance(regulators, str) else list(regulators), tokenizer)
    if not len(regulator_positions):
        raise ValueError("None of the regulators is measured in adata (matched by symbol, Ensembl id or alias): check "
                         "the names, or leave regulators= out for the reference's regulators.")
    probe = RegulationProbe.fit(encoder.get_gene_prior(), edges, np.unique(edges["source"]), seed=seed)
    known = set(zip(edges["source"], edges["target"]))
    rows = []
    for start in range(0, len(regulator_positions), 256):  # bounded: 256 regulators x genes at a time
        block = regulator_positions[start:start + 256]
        weights = probe.matrix(genes.vocab_ids[block], genes.vocab_ids)  # (regulators, genes)
        weights[np.arange(len(block)), block] = 0.0  # no self-edge
        keep = min(top_k, len(genes) - 1)
        top = np.argpartition(-np.abs(weights), keep - 1, axis=1)[:, :keep]
        for row, position in enumerate(block):
            chosen = top[row][np.argsort(-np.abs(weights[row, top[row]]), kind="stable")]  # strongest first
            rows.append(pd.DataFrame({"source": genes.names[position], "target": genes.names[chosen],
                                      "weight": weights[row, chosen], "abs_weight": np.abs(weights[row, chosen]),
                                      "rank": np.arange(1, len(chosen) + 1),
                                      "in_reference": [(genes.vocab_ids[position], genes.vocab_ids[t]) in known
                                                       for t in chosen]}))
    network = pd.concat(rows, ignore_index=True)
    if key_added and not isinstance(adata, (str, os.PathLike)):
        adata.varp[key_added] = varp_matrix(network, genes, adata.n_vars)
        adata.uns[key_added] = {"model": str(getattr(encoder, "name_or_path", "") or "in-memory model"),
                                "regulators": len(regulator_positions), "top_k": top_k,
                                "reference_edges": len(edges), "seed": seed,
                                "method": "linear probe of the frozen prior fitted on the reference"}
    return network
