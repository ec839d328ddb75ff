"""Build the human gene knowledge table shipped in `src/scgene/resources/knowledge/human_gene_knowledge.csv.gz`.

One row per gene of the default human vocabulary (`src/scgene/resources/human_vocab.json.gz`), in vocabulary
order, with columns:

- `gene` (symbol; the Ensembl id for unnamed genes) and `ensembl_id`: the keys matched to a tokenizer;
- `type:protein_coding`, `type:lncRNA`, `type:mitochondrial`, `type:immune_receptor`: 0/1 gene type (GENCODE
  biotype; IG_C and TR_C constant genes);
- `transcription_factor`: 0/1, Lambert et al. 2018 human TFs;
- the 50 MSigDB hallmark sets and the GO BP/MF/CC sets of 50 to 500 genes, as 0/1 memberships; a column is
  named by the hallmark set, or by `GO:id name`;
- `description`: one English sentence block per gene (GO-derived text from org.Hs.eg.db; genes without one
  get "SYMBOL (full name) is a <type> gene located at <cytoband>." from the NCBI gene table, or the GENCODE
  biotype), the input of the sentence-transformer.

    python scripts/build_knowledge_table.py [--data ../shared/data] [--output PATH] [--min-size 50] [--max-size 500]
                                            [--vocab src/scgene/resources/human_vocab.json.gz]

The output is written atomically with a fixed gzip header, so the same inputs give the same bytes. The input
files are only read.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
from scgene.fileio import atomic_path  # noqa: E402
from scgene.prior.knowledge import DEFAULT_TABLE  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data"
VOCAB = REPO / "src" / "scgene" / "resources" / "human_vocab.json.gz"
INPUTS = [
    "genes/genes_homo_sapiens.csv.gz",
    "genes/org_Hs_eg_gene_table.tsv.gz",
    "genes/gene_text_from_org_Hs_eg_GO.json.gz",
    "genesets/h.all.v7.0.symbols.gmt",
    "genesets/go_bp.symbols.gmt.gz",
    "genesets/go_mf.symbols.gmt.gz",
    "genesets/go_cc.symbols.gmt.gz",
    "regulation/lambert2018.txt",
]


def check_inputs(data: Path, vocab: Path) -> None:
    """Name every missing input file at once, and how to point the script at the data."""
    missing = [str(data / name) for name in INPUTS if not (data / name).is_file()]
    missing += [] if vocab.is_file() else [str(vocab)]
    if missing:
        raise SystemExit(
            f"Missing input file(s): {missing}. Pass the shared data folder with --data (it needs genes/, "
            "genesets/ and regulation/ as described in its README) and the vocabulary with --vocab."
        )


def read_gmt(path: Path) -> list[tuple[str, str, list[str]]]:
    """(id, description, genes) per line of a GMT file, gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [(f[0], f[1], [g for g in f[2:] if g]) for f in (line.rstrip("\n").split("\t") for line in handle)]


def gene_set_columns(data: Path, symbols: set[str], min_size: int, max_size: int) -> dict[str, set[str]]:
    """Hallmark sets (all) and GO sets whose size in the vocabulary is within [min_size, max_size]."""
    columns = {name: set(genes) & symbols for name, _, genes in read_gmt(data / "genesets" / "h.all.v7.0.symbols.gmt")}
    for ontology in ("go_bp", "go_mf", "go_cc"):
        for go_id, name, genes in read_gmt(data / "genesets" / f"{ontology}.symbols.gmt.gz"):
            members = set(genes) & symbols
            if min_size <= len(members) <= max_size:
                columns[f"{go_id} {name}"] = members
    return columns


def descriptions(data: Path, genes: list[tuple[str, str]], biotypes: dict[str, str]) -> list[str]:
    """GO-derived description per gene, with NCBI- or GENCODE-based fallbacks."""
    with gzip.open(data / "genes" / "gene_text_from_org_Hs_eg_GO.json.gz", "rt", encoding="utf-8") as handle:
        go_text = json.load(handle)
    ncbi: dict[str, str] = {}
    with gzip.open(data / "genes" / "org_Hs_eg_gene_table.tsv.gz", "rt", newline="") as handle:
        for row in csv.DictReader(handle, delimiter="\t"):
            sentence = f"{row['symbol']} ({row['name']}) is a {row['gene_type']} gene located at {row['cytoband']}."
            for key in [row["symbol"], *row["ensembl_ids"].split("|")]:
                if key:
                    ncbi.setdefault(key, sentence)
    texts = []
    for ensembl_id, symbol in genes:
        text = go_text.get(symbol) or ncbi.get(symbol) or ncbi.get(ensembl_id)
        texts.append(text or f"{symbol or ensembl_id} is a {biotypes[ensembl_id].replace('_', ' ')} gene.")
    return texts


def build(data: Path, min_size: int, max_size: int, vocab_path: Path = VOCAB) -> pd.DataFrame:
    check_inputs(data, vocab_path)
    with gzip.open(vocab_path, "rt", encoding="utf-8") as handle:
        vocab = json.load(handle)
    genes = list(zip(vocab["ensembl_ids"], vocab["symbols"]))
    with gzip.open(data / "genes" / "genes_homo_sapiens.csv.gz", "rt", newline="") as handle:
        biotypes = {row[0]: row[4] for row in csv.reader(handle)}
    unknown = [e for e, _ in genes if e not in biotypes]
    if unknown:
        raise SystemExit(
            f"{len(unknown)} vocabulary genes are not in genes_homo_sapiens.csv.gz, e.g. {unknown[:5]}: the "
            "vocabulary and the GENCODE gene table must come from the same release."
        )
    symbols = [s for _, s in genes]
    tfs = set((data / "regulation" / "lambert2018.txt").read_text().split())
    sets = gene_set_columns(data, set(filter(None, symbols)), min_size, max_size)

    table = {
        "gene": [s or e for e, s in genes],
        "ensembl_id": [e for e, _ in genes],
        "type:protein_coding": [int(biotypes[e] == "protein_coding") for e, _ in genes],
        "type:lncRNA": [int(biotypes[e] == "lncRNA") for e, _ in genes],
        "type:mitochondrial": [int(s.startswith("MT-")) for _, s in genes],
        "type:immune_receptor": [int(biotypes[e] in ("IG_C_gene", "TR_C_gene")) for e, _ in genes],
        "transcription_factor": [int(s in tfs) for s in symbols],
    }
    for name, members in sets.items():
        table[name] = np.fromiter((s in members for s in symbols), dtype=np.uint8, count=len(symbols))
    table["description"] = descriptions(data, genes, biotypes)
    return pd.DataFrame(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the shared data folder (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=DEFAULT_TABLE, help="output .csv.gz (default: %(default)s)")
    parser.add_argument("--min-size", type=int, default=50, help="smallest GO set kept, in vocabulary genes")
    parser.add_argument("--max-size", type=int, default=500, help="largest GO set kept, in vocabulary genes")
    parser.add_argument("--vocab", type=Path, default=VOCAB, help="vocabulary JSON (default: %(default)s)")
    args = parser.parse_args(argv)
    if not 1 <= args.min_size <= args.max_size:
        raise SystemExit(f"Need 1 <= --min-size <= --max-size, got {args.min_size} and {args.max_size}.")
    table = build(args.data, args.min_size, args.max_size, args.vocab)
    with atomic_path(args.output) as tmp:
        # No file name and mtime=0 in the gzip header keep the bytes reproducible.
        with open(tmp, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as handle:
            table.to_csv(handle, index=False)
    binary = table.shape[1] - 3
    print(f"{args.output}: {len(table)} genes, {binary} binary columns, 1 text column")
    return 0


if __name__ == "__main__":
    sys.exit(main())
