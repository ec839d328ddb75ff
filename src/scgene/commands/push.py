"""`scgene push DIR ORG/NAME`: publish a checkpoint folder to the Hugging Face Hub in one commit, with a model card
made from measurements (`scgene.hub`): `--evaluation` scores, `--transfer` the leave-one-dataset-out runs. `--dry-run`
writes the card to a file and lists what would be uploaded."""

from __future__ import annotations

import argparse
import sys

from . import USER_ERRORS, user_error_message


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="checkpoint folder (config, model.safetensors, tokenizer, remote code)")
    parser.add_argument("repo_id", help="the Hub repository, e.g. my-org/scgene-pbmc (created if missing)")
    parser.add_argument("--evaluation", action="append", default=[], metavar="NAME=FILE.json",
                        help="scores on a set the model never saw (`scgene evaluate --json`); repeat for more sets")
    parser.add_argument("--transfer", metavar="OUT/runs.jsonl",
                        help="the runs of scripts/leave_one_dataset_out.py --out OUT: adds the recipe's "
                             "leave-one-dataset-out tables (and their limits) to the card")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--token", help="Hub token (default: the one `hf auth login` stored, or HF_TOKEN)")
    parser.add_argument("--message", default="Upload ScGene checkpoint", help="commit message")
    parser.add_argument("--dry-run", metavar="CARD.md",
                        help="upload nothing: write the card to CARD.md (never over an existing file) and list the files")


def run(args: argparse.Namespace) -> int:
    from ..hub import CARD_NAME, model_card, publishable_files, push, read_evaluations

    try:
        evaluations = read_evaluations(args.evaluation)
        if args.dry_run:
            files = publishable_files(args.folder)  # checks the folder first
            card = model_card(args.folder, evaluations=evaluations, repo_id=args.repo_id, transfer=args.transfer)
            with open(args.dry_run, "x", encoding="utf-8") as handle:  # "x": an existing file is never replaced
                handle.write(str(card))
            print("Would upload to " + args.repo_id + ": " + ", ".join(sorted({*files, CARD_NAME})))
            print(f"Wrote the card to {args.dry_run}")
            return 0
        commit = push(args.folder, args.repo_id, evaluations=evaluations, transfer=args.transfer, private=args.private,
                      token=args.token, commit_message=args.message)
    except USER_ERRORS as error:  # Hub HTTP errors and offline mode are OSErrors too
        print(user_error_message("push", error, {}), file=sys.stderr)
        return 1
    print(f"Pushed {args.folder} to {args.repo_id}: {getattr(commit, 'commit_url', commit)}")
    return 0
