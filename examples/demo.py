"""The main job, end to end, on the PBMC 3k data shipped in the repository (`make demo`).

Each step is the command a user would type, printed before it runs. Everything uses the default human vocabulary
(26,064 genes), so the checkpoints apply to any human dataset, not only to this file's genes:
  1. `scgene tokenize`: the .h5ad -> a `datasets` folder (expressed genes, bins, `<cls>`, each cell's total count,
     cell-type column), with the tokenizer and the settings used (max_length 256) saved next to it;
  2. `scgene build-prior`: co-expression -> gene2vec, gene knowledge -> text + binary embedding -> PCA, fused; the
     knowledge part covers every vocabulary gene (the text embeddings are shipped precomputed), so genes this file
     does not measure still have an identity when the model meets another file;
  3. pretraining with the Trainer (examples/pretrain_masked_expression.py): masked expression plus the contrastive
     objective on two count-downsampled views of each cell, which keeps the embedding off sequencing depth;
  4. cell-type classification with a frozen backbone, against a logistic-regression baseline
     (examples/finetune_cell_type.py);
  5. `scgene evaluate`: the harness table, the pretrained embedding next to the untrained model, the prior alone,
     50 PCs and logistic regression on the same cells (kNN / logistic-regression macro-F1, clustering ARI, depth);
  6. `scgene embed --plot`: the pretrained model's cell embeddings in obsm, a UMAP coloured by cell type and
     Leiden clusters, with their ARI / NMI against the cell types;
  7. `scgene annotate`: the classifier's labels and confidences in obs, with a count per label.
Outputs go to `--out` (default outputs/demo); a finished step is not redone when its output exists.

    python examples/demo.py [--out outputs/demo] [--pretrain-steps 300]
"""

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

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

    run(scgene + ["tokenize", args.data, out / "tokenized", "--max-length", "256", "--obs-columns", "cell_type"],
        out / "tokenized")
    # |r| >= 0.7 (the seed's threshold) keeps 27 gene pairs of sparse PBMC 3k single cells; 0.3 keeps 3,167
    run(scgene + ["build-prior", "--adata", args.data, "--out", out / "prior",
                  "--hidden-size", args.hidden_size, "--gene2vec-dim", min(200, args.hidden_size // 2),
                  "--threshold", "0.3", "--overwrite"],  # only run when no record
        out / "prior" / "prior_record.json")
    common = ["--use_cpu", "--report_to", "none", "--seed", "0", "--logging_steps", "50", "--save_strategy", "no"]
    run(python + [REPO / "examples" / "pretrain_masked_expression.py", "--dataset", out / "tokenized",
                  "--prior", out / "prior" / "gene_prior.safetensors", "--output_dir", out / "pretrained",
                  "--hidden_size", args.hidden_size, "--norm_position", "pre", "--pooling", "mean",
                  "--contrastive_loss_weight", "1", "--max_steps", args.pretrain_steps, "--warmup_steps", "20",
                  # no dropout: a few hundred steps do not overfit, and CPU attention with dropout is ~3x slower
                  "--hidden_dropout_prob", "0", "--attention_probs_dropout_prob", "0",
                  "--learning_rate", "1e-3", "--per_device_train_batch_size", "32", *common],
        out / "pretrained" / "model.safetensors")
    run(python + [REPO / "examples" / "finetune_cell_type.py", "--model", out / "pretrained",
                  "--dataset", out / "tokenized", "--label_column", "cell_type", "--output_dir", out / "classifier",
                  "--num_train_epochs", "30", "--per_device_train_batch_size", "32", "--learning_rate", "1e-3",
                  "--eval_strategy", "no", *common],
        out / "classifier" / "cell_type_results.json")
    run(scgene + ["evaluate", args.data, "--model", out / "pretrained", "--label-key", "cell_type",
                  "--markdown", out / "harness.md", "--json", out / "harness.json"],
        out / "harness.json")
    run(scgene + ["embed", args.data, "--model", out / "pretrained", "--out", out / "embedded.h5ad",
                  "--plot", out / "umap_scgene.png", "--color", "cell_type"],
        out / "embedded.h5ad")
    run(scgene + ["annotate", args.data, "--model", out / "classifier", "--out", out / "annotated.h5ad"],
        out / "annotated.h5ad")
    print(f"\nCell identity on {args.data.name} (scgene evaluate):\n{(out / 'harness.md').read_text()}")
    print(f"\nResults: {out / 'harness.md'}, {out / 'classifier' / 'cell_type_results.json'}, "
          f"{out / 'umap_scgene.png'}, {out / 'embedded.h5ad'}, {out / 'annotated.h5ad'}")


if __name__ == "__main__":
    main()
