"""`scripts/build_knowledge_table.py` on a 13-gene extract of its real inputs (tests/data/prior/
knowledge_sources_mini, same layout as ../shared/data): reproducible bytes, the documented columns, clear errors."""

import hashlib
import importlib.util
from pathlib import Path

import pytest

from scgene.prior.knowledge import DEFAULT_TABLE, read_knowledge_table

REPO = Path(__file__).resolve().parents[2]
MINI = REPO / "tests" / "data" / "prior" / "knowledge_sources_mini"
VOCAB = MINI / "human_vocab_13genes.json.gz"


@pytest.fixture(scope="module")
def script():
    path = REPO / "scripts" / "build_knowledge_table.py"
    spec = importlib.util.spec_from_file_location("build_knowledge_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def checksums(folder: Path) -> dict[str, str]:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def test_script_builds_the_documented_table_reproducibly(script, tmp_path):
    inputs = checksums(MINI)
    args = ["--data", str(MINI), "--vocab", str(VOCAB), "--min-size", "2", "--max-size", "4"]
    assert script.main([*args, "--output", str(tmp_path / "a.csv.gz")]) == 0
    assert script.main([*args, "--output", str(tmp_path / "b.csv.gz")]) == 0
    assert (tmp_path / "a.csv.gz").read_bytes() == (tmp_path / "b.csv.gz").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.csv.gz", "b.csv.gz"]  # no temporary left over
    assert checksums(MINI) == inputs  # inputs only read

    table = read_knowledge_table(tmp_path / "a.csv.gz")
    assert len(table.genes) == 13 and list(table.texts) == ["description"]
    column = {name: table.binary[:, k] for k, name in enumerate(table.binary_columns)}
    row = {gene: i for i, gene in enumerate(table.genes)}
    assert table.binary_columns[:5] == [
        "type:protein_coding", "type:lncRNA", "type:mitochondrial", "type:immune_receptor", "transcription_factor"
    ]
    assert column["type:immune_receptor"].sum() == 0  # no IG/TR gene among the 13 (the shipped table: see below)
    assert {g for g in row if column["transcription_factor"][row[g]]} == {"MYC", "SPI1", "TP53"}  # Lambert 2018
    assert column["type:lncRNA"][row["MALAT1"]] == 1 and column["type:protein_coding"][row["MALAT1"]] == 0
    assert column["type:mitochondrial"][row["MT-CO1"]] == 1
    hallmarks = [c for c in table.binary_columns if c.startswith("HALLMARK_")]
    go = [c for c in table.binary_columns if c.startswith("GO:")]
    assert len(hallmarks) == 17 and column["HALLMARK_HYPOXIA"][row["GAPDH"]] == 1
    assert go and all(2 <= column[c].sum() <= 4 for c in go)  # GO sets filtered by size in the vocabulary
    assert len(table.binary_columns) == 5 + len(hallmarks) + len(go)
    # the unnamed gene is keyed by its Ensembl id; every gene has a description (GO text or a fallback)
    assert "ENSG00000100101" in row and all(table.texts["description"])
    assert table.texts["description"][row["CD3E"]].startswith("CD3E (CD3 epsilon subunit of T-cell receptor complex)")
    assert table.texts["description"][row["ENSG00000100101"]] == "ENSG00000100101 is a protein coding gene."


def test_script_names_missing_inputs(script, tmp_path):
    with pytest.raises(SystemExit, match=r"Missing input file\(s\).*genes_homo_sapiens.csv.gz.*--data"):
        script.main(["--data", str(tmp_path), "--vocab", str(VOCAB), "--output", str(tmp_path / "t.csv.gz")])
    with pytest.raises(SystemExit, match="--min-size <= --max-size"):
        script.main(["--data", str(MINI), "--vocab", str(VOCAB), "--min-size", "5", "--max-size", "4"])
    assert not (tmp_path / "t.csv.gz").exists()


def test_the_shipped_table_flags_the_immune_receptor_genes():
    table = read_knowledge_table(DEFAULT_TABLE)
    flagged = table.binary[:, table.binary_columns.index("type:immune_receptor")].astype(bool)
    genes = {gene for gene, is_receptor in zip(table.genes, flagged) if is_receptor}
    assert flagged.sum() == 20 and {"TRAC", "TRBC1", "TRBC2", "IGKC", "IGHM", "IGLC2", "IGHA1"} <= genes
    assert not genes & {"CD3E", "MS4A1", "NCOR2"} and not any(gene.startswith(("IGHV", "TRBV")) for gene in genes)
