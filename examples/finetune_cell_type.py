"""Cell-type classification on top of a pretrained ScGene, with the Hugging Face Trainer.

Seed 000's recipe: the backbone stays frozen and only the `Linear -> ReLU -> Dropout -> Linear` head trains
(`--full_finetune` trains everything, in two stages: first the head alone as in the frozen recipe, `--probe_epochs`
at `--probe_learning_rate`, then backbone and head together with the Trainer's arguments; a fresh random head would
otherwise send large gradients into the pretrained backbone, cf. "linear probing then fine-tuning", Kumar et al.
2022). A frozen backbone gives every cell the same embedding in every epoch, so the
script embeds each cell once and the Trainer trains the head on those cached embeddings: minutes on a CPU. Either way
the head reads embeddings standardised with the training cells' mean and standard deviation (stored in the head). The saved
checkpoint is the whole `ScGeneForCellClassification` (backbone + trained head), loadable with `AutoModel...`. Cells are split into train/test, stratified by label, and the script reports
accuracy and macro-F1 on the test cells next to a logistic-regression baseline on the same cells' expression
values, the baseline that foundation models are too rarely compared with.

    python examples/finetune_cell_type.py --model PRETRAINED --dataset DATA --label_column cell_type \
        --output_dir OUT --num_train_epochs 3 [--use_cpu] [--split_column split]

`--split_column` takes a predefined split instead (a column tokenized with the cells, values `train` / `test`; e.g.
one batch as test cells for cross-batch evaluation). `--validation_fraction 0.1` holds training cells out for the
Trainer's evaluations (`--eval_strategy steps --eval_steps 50 --load_best_model_at_end --metric_for_best_model
macro_f1`), and `--early_stopping_patience N` stops after N evaluations without improvement; the test cells are only
scored at the end. `--class_weighting balanced` weighs each type's loss by the inverse of its share of training
cells, for imbalanced labels. The head is initialised from `--seed`, so the same seed gives the same model and scores.
Each test cell's true and predicted label and the prediction's probability are written to OUT/test_predictions.csv.
The probabilities are calibrated: a temperature fitted on held-out cells (the validation cells, else the test cells)
is saved as `classifier_temperature` and applied by `scgene annotate`, so `--min-confidence 0.5` means "right at
least half the time" on cells like the training ones; the test cells' calibration error before and after is in
OUT/cell_type_results.json.

`--lora_rank 8` trains low-rank adapters (peft LoRA) on the attention projections instead of the whole backbone, in
the same two stages as `--full_finetune`; the adapters are merged into the saved model, a plain
`ScGeneForCellClassification` again (no peft needed to use it).

Multi-GPU: `accelerate launch examples/finetune_cell_type.py ...` (DDP through the Trainer, no code change).
"""

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from transformers import (
    AutoModelForSequenceClassification,
    EarlyStoppingCallback,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)

import scgene  # noqa: F401  (registers ScGene with the Auto classes)
from scgene import ScGeneTokenizer
from scgene.data import DataCollatorForCellClassification
from scgene.fileio import write_json
from scgene.inference import quiet_transformers_loading
from scgene.training import check_processes_train_together, expected_calibration_error, fit_temperature


@dataclass
class FinetuneArguments:
    model: str = field(metadata={"help": "pretrained ScGene checkpoint (e.g. from pretrain_masked_expression.py)"})
    dataset: str = field(metadata={"help": "folder written by `scgene tokenize` with the label obs column kept"})
    label_column: str = field(default="cell_type", metadata={"help": "obs column with the cell labels"})
    test_fraction: float = field(default=0.2, metadata={"help": "held-out cells, stratified by label"})
    min_cells_per_label: int = field(
        default=5, metadata={"help": "with the random split, labels with fewer cells are left out, with a message (a "
                                     "stratified split needs 2; `scgene evaluate` leaves out the same labels)"}
    )
    split_column: str | None = field(
        default=None, metadata={"help": "column with `train` / `test` per cell: a predefined split (default: random)"}
    )
    validation_fraction: float = field(
        default=0.0, metadata={"help": "training cells held out for the Trainer's evaluations (stratified)"}
    )
    early_stopping_patience: int | None = field(
        default=None, metadata={"help": "stop after this many evaluations without improvement (needs validation)"}
    )
    class_weighting: str = field(
        default="none", metadata={"help": "`balanced`: weigh each label's loss by 1 / its share of training cells",
                                  "choices": ["none", "balanced"]}
    )
    full_finetune: bool = field(default=False, metadata={"help": "train the backbone too (default: frozen)"})
    probe_epochs: float = field(
        default=30, metadata={"help": "--full_finetune: epochs of the first stage, the head alone on frozen embeddings"}
    )
    probe_learning_rate: float = field(default=1e-3, metadata={"help": "--full_finetune: learning rate of that stage"})
    classifier_dropout: float | None = field(default=None, metadata={"help": "dropout in the head (default: the config's)"})
    lora_rank: int = field(
        default=0, metadata={"help": "train LoRA adapters of this rank on the attention projections (after the "
                                     "head-only stage, as --full_finetune) and merge them into the saved model; 0: off"}
    )
    lora_alpha: float = field(default=16, metadata={"help": "LoRA scaling numerator (the update is alpha / rank x BA)"})


LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "q_b_proj", "kv_b_proj"]  # those the attention type has


def without_rare_labels(cells: datasets.Dataset, column: str, min_cells: int) -> datasets.Dataset:
    """The cells whose label has at least `min_cells` cells; the others are left out and named (a label with one cell
    cannot be both trained on and tested)."""
    feature = cells.features[column]
    labels = np.asarray(cells[column])
    if isinstance(feature, datasets.ClassLabel):
        labels = np.asarray(feature.names, dtype=object)[labels]
    labels = labels.astype(str)
    values, counts = np.unique(labels, return_counts=True)
    values, counts = values.tolist(), counts.tolist()  # plain str and int, for the messages
    rare = {value: count for value, count in zip(values, counts) if count < min_cells}
    if not rare:
        return cells
    kept = [value for value in values if value not in rare]
    if len(kept) < 2:
        raise SystemExit(f"--label_column {column}: fewer than 2 labels have {min_cells} or more cells "
                         f"({dict(zip(values, counts))}); lower --min_cells_per_label (at least 2) or label more cells.")
    print(f"Left out {sum(rare.values())} cells of labels with fewer than {min_cells} cells: {rare} "
          "(--min_cells_per_label 2 keeps labels with 2 or more cells).")
    cells = cells.select(np.flatnonzero(~np.isin(labels, list(rare))))
    if isinstance(feature, datasets.ClassLabel):  # re-number the kept labels, so the head has no output without cells
        new_id = {name: i for i, name in enumerate(kept)}
        features = cells.features.copy()
        features[column] = datasets.ClassLabel(names=kept)
        cells = cells.map(lambda batch: {column: [new_id[feature.names[i]] for i in batch[column]]}, batched=True,
                          features=features)
    return cells


def label_names(dataset: datasets.Dataset, column: str) -> list[str]:
    feature = dataset.features[column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names)
    return sorted(set(dataset[column]))


def as_sparse(dataset: datasets.Dataset, vocab_size: int) -> sp.csr_matrix:
    """Cells x vocabulary matrix of the tokenized expression values, for the baseline."""
    rows, cols, vals = [], [], []
    for row, (ids, values) in enumerate(zip(dataset["input_ids"], dataset["expression_values"])):
        rows.extend([row] * len(ids))
        cols.extend(ids)
        vals.extend(values)
    return sp.csr_matrix((vals, (rows, cols)), shape=(len(dataset), vocab_size))


class WeightedLossTrainer(Trainer):
    """A `Trainer` whose loss is cross-entropy with per-label weights (None: plain cross-entropy)."""

    def __init__(self, *args, class_weights: torch.Tensor | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.class_weights = class_weights

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        weights = self.class_weights.to(outputs["logits"].device) if self.class_weights is not None else None
        loss = torch.nn.functional.cross_entropy(outputs["logits"].float(), labels, weight=weights)
        return (loss, outputs) if return_outputs else loss


def balanced_class_weights(labels: list[int], n_labels: int) -> torch.Tensor:
    """n_cells / (n_labels x cells of the label) per label (sklearn's "balanced"); 0 for a label with no cells."""
    counts = np.bincount(np.asarray(labels), minlength=n_labels).astype(np.float64)
    weights = np.divide(len(labels), n_labels * counts, out=np.zeros(n_labels), where=counts > 0)
    return torch.tensor(weights, dtype=torch.float32)


def with_lora_adapters(model, rank: int, alpha: float):
    """`model` with LoRA adapters on its attention projections (peft); the adapters and the head train, the rest
    stays frozen."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as error:
        raise SystemExit("--lora_rank needs peft: pip install 'scgene[lora]' (or pip install peft).") from error
    adapted = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=LORA_TARGETS))
    for parameter in model.classifier.parameters():
        parameter.requires_grad_(True)
    return adapted


class CachedEmbeddingHead(torch.nn.Module):
    """The classification head of a frozen-backbone model, trained on precomputed cell embeddings."""

    def __init__(self, classifier: torch.nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, cell_embeddings):
        return {"logits": self.classifier(cell_embeddings)}


@torch.no_grad()
def cell_embeddings(backbone, cells: datasets.Dataset, collator, batch_size: int = 64) -> datasets.Dataset:
    """One pooled embedding per cell from the frozen backbone (eval mode), with its label."""
    backbone.eval()
    rows = [cells[i] for i in range(len(cells))]
    pooled = []
    for start in range(0, len(rows), batch_size):
        batch = collator(rows[start : start + batch_size])
        labels = batch.pop("labels")
        pooled.append((backbone(**batch).pooler_output, labels))
    embeddings = torch.cat([p for p, _ in pooled]).numpy()
    labels = torch.cat([label for _, label in pooled]).numpy()
    return datasets.Dataset.from_dict({"cell_embeddings": embeddings, "labels": labels}).with_format("torch")


def split_cells(cells: datasets.Dataset, args, seed: int) -> datasets.DatasetDict:
    """Train/test cells: the `split_column`'s own split, else a random one stratified by label."""
    if args.split_column is None:
        return cells.train_test_split(test_size=args.test_fraction, seed=seed, stratify_by_column=args.label_column)
    require_column(cells, args.split_column, "--split_column")
    split = np.asarray(cells[args.split_column], dtype=str)
    unknown = sorted(set(split) - {"train", "test"})
    if unknown or not {"train", "test"} <= set(split):
        raise SystemExit(f"--split_column {args.split_column} must hold `train` and `test` for every cell; found "
                         f"{sorted(set(split))[:10]}.")
    return datasets.DatasetDict({name: cells.select(np.flatnonzero(split == name)) for name in ("train", "test")})


def require_column(cells: datasets.Dataset, column: str, flag: str) -> None:
    if column not in cells.column_names:
        tokens = {"input_ids", "expression_values", "expression_bins", "total_counts"}
        kept = [name for name in cells.column_names if name not in tokens]
        raise SystemExit(f"{flag} {column}: the tokenized cells have no such column; they have {kept or 'none'}. "
                         "Keep obs columns when tokenizing: `scgene tokenize ... --obs-columns COLUMN`.")


def write_predictions(path: Path, labels: np.ndarray, logits: np.ndarray, names: list[str]) -> None:
    """One row per test cell: true label, predicted label, its probability (written whole, then renamed)."""
    probabilities = torch.softmax(torch.as_tensor(logits, dtype=torch.float64), dim=-1).numpy()
    table = pd.DataFrame({"label": [names[i] for i in labels], "predicted": [names[i] for i in logits.argmax(-1)],
                          "probability": probabilities.max(-1)})
    partial = path.with_name(path.name + ".partial")
    table.to_csv(partial, index_label="test_cell")
    partial.replace(path)


def scores(labels, predictions) -> dict:
    return {"accuracy": accuracy_score(labels, predictions), "macro_f1": f1_score(labels, predictions, average="macro")}


def main():
    parser = HfArgumentParser((FinetuneArguments, TrainingArguments))
    args, training_args = parser.parse_args_into_dataclasses()
    check_processes_train_together(training_args)
    datasets.disable_caching()  # splits and label encodings cached in a temporary folder, not in the user's dataset
    training_args.remove_unused_columns = False
    training_args.label_names = ["labels"]  # WeightedLossTrainer computes the loss from the logits and these
    if training_args.ddp_broadcast_buffers is None:  # the only buffer is the frozen prior, the same on every rank
        training_args.ddp_broadcast_buffers = False

    tokenizer = ScGeneTokenizer.from_pretrained(args.dataset)
    cells = datasets.load_from_disk(args.dataset)
    require_column(cells, args.label_column, "--label_column")
    if args.min_cells_per_label < 2:
        raise SystemExit("--min_cells_per_label must be at least 2 (one training and one test cell), got "
                         f"{args.min_cells_per_label}.")
    if args.split_column is None:
        cells = without_rare_labels(cells, args.label_column, args.min_cells_per_label)
    names = label_names(cells, args.label_column)
    if not isinstance(cells.features[args.label_column], datasets.ClassLabel):
        cells = cells.class_encode_column(args.label_column)
        cells = cells.cast_column(args.label_column, datasets.ClassLabel(names=names))
    splits = split_cells(cells, args, training_args.seed)
    if args.validation_fraction > 0:
        held_out = splits["train"].train_test_split(
            test_size=args.validation_fraction, seed=training_args.seed, stratify_by_column=args.label_column
        )
        splits["train"], splits["validation"] = held_out["train"], held_out["test"]
    elif args.early_stopping_patience:
        raise SystemExit("--early_stopping_patience needs validation cells: add --validation_fraction 0.1.")

    set_seed(training_args.seed)  # the new head's initial weights
    with quiet_transformers_loading():  # the pretraining heads are left out and the new head is new, as intended
        model, loading = AutoModelForSequenceClassification.from_pretrained(
            args.model,
            num_labels=len(names),
            id2label=dict(enumerate(names)),
            label2id={name: i for i, name in enumerate(names)},
            freeze_backbone=not args.full_finetune,
            output_loading_info=True,
            **({} if args.classifier_dropout is None else {"classifier_dropout": args.classifier_dropout}),
        )
    missing = [key for key in loading["missing_keys"] if not key.startswith("classifier.")]
    if missing:
        raise ValueError(f"{args.model} lacks encoder weights {missing[:5]}...: is it an ScGene pretraining checkpoint?")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    collator = DataCollatorForCellClassification(tokenizer, label_column=args.label_column)
    weights = balanced_class_weights(splits["train"][args.label_column], len(names)) if args.class_weighting == "balanced" else None
    callbacks = [EarlyStoppingCallback(args.early_stopping_patience)] if args.early_stopping_patience else []

    def trainer_for(trained, arguments, cells_by_split, data_collator=None, stop_early=True):
        """The Trainer of one stage: evaluations on the validation cells if any (else the test cells)."""
        return WeightedLossTrainer(
            model=trained, args=arguments, train_dataset=cells_by_split["train"],
            eval_dataset=cells_by_split.get("validation", cells_by_split["test"]), data_collator=data_collator,
            processing_class=tokenizer if data_collator else None, class_weights=weights,
            compute_metrics=lambda p: scores(p.label_ids, p.predictions.argmax(-1)), callbacks=callbacks if stop_early else [],
        )

    if model.config.classifier_pooling != "cell":
        trainer, parts = trainer_for(model, training_args, splits, collator), splits
    else:
        # a frozen backbone gives each cell the same embedding every epoch: embed once, train the head
        embedded = {name: cell_embeddings(model.scgene, part, collator) for name, part in splits.items()}
        # the head reads embeddings standardised with the training cells' statistics (saved with the model)
        model.classifier.set_feature_statistics(embedded["train"][:]["cell_embeddings"])
        trainer, parts = trainer_for(CachedEmbeddingHead(model.classifier), training_args, embedded), embedded
        if args.full_finetune or args.lora_rank:  # stage 1: the head alone; stage 2: everything (or adapters)
            probe_args = dataclasses.replace(
                training_args, num_train_epochs=args.probe_epochs, learning_rate=args.probe_learning_rate,
                max_steps=-1, eval_strategy="no", load_best_model_at_end=False,
                output_dir=str(Path(training_args.output_dir, "probe")),
            )
            trainer_for(CachedEmbeddingHead(model.classifier), probe_args, embedded, stop_early=False).train()
            tuned = with_lora_adapters(model, args.lora_rank, args.lora_alpha) if args.lora_rank else model
            trainable = sum(p.numel() for p in tuned.parameters() if p.requires_grad)
            trainer, parts = trainer_for(tuned, training_args, splits, collator), splits
    trainer.train()
    # calibration: the temperature that makes held-out confidences honest (validation cells, else the test cells)
    calibration_split = "validation" if "validation" in parts else "test"
    calibration = trainer.predict(parts[calibration_split])
    temperature = fit_temperature(calibration.predictions, calibration.label_ids)
    test_output = trainer.predict(parts["test"])
    scgene_scores = test_output.metrics
    if args.lora_rank:
        model = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()  # adapters folded into the weights
    model.config.classifier_temperature = temperature
    if trainer.is_world_process_zero():
        model.save_pretrained(training_args.output_dir)  # backbone + trained head: safetensors, config, code
        write_predictions(Path(training_args.output_dir, "test_predictions.csv"), test_output.label_ids,
                          test_output.predictions / temperature, names)
        tokenizer.save_pretrained(training_args.output_dir)
        baseline = LogisticRegression(max_iter=2000)
        baseline.fit(as_sparse(splits["train"], tokenizer.vocab_size), splits["train"][args.label_column])
        predictions = baseline.predict(as_sparse(splits["test"], tokenizer.vocab_size))
        baseline_scores = scores(splits["test"][args.label_column], predictions)
        results = {
            "test_cells": len(splits["test"]),
            "labels": names,
            "trainable_parameters": trainable,
            "scgene": {"accuracy": scgene_scores["test_accuracy"], "macro_f1": scgene_scores["test_macro_f1"]},
            "calibration": {
                "temperature": temperature, "fitted_on": f"{len(parts[calibration_split])} {calibration_split} cells",
                "test_ece_before": expected_calibration_error(test_output.predictions, test_output.label_ids),
                "test_ece_after": expected_calibration_error(test_output.predictions / temperature,
                                                             test_output.label_ids),
            },
            "logistic_regression_baseline": baseline_scores,
        }
        write_json(Path(training_args.output_dir, "cell_type_results.json"), results)  # atomically
        print(f"{'model':<32} {'accuracy':>9} {'macro-F1':>9}   ({len(splits['test'])} test cells, {len(names)} types)")
        recipe = "LoRA" if args.lora_rank else "fine-tuned" if args.full_finetune else "frozen backbone"
        for name, result in ((f"ScGene ({recipe})", results["scgene"]), ("logistic regression baseline", baseline_scores)):
            print(f"{name:<32} {result['accuracy']:>9.3f} {result['macro_f1']:>9.3f}")


if __name__ == "__main__":
    main()
