"""Pretraining of ScGene with the Hugging Face Trainer: masked expression (values and bins), optionally with the
contrastive objective on two count-downsampled views of each cell (`--contrastive_loss_weight 1`), which keeps the
cell embedding on cell identity rather than sequencing depth (docs/cell-identity.md). Each loss is logged apart.

Input: one or more folders written by `scgene tokenize` with the same vocabulary (a corpus of several datasets is
concatenated) and a prior from `scgene build-prior`. The same script runs on CPU, one GPU, or many through
Accelerate / torchrun:

    python examples/pretrain_masked_expression.py --dataset DATA [DATA2 ...] --prior PRIOR/gene_prior.safetensors \
        --output_dir OUT --max_steps 300 [--contrastive_loss_weight 1] [--use_cpu]
    accelerate launch examples/pretrain_masked_expression.py ...        # multi-GPU (DDP), no code change
    torchrun --nproc_per_node 2 examples/pretrain_masked_expression.py ...
    ... --save_steps 100 --resume_from_checkpoint last                  # continue from OUT's newest checkpoint
    ... --streaming --max_steps 100000                                  # a corpus larger than memory, many nodes

Model size and design come from the ScGeneConfig fields given on the command line (`--encoder_type dual_branch`,
...); the width is the prior's unless `--hidden_size` is given. With `--encoder_type dual_branch
--regulation_loss_weight W --regulation_prior collectri`, the training TFs' known edges constrain the regulation map
(seed 001's biologically constrained attention; docs/regulation.md). Every TrainingArguments flag works
(`--gradient_checkpointing`, `--bf16`, ...). Masks and count views are drawn per cell from (`--seed`, epoch, cell), so
a batch split over N processes trains like the same global batch on one, and a resumed run ends with the weights
of an uninterrupted one.

With `--streaming` the cells are read as an `IterableDataset` over the memory-mapped Arrow shards (never loaded, never
merged): `--stream_shards` contiguous shards, each process reading its own (accelerate's `IterableDataset.shard`, as
`split_dataset_by_node` splits; needs a multiple of the process count, which the script rounds to), shuffled in shard
order and through a `--shuffle_buffer` of cells, for `--max_steps` steps. The evaluation cells are the ones whose
content hash falls in `--eval_fraction` (the same cells on every node and in every run; a cell repeated in the corpus
is never on both sides), at most `--max_eval_cells` of them.

The saved model folder gets `build_record.json` (`scgene.hub.training_record`), which `scgene push` turns into the
card's "Training data" and "Training record": the cells of each dataset (of each source file, for a dataset
tokenized from several), the licence given with `--data_licence` ("not recorded" without it), the command line,
steps, seed, wall time of training (of this run only, when resumed), machine, scgene version and git commit.
"""

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from safetensors.torch import load_file
from transformers import HfArgumentParser, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from scgene import ScGeneConfig, ScGeneForMaskedExpression, ScGeneTokenizer
from scgene.data import DataCollatorForMaskedExpression, KnownRegulation
from scgene.data.collators import cell_fingerprint
from scgene.fileio import write_json
from scgene.hub import BUILD_RECORD, tokenized_corpus, training_record
from scgene.inference import TRAINING_GENES_FILE
from scgene.modeling_scgene import NUM_SPECIAL_TOKENS
from scgene.prior_readout import fit_prior_readout_weight_on_tokens
from scgene.regulation_benchmark import checked_reference, split_regulators
from scgene.training import ScGeneTrainer, check_processes_train_together


@dataclass
class PretrainingArguments:
    dataset: list[str] = field(metadata={"help": "one or more folders written by `scgene tokenize` with the same "
                                                 "vocabulary (e.g. the default human one): pretrained on together"})
    prior: str = field(metadata={"help": "gene_prior.safetensors from `scgene build-prior`"})
    eval_fraction: float = field(default=0.1, metadata={"help": "cells held out to report the eval loss"})
    mlm_probability: float = field(default=0.15, metadata={"help": "fraction of each cell's genes to mask"})
    min_count_rate: float = field(default=0.3, metadata={"help": "contrastive views keep U(rate, 1) of the counts"})
    streaming: bool = field(default=False, metadata={"help": "stream the cells (IterableDataset, each process reading "
                                                               "its own shards, shuffle buffer); needs --max_steps"})
    stream_shards: int = field(default=64, metadata={"help": "shards of a streamed corpus (rounded up to a multiple "
                                                             "of the process count)"})
    shuffle_buffer: int = field(default=10_000, metadata={"help": "cells in a streamed corpus's shuffle buffer"})
    max_eval_cells: int = field(default=1_000, metadata={"help": "at most this many evaluation cells"})
    data_licence: list[str] = field(
        default_factory=list, metadata={"help": "licence of the training data, for build_record.json and the model "
                                                "card: one for every --dataset, or one per --dataset in their order"}
    )
    panel_views_min_fraction: float | None = field(
        default=None, metadata={"help": "contrastive views also keep a random U(f, 1) share of each cell's genes and "
                                        "renormalise over them, as a smaller gene panel would (e.g. 0.3)"}
    )
    regulation_prior: str | None = field(
        default=None, metadata={"help": "known signed edges for --regulation_loss_weight (dual-branch): 'collectri' (shipped) "
                                        "or a CSV/TSV with source, target, weight. Only the training split of its TFs "
                                        "is used, so `scgene evaluate-regulation --test-fraction F --seed S` with "
                                        "the same F and S scores TFs the model never saw"}
    )
    regulation_test_fraction: float = field(default=0.5, metadata={"help": "TFs held out of --regulation_prior"})
    regulation_split_seed: int = field(default=0, metadata={"help": "seed of the TF split of --regulation_prior"})
    matched_depth_views: bool = field(
        default=False, metadata={"help": "thin every cell's views to the same depths (between the batch's lowest and "
                                         "median total) instead of a fraction of its own depth"}
    )
    prior_readout: bool = field(
        default=False, metadata={"help": "after training, fit `prior_readout_weight` on up to 2,000 corpus cells "
                                         "(scgene.fit_prior_readout_weight): the saved model's cell embedding adds "
                                         "the prior, pooled the same way. It matched or beat the plain read-out on "
                                         "every left-out set of docs/transfer.md"}
    )


@dataclass
class ModelArguments:
    hidden_size: int | None = field(default=None, metadata={"help": "default: the prior's width"})
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int | None = field(default=None, metadata={"help": "default: 2 x hidden_size"})
    encoder_type: str = "standard"
    attention_type: str = "mha"
    expression_encoding: str = "binned"
    norm_position: str = "post"
    pooling: str = "cls"
    pooling_layer: int = field(default=-1, metadata={"help": "layer the cell embedding is read from: -1 the last, "
                                                             "-2 the second-to-last (saved in the config)"})
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    value_loss_weight: float = 1.0
    bin_loss_weight: float = 1.0
    contrastive_loss_weight: float = 0.0
    regulation_loss_weight: float = field(default=0.0, metadata={"help": "seed 001's biologically constrained attention "
                                                                       "(needs --regulation_prior)"})
    contrastive_temperature: float = field(default=0.02, metadata={"help": "InfoNCE temperature (0.02 beat 0.1 on "
                                                                         "kNN-F1 and Leiden ARI: docs/cell-identity.md)"})


def build_model(model_args: ModelArguments, tokenizer: ScGeneTokenizer, prior_path: str) -> ScGeneForMaskedExpression:
    prior = load_file(prior_path)["gene_prior"]
    sizes = vars(model_args) | {"hidden_size": model_args.hidden_size or prior.shape[1]}
    sizes["intermediate_size"] = model_args.intermediate_size or 2 * sizes["hidden_size"]
    config = ScGeneConfig(vocab_size=tokenizer.vocab_size, n_bins=tokenizer.n_bins, **sizes)
    if tuple(prior.shape) != (config.vocab_size, config.hidden_size):
        raise ValueError(
            f"The prior in {prior_path} is {tuple(prior.shape)}, the model needs ({config.vocab_size}, "
            f"{config.hidden_size}): build it with this dataset's tokenizer and --hidden-size {config.hidden_size}."
        )
    model = ScGeneForMaskedExpression(config)
    model.set_gene_prior(prior)
    return model


def known_regulation(data_args: PretrainingArguments, tokenizer: ScGeneTokenizer) -> KnownRegulation | None:
    """The training TFs' edges of --regulation_prior (the split `scgene evaluate-regulation` scores against)."""
    if data_args.regulation_prior is None:
        return None
    reference = checked_reference(None if data_args.regulation_prior == "collectri" else data_args.regulation_prior)
    training, held_out = split_regulators(reference["source"].astype(str), data_args.regulation_test_fraction,
                                          data_args.regulation_split_seed)
    known = KnownRegulation(reference[reference["source"].astype(str).isin(training)], tokenizer)
    print(f"regulation prior: {len(known)} edges of {len(training)} training TFs ({len(held_out)} held out)", flush=True)
    return known


def load_corpus(folders: list[str], count_views: bool) -> tuple[ScGeneTokenizer, datasets.Dataset]:
    """The token columns of every `scgene tokenize` folder, concatenated, and the first folder's tokenizer; the folders
    must share its vocabulary and bins (gene ids mean the same genes), else a clear error."""
    tokenizer = ScGeneTokenizer.from_pretrained(folders[0])
    columns = ["input_ids", "expression_values", "expression_bins"] + (["total_counts"] if count_views else [])
    parts = []
    for folder in folders:
        other = ScGeneTokenizer.from_pretrained(folder)
        if other.ensembl_ids != tokenizer.ensembl_ids or other.n_bins != tokenizer.n_bins:
            raise ValueError(f"{folder} was tokenized with another vocabulary or bin count than {folders[0]}: tokenize "
                             "every dataset with the same tokenizer (the default human vocabulary by default).")
        cells = datasets.load_from_disk(folder)
        if count_views and "total_counts" not in cells.column_names:
            raise ValueError(f"{folder} has no total_counts column (made before it existed): re-run `scgene "
                             "tokenize` on the raw counts, or set --contrastive_loss_weight 0.")
        parts.append(cells.select_columns(columns))
    return tokenizer, datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def save_training_genes(output_dir: str, cells: datasets.Dataset, vocab_size: int, folders: list[str]) -> None:
    """`training_genes.json` in the checkpoint: the vocabulary ids the corpus's cells carry (read column chunk by column
    chunk from the Arrow table), so that inference can say when a query's genes are mostly ones the model never saw."""
    seen = np.zeros(vocab_size, bool)
    for chunk in cells.data.column("input_ids").chunks:
        seen[np.unique(chunk.flatten().to_numpy())] = True
    seen[:NUM_SPECIAL_TOKENS] = False
    write_json(Path(output_dir) / TRAINING_GENES_FILE, {"cells": cells.num_rows, "datasets": [str(f) for f in folders],
                                                        "gene_ids": np.flatnonzero(seen).tolist()})


def random_split(cells: datasets.Dataset, eval_fraction: float, max_eval_cells: int, seed: int):
    """(train, eval) cells drawn with `seed`, `eval_fraction` of them (at most `max_eval_cells`) for evaluation, their
    indices kept in memory (8 bytes a cell): unlike `train_test_split`, which caches them in the dataset's folder,
    nothing is written next to the user's data."""
    order = np.random.default_rng(seed).permutation(cells.num_rows)
    n_eval = min(max_eval_cells, max(1, round(eval_fraction * cells.num_rows)))
    return cells.select(order[n_eval:], keep_in_memory=True), cells.select(order[:n_eval], keep_in_memory=True)


def held_out(cell: dict, eval_fraction: float) -> bool:
    """Whether a cell is an evaluation cell: decided by its content hash, so by every process and every run alike."""
    return cell_fingerprint(cell) % 1_000_000 < eval_fraction * 1_000_000


def streamed_splits(cells: datasets.Dataset, data_args: PretrainingArguments, seed: int, world_size: int):
    """(train, eval) `IterableDataset`s over the memory-mapped cells: shards that divide among the processes, the
    training stream shuffled (shard order and a buffer, reshuffled every epoch), the evaluation stream in order."""
    num_shards = min(cells.num_rows, world_size * math.ceil(data_args.stream_shards / world_size))
    stream = cells.to_iterable_dataset(num_shards=num_shards)
    fraction = data_args.eval_fraction
    train = stream.filter(lambda cell: not held_out(cell, fraction)).shuffle(seed=seed, buffer_size=data_args.shuffle_buffer)
    evaluation = stream.filter(lambda cell: held_out(cell, fraction)).take(data_args.max_eval_cells)
    return train, evaluation


def devices_used(training_args: TrainingArguments) -> str | None:
    """What trained besides the CPU, e.g. "2 x NVIDIA H100 80GB HBM3" (processes x device); None on the CPU."""
    device = training_args.device
    if device.type == "cpu":
        return None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return f"{training_args.world_size} x {name}"


def checkpoint_to_resume(training_args: TrainingArguments) -> str | None:
    """--resume_from_checkpoint DIR, or `last` for the newest checkpoint in --output_dir (None when there is none)."""
    resume = training_args.resume_from_checkpoint
    if resume == "last":
        resume = get_last_checkpoint(training_args.output_dir) if Path(training_args.output_dir).is_dir() else None
    elif resume is not None and not Path(resume, "trainer_state.json").is_file():
        raise SystemExit(f"--resume_from_checkpoint {resume} is not a Trainer checkpoint (no trainer_state.json).")
    return resume


def main() -> ScGeneTrainer:
    parser = HfArgumentParser((PretrainingArguments, ModelArguments, TrainingArguments))
    data_args, model_args, training_args = parser.parse_args_into_dataclasses()
    check_processes_train_together(training_args)
    training_args.remove_unused_columns = False  # the collator reads the ragged token columns itself
    if training_args.ddp_broadcast_buffers is None:  # the only buffer is the frozen prior, the same on every rank
        training_args.ddp_broadcast_buffers = False

    count_views = model_args.contrastive_loss_weight > 0  # two count-downsampled views of each cell
    tokenizer, cells = load_corpus(data_args.dataset, count_views)
    corpus = tokenized_corpus(data_args.dataset, data_args.data_licence)  # checks the licences before training
    if data_args.streaming:
        if training_args.max_steps <= 0:
            raise SystemExit("--streaming needs --max_steps: a stream has no length to count epochs in.")
        train_cells, eval_cells = streamed_splits(cells, data_args, training_args.seed, training_args.world_size)
        training_args.accelerator_config.dispatch_batches = False  # every process reads its own shards
    else:
        train_cells, eval_cells = random_split(cells, data_args.eval_fraction, data_args.max_eval_cells, training_args.seed)
    if (model_args.regulation_loss_weight > 0) != (data_args.regulation_prior is not None):
        raise SystemExit("--regulation_loss_weight > 0 and --regulation_prior go together: the loss needs the known "
                         "edges, and the edges are used only by the loss.")
    torch.manual_seed(training_args.seed)
    model = build_model(model_args, tokenizer, data_args.prior)
    collator = DataCollatorForMaskedExpression(
        tokenizer, mlm_probability=data_args.mlm_probability, mask_value=model.config.mask_value,
        count_views=count_views, min_count_rate=data_args.min_count_rate, matched_depth=data_args.matched_depth_views,
        min_panel_fraction=data_args.panel_views_min_fraction, seed=training_args.seed,
        known_regulation=known_regulation(data_args, tokenizer),
    )
    training_args.prediction_loss_only = True  # evaluation reports the loss; predictions are not kept
    # the loss before training, measured inside train() once the model is prepared: an evaluate() before train()
    # would leave the model marked as prepared and the ranks of a DDP run unsynchronised
    training_args.eval_on_start = True

    trainer = ScGeneTrainer(
        model=model,
        args=training_args,
        train_dataset=train_cells,
        eval_dataset=eval_cells,
        data_collator=collator,
        processing_class=tokenizer,
    )
    resume = checkpoint_to_resume(training_args)
    if resume and trainer.is_world_process_zero():
        step = json.loads(Path(resume, "trainer_state.json").read_text())["global_step"]
        print(f"resuming from {resume} at step {step}", flush=True)
    start = time.perf_counter()
    trainer.train(resume_from_checkpoint=resume)
    train_seconds = time.perf_counter() - start
    initial = next(log["eval_loss"] for log in trainer.state.log_history if "eval_loss" in log)
    final = trainer.evaluate()["eval_loss"]
    if data_args.prior_readout:  # every process fits the same weight (same cells, same weights): no broadcast needed
        model.config.prior_readout_weight = fit_prior_readout_weight_on_tokens(
            cells, model, max_length=tokenizer.max_length, seed=training_args.seed)
    trainer.save_model()  # safetensors + config + code + tokenizer
    Path(training_args.output_dir, "training_args.bin").unlink(missing_ok=True)  # no pickles in a checkpoint
    if trainer.is_world_process_zero():
        save_training_genes(training_args.output_dir, cells, tokenizer.vocab_size, data_args.dataset)
        write_json(Path(training_args.output_dir) / BUILD_RECORD, training_record(
            corpus=corpus, pretraining_flags=sys.argv[1:], steps=trainer.state.global_step, seed=training_args.seed,
            build_seconds=train_seconds, devices=devices_used(training_args)))
        print(f"pretraining eval loss: {initial:.4f} before training -> {final:.4f} after")
        if data_args.prior_readout:
            print(f"prior read-out weight fitted on the corpus: {model.config.prior_readout_weight:.3f}")
        print(f"saved to {training_args.output_dir}")
    return trainer


if __name__ == "__main__":
    main()
