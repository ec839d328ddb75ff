"""The main job, end to end, on the PBMC 3k data shipped in the repository (`make demo`), from the shipped checkpoint.

Each step is the command a user would type, printed before it runs. Nothing is pretrained here: the steps start from
`scgene.DEFAULT_CHECKPOINT`, the small model that ships with scgene (built by scripts/build_default_checkpoint.py on
PBMC 3k, CellBench and the celltypist sample, without labels; its card and zero-shot scores are in its README.md):
  1. `scgene embed --plot`: cell embeddings in obsm, a UMAP coloured by cell type and Leiden clusters, with their
     ARI / NMI against the cell types;
  2. `scgene evaluate`: the harness table, the shipped embedding next to the untrained model, the prior alone, 50 PCs
     and logistic regression on the same cells. In sample for pretraining (the checkpoint saw these cells, never
     their labels): docs/transfer.md has the scores on cells it never saw;
  3. `scgene tokenize` and cell-type classification with the shipped backbone frozen, against a logistic-regression
     baseline on the same held-out cells, confidences calibrated on held-out cells (examples/finetune_cell_type.py);
  4. `scgene annotate --min-confidence 0.5`: the classifier's labels and calibrated confidences in obs.
Outputs go to `--out` (default outputs/demo); a finished step is not redone when its output exists.

    python examples/demo.py [--out outputs/demo]
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
    args = parser.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    scgene = [sys.executable, "-m", "scgene.cli"]
    from scgene import DEFAULT_CHECKPOINT

    run(scgene + ["embed", args.data, "--out", out / "embedded.h5ad", "--plot", out / "umap_scgene.png",
                  "--color", "cell_type"],
        out / "embedded.h5ad")
    run(scgene + ["evaluate", args.data, "--label-key", "cell_type", "--markdown", out / "harness.md",
                  "--json", out / "harness.json"],
        out / "harness.json")
    run(scgene + ["tokenize", args.data, out / "tokenized", "--tokenizer", DEFAULT_CHECKPOINT, "--max-length", "256",
                  "--obs-columns", "cell_type"],
        out / "tokenized")
    run([sys.executable, REPO / "examples" / "finetune_cell_type.py", "--model", DEFAULT_CHECKPOINT,
         "--dataset", out / "tokenized", "--label_column", "cell_type", "--output_dir", out / "classifier",
         "--validation_fraction", "0.1", "--num_train_epochs", "30", "--per_device_train_batch_size", "32",
         "--learning_rate", "1e-3", "--eval_strategy", "no", "--use_cpu", "--report_to", "none", "--seed", "0",
         "--logging_steps", "50", "--save_strategy", "no"],
        out / "classifier" / "cell_type_results.json")
    run(scgene + ["annotate", args.data, "--model", out / "classifier", "--min-confidence", "0.5",
                  "--out", out / "annotated.h5ad"],
        out / "annotated.h5ad")
    print(f"\nCell identity on {args.data.name} (scgene evaluate, in sample for pretraining):\n"
          f"{(out / 'harness.md').read_text()}")
    print(f"\nResults: {out / 'harness.md'}, {out / 'classifier' / 'cell_type_results.json'}, "
          f"{out / 'umap_scgene.png'}, {out / 'embedded.h5ad'}, {out / 'annotated.h5ad'}")


if __name__ == "__main__":
    main()
