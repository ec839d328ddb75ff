"""The gene vocabulary behind `ScGeneTokenizer`: special tokens, then genes, each with its Ensembl id and
symbol, plus aliases; building one from a gene list, a gene table or an AnnData; and matching an AnnData's
genes to it (`GeneMapping`, with its `GeneCoverage` report).

Shipped with checkpoints as Hub code next to `tokenization_scgene.py` (which imports it relatively):
standard library and numpy only.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import re
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<pad>", "<cls>", "<mask>")
ENSEMBL_PATTERN = re.compile(r"^(ENS[A-Z]*G\d{6,})(\.\d+)?(_PAR_Y)?$")
# var columns that hold gene symbols next to Ensembl var_names (scanpy/10x, cellxgene, common exports)
SYMBOL_COLUMNS = ("gene_symbols", "gene_symbol", "symbol", "symbols", "feature_name", "gene_name", "gene_names", "gene")


def strip_ensembl_version(name: str) -> str:
    """`ENSG00000141510.17` -> `ENSG00000141510`; other names unchanged."""
    match = ENSEMBL_PATTERN.match(name)
    return match.group(1) if match else name


def is_ensembl_id(name: str) -> bool:
    return ENSEMBL_PATTERN.match(name) is not None


def gene_name(value) -> str:
    """A table cell as a gene name: None and NaN (missing) become ""."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return str(value).strip()


def alias_names(value) -> list:
    """An alias cell: a `|`-separated string, a list of names, or missing."""
    if isinstance(value, str):
        return value.split("|")
    return [] if gene_name(value) == "" else list(value)


def is_text_column(column) -> bool:
    """True for string-like `var` columns: object, string or category dtype (pandas 2 and 3)."""
    return str(column.dtype) in ("category", "string", "str") or getattr(column.dtype, "kind", "") in ("O", "S", "U")


def var_column(adata, column: str):
    if column not in adata.var.columns:
        raise KeyError(
            f"gene_column {column!r} is not a column of adata.var (it has {list(adata.var.columns)}); "
            f"pass one of those, or gene_column=None to use var_names."
        )
    return adata.var[column]


def read_vocab_file(path) -> dict:
    """A vocabulary JSON (optionally gzipped): ensembl_ids, symbols, optional aliases, species, source."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"No gene vocabulary at {path}. Pass `vocab_file=`, use `ScGeneTokenizer.from_gene_list`, or load "
            f"a saved tokenizer with `from_pretrained`."
        )
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return json.load(handle)


@dataclass
class GeneCoverage:
    """How well the input genes match the vocabulary. `count_fraction` (the share of the counts that the
    matched genes carry) is measured while tokenizing, over `n_cells` cells; None before, or without counts."""

    id_type: str
    source: str
    n_input_genes: int
    n_matched_genes: int
    n_duplicated: int
    count_fraction: float | None = None
    n_cells: int = 0
    case_hint: str = ""  # what to do when the symbols are lower case and upper-casing them would match more
    n_aliases_left_out: int = 0  # alias columns whose gene the input also has under its own name

    def __str__(self) -> str:
        if self.count_fraction is None:
            counts = "count fraction not measured" if not self.n_cells else f"no counts in the {self.n_cells} cells"
        else:
            counts = f"carrying {self.count_fraction:.1%} of the counts of {self.n_cells} cells"
        return (
            f"{self.n_matched_genes}/{self.n_input_genes} genes matched the vocabulary by {self.id_type} "
            f"(from {self.source}), {counts}"
            + (f"; {self.n_duplicated} duplicated genes summed" if self.n_duplicated else "")
            + (f"; {self.n_aliases_left_out} aliases of genes the input has under their own name left out"
               if self.n_aliases_left_out else "")
        )


@dataclass
class GeneMapping:
    """Input columns -> vocabulary ids. `columns`: the input columns that matched (ascending); `vocab_ids`: the
    distinct vocabulary ids they match (ascending, so not paired with `columns`); `column_to_matched[c]`: the index
    into `vocab_ids` of input column `c`, -1 if it matched nothing."""

    columns: np.ndarray
    vocab_ids: np.ndarray  # (n_matched,) ascending vocabulary ids
    column_to_matched: np.ndarray  # (n_input,) index into vocab_ids, -1 for unmatched
    coverage: GeneCoverage
    # (n_matched,) matched indices ordered by the first input column of each: duplicated genes keep the
    # input column order that unduplicated ones have
    by_first_column: np.ndarray | None = None


class GeneVocabulary:
    """Ids 0, 1, 2 are `<pad>`, `<cls>`, `<mask>`; gene i of `vocab["ensembl_ids"]` / `vocab["symbols"]` is id i + 3.

    Genes are found by Ensembl id (versions stripped), by symbol (a symbol shared by several genes finds
    the first), or by alias (`vocab["aliases"]`: alias -> Ensembl id, or symbol for genes without one).
    """

    def __init__(self, vocab: dict):
        ensembl_ids, symbols = list(vocab["ensembl_ids"]), list(vocab["symbols"])
        if len(ensembl_ids) != len(symbols):
            raise ValueError("The vocabulary needs one Ensembl id and one symbol (or '') per gene.")
        self.species, self.source = vocab.get("species", ""), vocab.get("source", "")
        self.gene_ensembl_ids, self.gene_symbols = ensembl_ids, symbols
        self.aliases = dict(vocab.get("aliases", {}))
        offset = len(SPECIAL_TOKENS)
        by_ensembl, by_symbol = {}, {}
        for index, (ensembl_id, symbol) in enumerate(zip(ensembl_ids, symbols)):
            if not ensembl_id and not symbol:
                raise ValueError(f"Vocabulary gene {index + offset} has neither an Ensembl id nor a symbol.")
            if ensembl_id and ensembl_id in by_ensembl:
                raise ValueError(f"Ensembl id {ensembl_id} appears twice in the vocabulary.")
            if symbol in SPECIAL_TOKENS or ensembl_id in SPECIAL_TOKENS:
                raise ValueError(f"{symbol or ensembl_id} is a special token, not a gene name.")
            if ensembl_id:
                by_ensembl[ensembl_id] = index + offset
            elif symbol in by_symbol:  # a gene only its symbol could find would be unreachable
                raise ValueError(f"Symbol {symbol} appears twice in the vocabulary, once without an Ensembl id.")
            if symbol:
                by_symbol.setdefault(symbol, index + offset)
        for token_id, token in enumerate(SPECIAL_TOKENS):
            by_symbol[token] = token_id
        self.by_ensembl, self.by_symbol = by_ensembl, by_symbol

    def __len__(self) -> int:
        return len(SPECIAL_TOKENS) + len(self.gene_ensembl_ids)

    def to_json_dict(self) -> dict:
        return {
            "species": self.species,
            "source": self.source,
            "aliases": self.aliases,
            "ensembl_ids": self.gene_ensembl_ids,
            "symbols": self.gene_symbols,
        }

    def lookup(self, name) -> int | None:
        name = str(name)
        if is_ensembl_id(name):
            return self.by_ensembl.get(strip_ensembl_version(name))
        found = self.by_symbol.get(name)
        if found is None and name in self.aliases:
            target = self.aliases[name]
            found = self.by_ensembl.get(target, self.by_symbol.get(target))
        return found

    def letter_case_hint(self, names: list[str], n_matched: int) -> str:
        """For symbols written in lower case (e.g. 'cd3e'): how many would match upper-cased, and how to do it."""
        if sum(map(_lower_case, names)) <= len(names) / 2:
            return ""
        n_upper = sum(self.lookup(name.upper()) is not None for name in names)
        if n_upper <= n_matched:
            return ""
        return (f"The gene symbols are lower case; upper-cased, {n_upper} of {len(names)} match (human symbols are "
                "upper case): adata.var_names = adata.var_names.str.upper(), if these are human genes.")

    def map_genes(self, adata, gene_column: str | None = None) -> GeneMapping:
        """Match `adata`'s genes, from `gene_column` or the best of var_names and the string `var` columns."""
        if gene_column is not None:
            candidates = {gene_column: list(map(str, var_column(adata, gene_column)))}
        else:
            candidates = {"var_names": list(map(str, adata.var_names))}
            for column in adata.var.columns:
                if is_text_column(adata.var[column]):
                    candidates[column] = list(map(str, adata.var[column]))
        best = None
        for source, names in candidates.items():
            ids = np.array([self.lookup(name) or -1 for name in names], dtype=np.int64)
            ids[ids < len(SPECIAL_TOKENS)] = -1  # "<pad>", "<cls>" or "<mask>" in the input are not genes
            id_type = "Ensembl id" if sum(map(is_ensembl_id, names)) > len(names) / 2 else "symbol"
            # Ensembl ids are unambiguous: prefer them unless symbols match over 5% more genes.
            score = (ids >= 0).sum() * (1.05 if id_type == "Ensembl id" else 1.0)
            if best is None or score > best[0]:
                best = (score, source, names, ids, id_type)
        _, source, names, ids, id_type = best
        # exact names before aliases: a column that only an alias matches is another feature when the input also has
        # its gene under the gene's own name (10x's KIAA0754 beside MACF1), so it is left out rather than summed in
        by_alias = np.array([ids[i] >= 0 and not is_ensembl_id(name) and name not in self.by_symbol
                             for i, name in enumerate(names)], dtype=bool)
        shadowed = by_alias & np.isin(ids, ids[(ids >= 0) & ~by_alias])
        if shadowed.any():
            examples = ", ".join(f"{names[i]} beside {self.gene_symbols[ids[i] - len(SPECIAL_TOKENS)]}"
                                 for i in np.flatnonzero(shadowed)[:3])
            logger.info(f"{int(shadowed.sum())} input genes are aliases of genes the input also has under their own "
                        f"name ({examples}, ...): they are left out, not summed into those genes.")
        ids[shadowed] = -1
        matched = ids >= 0
        vocab_ids, column_to_matched = np.unique(ids[matched], return_inverse=True)
        columns = np.flatnonzero(matched)
        mapping = np.full(len(names), -1, dtype=np.int32)
        mapping[columns] = column_to_matched
        coverage = GeneCoverage(id_type, source, len(names), len(vocab_ids), int(matched.sum() - len(vocab_ids)),
                                n_aliases_left_out=int(shadowed.sum()))
        coverage.case_hint = self.letter_case_hint(names, len(vocab_ids)) if id_type == "symbol" else ""
        by_first_column = None
        if coverage.n_duplicated:
            logger.warning(
                f"{coverage.n_duplicated} input genes map to a vocabulary gene that another column already has "
                f"(duplicated symbols or versions); their counts are summed."
            )
            first_column = np.full(len(vocab_ids), len(names), dtype=np.int64)
            np.minimum.at(first_column, column_to_matched, columns)
            by_first_column = np.argsort(first_column).astype(np.int32)
        return GeneMapping(columns, vocab_ids, mapping, coverage, by_first_column)


def _lower_case(name: str) -> bool:
    return name == name.lower() and name != name.upper()


def vocab_from_gene_list(genes, reference: GeneVocabulary | None) -> dict:
    """Exactly `genes` (Ensembl ids, symbols or (Ensembl id, symbol) pairs), in order; the missing id type
    of each gene comes from `reference` when it knows the gene, and so does the species when it knows most."""
    ensembl_ids, symbols, n_known = [], [], 0
    for gene in genes:
        if isinstance(gene, (tuple, list)):
            ensembl_id, symbol = gene
        else:
            name = str(gene)
            ensembl_id, symbol = (name, "") if is_ensembl_id(name) else ("", name)
        ensembl_id, symbol = strip_ensembl_version(gene_name(ensembl_id)), gene_name(symbol)
        known = reference.lookup(ensembl_id or symbol) if reference is not None else None
        if known is not None and known >= len(SPECIAL_TOKENS):
            n_known += 1
            ensembl_id = ensembl_id or reference.gene_ensembl_ids[known - len(SPECIAL_TOKENS)]
            symbol = symbol or reference.gene_symbols[known - len(SPECIAL_TOKENS)]
        ensembl_ids.append(ensembl_id)
        symbols.append(symbol)
    species = reference.species if reference is not None and n_known > len(ensembl_ids) / 2 else ""
    return {"species": species, "source": "from_gene_list", "ensembl_ids": ensembl_ids, "symbols": symbols}


def vocab_from_gene_table(table, ensembl_column, symbol_column, alias_column, species: str) -> dict:
    """See `ScGeneTokenizer.from_gene_table`."""
    columns = [c for c in (ensembl_column, symbol_column, alias_column) if c is not None]
    available = list(table.keys())
    missing = [c for c in columns if c not in available]
    if missing or not {ensembl_column, symbol_column} - {None}:
        raise KeyError(
            f"Gene table columns {missing or [ensembl_column, symbol_column]} not found; it has {available}. "
            f"Name them with ensembl_column=, symbol_column= (and alias_column=)."
        )
    n_rows = len(table[columns[0]])
    ensembl_ids = [strip_ensembl_version(gene_name(e)) for e in table[ensembl_column]] if ensembl_column else [""] * n_rows
    symbols = [gene_name(s) for s in table[symbol_column]] if symbol_column else [""] * n_rows
    aliases, ambiguous = {}, set()
    if alias_column is not None:
        known_symbols = set(symbols)
        for ensembl_id, symbol, names in zip(ensembl_ids, symbols, table[alias_column]):
            for alias in {gene_name(name) for name in alias_names(names)} - {""} - known_symbols:
                target = ensembl_id or symbol
                if aliases.setdefault(alias, target) != target:
                    ambiguous.add(alias)
        for alias in ambiguous:
            del aliases[alias]
        if ambiguous:
            logger.warning(f"{len(ambiguous)} aliases name more than one gene and were dropped: {sorted(ambiguous)[:10]}")
    return {"species": species, "source": "from_gene_table", "ensembl_ids": ensembl_ids, "symbols": symbols, "aliases": aliases}


def genes_of_anndata(adata, gene_column: str | None, symbol_column: str | None) -> list:
    """`adata`'s genes for `vocab_from_gene_list`: names, or (Ensembl id, symbol) pairs when the names are
    Ensembl ids and `symbol_column` (or a `var` column named like one of `SYMBOL_COLUMNS`) gives symbols."""
    names = [str(name) for name in (adata.var_names if gene_column is None else var_column(adata, gene_column))]
    if symbol_column is None and sum(map(is_ensembl_id, names)) > len(names) / 2:
        symbol_column = next((c for c in adata.var.columns if c.lower() in SYMBOL_COLUMNS), None)
    if symbol_column is None:
        return names
    symbols = [gene_name(symbol) for symbol in var_column(adata, symbol_column)]
    return [
        (name, "" if is_ensembl_id(symbol) else symbol) if is_ensembl_id(name) else ("", name)
        for name, symbol in zip(names, symbols)
    ]
