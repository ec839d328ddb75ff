"""The main job, end to end, on the PBMC 3k data shipped in the repository (`make demo`).

Each step is the command a user would type, printed before it runs:
  1. a vocabulary of the data's genes (symbols resolved to Ensembl ids by the default human vocabulary);
  2. `scgene tokenize`: the .h5ad -> a `datasets` folder (expressed genes, bins, `<cls>`, cell-type column);
  3. `scgene build-prior`: co-expression -> gene2vec, gene knowledge -> text + binary embedding -> PCA, fused;
  4. masked-expression pretraining with the Trainer (examples/pretrain_masked_expression.py);
  5. cell-type classification with a frozen backbone, against a logistic-regression baseline
     (examples/finetune_cell_type.py).
Outputs go to `--out` (default outputs/demo); a finished step is not redone when its output exists.

    python examples/demo.py [--out outputs/demo] [--pretrain-steps 300]
"""

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

import anndata

from scgene import ScGeneTokenizer

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data" / "pbmc3k_seurat_2638cells_2000hvg_counts.h5ad"


def run(command: list, output: Path) -> None:
    """Run one step unless its output already exists (outputs are written atomically by each step)."""
    printable = " ".join(shlex.quote(str(part)) for part in command)
    if output.exists():
        print(f"\n[done already] {printable}", flush=True)
        return
    print(f"\n$ {printable}", flush=True)
    subprocess.run([str(part) for part in command], check=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "demo")
    parser.add_argument("--data", type=Path, default=DATA, help="raw-count .h5ad with a cell_type obs column")
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--hidden-size", type=int, default=128)
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    scgene = [sys.executable, "-m", "scgene.cli"]
    python = [sys.executable]

    vocabulary = out / "vocabulary"
    if not vocabulary.exists():
        print(f"\n# 1. vocabulary of the genes in {args.data.name}", flush=True)
        tokenizer = ScGeneTokenizer.from_anndata(anndata.read_h5ad(args.data, backed="r"), max_length=512)
        tokenizer.save_pretrained(vocabulary)
        resolved = sum(bool(e) for e in tokenizer.ensembl_ids[3:])
        print(f"{tokenizer.vocab_size - 3} genes, {resolved} with an Ensembl id -> {vocabulary}")

    run(scgene + ["tokenize", args.data, out / "tokenized", "--tokenizer", vocabulary, "--obs-columns", "cell_type"],
        out / "tokenized")
    # |r| >= 0.7 (the seed's threshold) keeps 27 gene pairs of sparse PBMC 3k single cells; 0.3 keeps 3,167
    run(scgene + ["build-prior", "--adata", args.data, "--tokenizer", vocabulary, "--out", out / "prior",
                  "--hidden-size", args.hidden_size, "--gene2vec-dim", min(200, args.hidden_size // 2),
                  "--threshold", "0.3"],
        out / "prior" / "prior_record.json")
    common = ["--use_cpu", "--report_to", "none", "--seed", "0", "--logging_steps", "50", "--save_strategy", "no"]
    run(python + [REPO / "examples" / "pretrain_masked_expression.py", "--dataset", out / "tokenized",
                  "--prior", out / "prior" / "gene_prior.safetensors", "--output_dir", out / "pretrained",
                  "--hidden_size", args.hidden_size, "--norm_position", "pre", "--pooling", "mean",
                  "--max_steps", args.pretrain_steps, "--warmup_steps", "20", "--learning_rate", "3e-4",
                  "--per_device_train_batch_size", "16", *common],
        out / "pretrained" / "model.safetensors")
    run(python + [REPO / "examples" / "finetune_cell_type.py", "--model", out / "pretrained",
                  "--dataset", out / "tokenized", "--label_column", "cell_type", "--output_dir", out / "classifier",
                  "--num_train_epochs", "30", "--per_device_train_batch_size", "32", "--learning_rate", "1e-3",
                  "--eval_strategy", "no", *common],
        out / "classifier" / "cell_type_results.json")
    print(f"\nResults: {out / 'classifier' / 'cell_type_results.json'}")


if __name__ == "__main__":
    main()
