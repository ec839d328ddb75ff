"""The `scgene` command line: one sub-command per job, each defined in `scgene.commands.<name>`.

Each command module exposes `add_arguments(parser)` and `run(args) -> int`; this file only wires them up,
so importing the CLI stays cheap until a sub-command is chosen.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys

# sub-command -> (module, one-line help)
COMMANDS = {
    "tokenize": ("scgene.commands.tokenize", "Tokenize .h5ad files (one or a corpus) into a Hugging Face datasets folder."),
    "build-prior": ("scgene.commands.build_prior", "Build the fused prior gene embedding from data."),
    "convert": ("scgene.commands.convert", "Convert an original ScGene checkpoint to a Hugging Face checkpoint."),
    "embed": ("scgene.commands.embed", "Cell embeddings of an .h5ad into obsm (and a UMAP plot)."),
    "merge": ("scgene.commands.merge", "Join the shards of `scgene embed --shard I/N` into one .h5ad."),
    "annotate": ("scgene.commands.annotate", "Cell-type labels of an .h5ad from a fine-tuned classifier."),
    "evaluate": ("scgene.commands.evaluate", "Score a model's cell embeddings against labels, next to PCA and other baselines."),
    "regulation": ("scgene.commands.regulation", "The signed regulator -> target network of a dual-branch checkpoint, as a table."),
    "evaluate-regulation": ("scgene.commands.evaluate_regulation",
                            "Score a checkpoint's signed network against a curated one (CollecTRI), next to baselines."),
    "perturb": ("scgene.commands.perturb", "Knock genes out or up in silico: predicted expression changes and embedding shifts."),
    "evaluate-perturbation": ("scgene.commands.evaluate_perturbation",
                              "Score in-silico perturbation against a real CRISPR screen, next to baselines."),
    "predict-from-screen": ("scgene.commands.predict_from_screen",
                            "Predict unscreened perturbations from the screened ones that act alike."),
    "push": ("scgene.commands.push", "Publish a checkpoint to the Hugging Face Hub in one commit, with a measured model card."),
}


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import version

    parser = argparse.ArgumentParser(prog="scgene", description="ScGene single-cell foundation model tools.")
    parser.add_argument("--version", action="version", version=f"scgene {version('scgene')}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def exit_on_sigterm(signum, frame) -> None:
    """SIGTERM (a scheduler's stop, `kill`) ends the command like Ctrl-C: staging folders are removed on the way out."""
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    previous = signal.signal(signal.SIGTERM, exit_on_sigterm)
    try:
        return int(args._run(args) or 0)
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
