"""The Trainer example scripts run end to end on real data: single process, and two-process DDP via torchrun."""

import ast
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, save_file

import scgene
from distributed_helpers import launcher
from scgene import ScGeneForCellClassification, ScGeneForMaskedExpression, ScGeneModel, ScGeneTokenizer
from scgene.cli import main

REPO = Path(__file__).resolve().parents[1]
PBMC = REPO / "tests" / "data" / "pbmc3k_seurat_2638cells_2000hvg_counts.h5ad"
TINY_MODEL = ["--hidden_size", "16", "--num_hidden_layers", "1", "--num_attention_heads", "2", "--intermediate_size", "32"]
COMMON = ["--use_cpu", "--report_to", "none", "--save_strategy", "no", "--seed", "0", "--disable_tqdm", "true"]


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    """300 PBMC 3k cells tokenized by `scgene tokenize --max-length 256` with the default human vocabulary (whose
    tokenizer says max_length 2048), and a random prior for it."""
    folder = tmp_path_factory.mktemp("examples")
    anndata.read_h5ad(PBMC)[:300].copy().write_h5ad(folder / "cells.h5ad")
    assert main(["tokenize", str(folder / "cells.h5ad"), str(folder / "tokenized"), "--max-length", "256",
                 "--obs-columns", "cell_type"]) == 0
    vocab_size = ScGeneTokenizer.from_pretrained(folder / "tokenized").vocab_size
    prior = torch.from_numpy(np.random.default_rng(0).normal(size=(vocab_size, 16)).astype(np.float32))
    prior[:3] = 0
    save_file({"gene_prior": prior}, folder / "gene_prior.safetensors")
    return folder


def run(command: list, env: dict | None = None) -> str:
    result = subprocess.run(
        [str(part) for part in command], capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})}
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


def test_pretrain_then_finetune_scripts(tokenized):
    pretrained = tokenized / "pretrained"
    output = run([sys.executable, REPO / "examples" / "pretrain_masked_expression.py",
                  "--dataset", tokenized / "tokenized", "--prior", tokenized / "gene_prior.safetensors",
                  "--output_dir", pretrained, "--max_steps", "4", "--per_device_train_batch_size", "8",
                  "--pooling", "mean", "--contrastive_loss_weight", "0.5", "--logging_steps", "2",
                  "--data_licence", "CC-BY-4.0 (10x Genomics)", "--prior_readout", *TINY_MODEL, *COMMON])
    assert "pretraining eval loss" in output
    # --prior_readout fitted the weight on the tokenized corpus: the weight the AnnData path fits on the same cells
    weight = json.loads((pretrained / "config.json").read_text())["prior_readout_weight"]
    on_cells = scgene.fit_prior_readout_weight(anndata.read_h5ad(tokenized / "cells.h5ad"), str(pretrained),
                                               progress=False)
    assert weight > 0 and abs(weight - on_cells) < 1e-4 * weight, (weight, on_cells)
    logged = [ast.literal_eval(line) for line in output.splitlines() if line.startswith("{'loss'")]  # the Trainer's printed logs
    assert len(logged) == 2 and all({"value_loss", "bin_loss", "contrastive_loss"} <= set(log) for log in logged)
    assert {"model.safetensors", "config.json", "modeling_scgene.py", "preprocessor_config.json",
            "training_genes.json"} <= {p.name for p in pretrained.iterdir()}
    trained_on = json.loads((pretrained / "training_genes.json").read_text())["gene_ids"]
    assert len(trained_on) > 100 and min(trained_on) >= 3  # genes only, no special tokens
    assert not list((tokenized / "tokenized").glob("cache-*"))  # nothing written into the dataset folder
    assert not (pretrained / "training_args.bin").exists()
    check_the_training_record_reaches_the_card(tokenized, pretrained)

    classifier = tokenized / "classifier"
    output = run([sys.executable, REPO / "examples" / "finetune_cell_type.py", "--model", pretrained,
                  "--dataset", tokenized / "tokenized", "--label_column", "cell_type", "--output_dir", classifier,
                  "--num_train_epochs", "2", "--per_device_train_batch_size", "32", *COMMON])
    results = json.loads((classifier / "cell_type_results.json").read_text())
    # the 3 platelets of these 300 cells are too few to train and test on (--min_cells_per_label 5): left out, named
    assert "Left out 3 cells of labels with fewer than 5 cells: {'Platelet': 3}" in output
    assert results["test_cells"] == 60 and len(results["labels"]) == 8 and "Platelet" not in results["labels"]
    for model in ("scgene", "logistic_regression_baseline"):
        assert 0.0 <= results[model]["accuracy"] <= 1.0
    calibration = results["calibration"]
    assert calibration["fitted_on"] == "60 test cells"  # no validation cells: the test cells
    assert json.loads((classifier / "config.json").read_text())["classifier_temperature"] == calibration["temperature"]
    assert 0 <= calibration["test_ece_after"] <= 1 and 0 <= calibration["test_ece_before"] <= 1
    assert "logistic regression baseline" in output
    assert not list((tokenized / "tokenized").glob("cache-*"))
    config = json.loads((classifier / "config.json").read_text())
    assert config["architectures"] == ["ScGeneForCellClassification"] and len(config["id2label"]) == len(results["labels"])
    check_inference_uses_training_settings(tokenized / "cells.h5ad", pretrained, classifier)
    check_full_finetune_trains_head_then_backbone(tokenized, pretrained)
    check_lora_adapters_merge_into_a_plain_checkpoint(tokenized, pretrained)


def check_the_training_record_reaches_the_card(tokenized, pretrained):
    """The pretraining script's build_record.json: the corpus with the licence given, the command line, steps, seed,
    wall time, machine, version, commit; `scgene push`'s card renders each of them."""
    from scgene.hub import model_card

    record = json.loads((pretrained / "build_record.json").read_text())
    assert record["corpus"] == [{"file": str(tokenized / "tokenized"), "cells": 300,
                                 "licence": "CC-BY-4.0 (10x Genomics)"}]
    assert record["pretraining_flags"][:4] == ["--dataset", str(tokenized / "tokenized"), "--prior",
                                               str(tokenized / "gene_prior.safetensors")]
    assert record["steps"] == 4 and record["seed"] == 0 and record["build_seconds"] > 0
    assert record["scgene_version"] == scgene.__version__ and "CPU cores" in record["machine"]
    card = str(model_card(pretrained))
    training = card[card.index("## Training data"):card.index("## Intended use")]
    assert f"| {tokenized / 'tokenized'} | 300 | CC-BY-4.0 (10x Genomics) |" in training
    assert f"- recipe (pretraining flags): `{' '.join(record['pretraining_flags'])}`" in training
    assert "- steps: 4; seed: 0" in training and f"machine: {record['machine']}" in training
    assert f"- wall time of the build: {record['build_seconds']:.0f} s" in training
    assert f"git commit: {record['git_commit'] or 'not recorded'}" in training
    assert "- Pretrained on 300 cells (see Training data)" in card


def test_finetuning_is_seeded_takes_a_predefined_split_and_names_missing_columns(tokenized, tmp_path):
    """The same seed twice gives the same weights, scores and predictions; `--split_column` takes its own test cells
    (here the first 50); a missing label column is named with the columns that exist."""
    from scgene.data import export_dataset

    cells = anndata.read_h5ad(tokenized / "cells.h5ad")[:200].copy()
    cells.obs["split"] = np.where(np.arange(cells.n_obs) < 50, "test", "train")
    export_dataset(cells, tmp_path / "tokenized", ScGeneTokenizer.from_pretrained(tokenized / "tokenized"),
                   obs_columns=["cell_type", "split"], max_length=256)
    pretrained = tmp_path / "pretrained"
    run([sys.executable, REPO / "examples" / "pretrain_masked_expression.py", "--dataset", tmp_path / "tokenized",
         "--prior", tokenized / "gene_prior.safetensors", "--output_dir", pretrained, "--max_steps", "2",
         "--per_device_train_batch_size", "8", "--pooling", "mean", *TINY_MODEL, *COMMON])
    finetune = [sys.executable, REPO / "examples" / "finetune_cell_type.py", "--model", pretrained, "--dataset",
                tmp_path / "tokenized", "--label_column", "cell_type", "--split_column", "split",
                "--full_finetune", "--probe_epochs", "2", "--num_train_epochs", "1", "--per_device_train_batch_size",
                "16", *COMMON]
    for name in ("first", "second"):
        run(finetune + ["--output_dir", tmp_path / name])
    first, second = (load_file(tmp_path / name / "model.safetensors") for name in ("first", "second"))
    assert all(torch.equal(first[key], second[key]) for key in first)
    for artifact in ("cell_type_results.json", "test_predictions.csv"):
        assert (tmp_path / "first" / artifact).read_text() == (tmp_path / "second" / artifact).read_text()
    predictions = pd.read_csv(tmp_path / "first" / "test_predictions.csv")
    assert len(predictions) == 50 and list(predictions["label"]) == list(cells.obs["cell_type"][:50].astype(str))
    assert predictions["probability"].between(0, 1).all()

    # frozen backbone, balanced class weights, 20% of the training cells for validation; with a learning rate of 0
    # the validation macro-F1 never improves, so patience 1 stops at the second evaluation (step 4 of 40)
    output = run(finetune[:-len(COMMON)] + [
        "--output_dir", tmp_path / "early", "--full_finetune", "false", "--class_weighting", "balanced",
        "--validation_fraction", "0.2", "--early_stopping_patience", "1", "--learning_rate", "0", "--max_steps", "40",
        "--eval_strategy", "steps", "--eval_steps", "2", "--save_strategy", "steps", "--save_steps", "2",
        "--load_best_model_at_end", "--metric_for_best_model", "macro_f1", "--use_cpu", "--report_to", "none", "--seed", "0",
        "--disable_tqdm", "true"])
    evaluations = [ast.literal_eval(line) for line in output.splitlines() if line.startswith("{'eval_loss'")]
    assert len(evaluations) == 2 and float(evaluations[-1]["epoch"]) < 1
    assert json.loads((tmp_path / "early" / "cell_type_results.json").read_text())["test_cells"] == 50

    result = subprocess.run([str(part) for part in finetune[:-len(COMMON)]] + ["--label_column", "celltype",
                            "--output_dir", str(tmp_path / "bad"), *COMMON], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "--label_column celltype" in result.stderr and "'cell_type'" in result.stderr and "Traceback" not in result.stderr


def check_full_finetune_trains_head_then_backbone(tokenized, pretrained):
    """--full_finetune: stage 1 trains the head on frozen embeddings, stage 2 everything; the saved model's backbone
    differs from the pretrained one and its config no longer freezes the backbone."""
    finetuned = tokenized / "full_finetune"
    output = run([sys.executable, REPO / "examples" / "finetune_cell_type.py", "--model", pretrained,
                  "--dataset", tokenized / "tokenized", "--label_column", "cell_type", "--output_dir", finetuned,
                  "--full_finetune", "--probe_epochs", "2", "--num_train_epochs", "1", "--learning_rate", "1e-3",
                  "--per_device_train_batch_size", "32", *COMMON])
    assert "ScGene (fine-tuned)" in output
    assert json.loads((finetuned / "config.json").read_text())["freeze_backbone"] is False
    before = ScGeneModel.from_pretrained(pretrained).state_dict()
    after = ScGeneForCellClassification.from_pretrained(finetuned).scgene.state_dict()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert len(changed) > len(before) // 2, changed


def check_lora_adapters_merge_into_a_plain_checkpoint(tokenized, pretrained):
    """--lora_rank: adapters on the attention projections train with the head, then merge into the saved weights:
    a plain checkpoint whose attention projections changed and whose other backbone weights did not."""
    finetuned = tokenized / "lora"
    output = run([sys.executable, REPO / "examples" / "finetune_cell_type.py", "--model", pretrained,
                  "--dataset", tokenized / "tokenized", "--label_column", "cell_type", "--output_dir", finetuned,
                  "--lora_rank", "4", "--probe_epochs", "2", "--num_train_epochs", "1", "--learning_rate", "1e-2",
                  "--per_device_train_batch_size", "32", *COMMON])
    assert "ScGene (LoRA)" in output
    saved = load_file(finetuned / "model.safetensors")
    assert not [name for name in saved if "lora" in name or "base_layer" in name]
    before = ScGeneModel.from_pretrained(pretrained).state_dict()
    after = ScGeneForCellClassification.from_pretrained(finetuned).scgene.state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    attention = {name for name in before if re.search(r"\.(q|k|v|o)_proj\.weight$", name)}
    assert changed == attention, sorted(changed ^ attention)
    trainable = json.loads((finetuned / "cell_type_results.json").read_text())["trainable_parameters"]
    head = sum(p.numel() for p in ScGeneForCellClassification.from_pretrained(finetuned).classifier.parameters())
    assert head < trainable < head + sum(before[name].numel() for name in attention)


def check_inference_uses_training_settings(cells_path, pretrained, classifier):
    """The data was tokenized with --max-length 256: both checkpoints carry that setting, and `scgene.embed` /
    `scgene.annotate` tokenize with it (the same outputs as the model on 256-token cells, not on 2048-token ones)."""
    cells = anndata.read_h5ad(cells_path)
    long_cells = cells[np.diff(cells.X.tocsr().indptr) > 300].copy()
    assert long_cells.n_obs >= 5
    for folder in (pretrained, classifier):
        tokenizer = ScGeneTokenizer.from_pretrained(folder)
        assert tokenizer.max_length == 256 and tokenizer.sampling_seed is None
    tokenizer = ScGeneTokenizer.from_pretrained(pretrained)
    encoder = ScGeneModel.from_pretrained(pretrained).eval()
    with torch.no_grad():
        at = {n: encoder(**tokenizer(long_cells, max_length=n, return_tensors="pt")).pooler_output.numpy() for n in (256, 2048)}
    embedded = scgene.embed(long_cells, pretrained, progress=False)
    np.testing.assert_allclose(embedded, at[256], atol=1e-5)
    assert np.abs(embedded - at[2048]).max() > 1e-3
    model = ScGeneForCellClassification.from_pretrained(classifier).eval()
    with torch.no_grad():
        logits = model(**tokenizer(long_cells, max_length=256, return_tensors="pt")).logits
    annotated = scgene.annotate(long_cells, classifier, progress=False)
    expected = np.array([model.config.id2label[i] for i in logits.argmax(-1).tolist()])
    assert (annotated["scgene_label"].astype(str).to_numpy() == expected).all()
    # confidences are calibrated by the temperature the fine-tuning fitted (not 1: raw logits are over-confident)
    temperature = model.config.classifier_temperature
    assert temperature != 1.0
    calibrated = torch.softmax(logits / temperature, dim=-1).max(-1).values.numpy()
    np.testing.assert_allclose(annotated["scgene_label_confidence"].to_numpy(), calibrated, rtol=1e-5)


@pytest.mark.parametrize("launcher_name", ["accelerate", "torchrun"])
def test_two_process_ddp_trains_like_one_process_on_the_same_global_batch(tokenized, tmp_path, launcher_name):
    """torchrun / accelerate launch with 2 CPU processes (gloo), 4 cells each: both ranks end with the same weights
    (DDP really synchronises them), and those are the weights of 1 process trained on the same 8-cell global batches
    (masks are drawn per cell, losses are means over cells). No dropout: its draws differ between the layouts."""
    arguments = ["--dataset", tokenized / "tokenized", "--prior", tokenized / "gene_prior.safetensors",
                 "--max_steps", "3", "--learning_rate", "1e-3", "--hidden_dropout_prob", "0",
                 "--attention_probs_dropout_prob", "0", *TINY_MODEL, *COMMON]
    helper = REPO / "tests" / "rank_weights.py"
    (tmp_path / "ddp").mkdir()
    (tmp_path / "single").mkdir()
    output = run([sys.executable, *launcher(launcher_name), helper, "--output_dir", tmp_path / "ddp",
                  "--per_device_train_batch_size", "4", "--ddp_backend", "gloo", *arguments],
                 env={"OMP_NUM_THREADS": "1", "RANK_WEIGHTS_DIR": str(tmp_path / "ddp")})
    assert output.count("pretraining eval loss") == 1  # printed by the main process only
    run([sys.executable, helper, "--output_dir", tmp_path / "single", "--per_device_train_batch_size", "8", *arguments],
        env={"OMP_NUM_THREADS": "1", "RANK_WEIGHTS_DIR": str(tmp_path / "single")})
    before, after = map(float, re.search(r"eval loss: ([\d.]+) before training -> ([\d.]+)", output).groups())
    assert after < before  # the weights compared below were trained
    rank0, rank1 = (load_file(tmp_path / "ddp" / f"rank{rank}.safetensors") for rank in (0, 1))
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)
    saved = ScGeneForMaskedExpression.from_pretrained(tmp_path / "ddp").state_dict()
    assert all(torch.equal(rank0[name], saved[name]) for name in saved)
    single = load_file(tmp_path / "single" / "rank0.safetensors")
    difference = max((rank0[name] - single[name]).abs().max().item() for name in rank0)
    print(f"DDP vs 1 process: max abs weight difference {difference:.2e}")
    assert difference < 1e-5


def test_finetuning_under_torchrun_trains_like_one_process(tokenized, tmp_path):
    """The fine-tuning script with 2 CPU processes (12 cells each) saves the head that 1 process trains on the same
    24-cell batches (240 training cells: no uneven last batch), and reports once. No head dropout: its draws differ."""
    run([sys.executable, REPO / "examples" / "pretrain_masked_expression.py", "--dataset", tokenized / "tokenized",
         "--prior", tokenized / "gene_prior.safetensors", "--output_dir", tmp_path / "pretrained", "--max_steps", "2",
         *TINY_MODEL, *COMMON])
    finetune = [REPO / "examples" / "finetune_cell_type.py", "--model", tmp_path / "pretrained", "--dataset",
                tokenized / "tokenized", "--label_column", "cell_type", "--num_train_epochs", "2",
                "--classifier_dropout", "0", "--min_cells_per_label", "2", *COMMON]  # all 300 cells: 240 to train
    output = run([sys.executable, *launcher("torchrun"), *finetune, "--output_dir", tmp_path / "ddp",
                  "--per_device_train_batch_size", "12", "--ddp_backend", "gloo"], env={"OMP_NUM_THREADS": "1"})
    assert output.count("logistic regression baseline") == 1
    run([sys.executable, *finetune, "--output_dir", tmp_path / "single", "--per_device_train_batch_size", "24"],
        env={"OMP_NUM_THREADS": "1"})
    ddp, single = (load_file(tmp_path / folder / "model.safetensors") for folder in ("ddp", "single"))
    difference = max((ddp[name] - single[name]).abs().max().item() for name in single)
    print(f"fine-tuning, DDP vs 1 process: max abs weight difference {difference:.2e}")
    assert difference < 1e-6
    results = [json.loads((tmp_path / folder / "cell_type_results.json").read_text()) for folder in ("ddp", "single")]
    assert results[0]["scgene"] == pytest.approx(results[1]["scgene"])


CONFIGS = REPO / "examples" / "configs"


def test_accelerate_configs_parse_and_name_scgene_layers():
    """The DDP, FSDP and DeepSpeed configs load as accelerate configs; FSDP wraps the layers ScGene has."""
    from accelerate.commands.config.config_args import ClusterConfig

    kinds = {name: ClusterConfig.from_yaml_file(CONFIGS / f"{name}.yaml") for name in ("ddp", "fsdp", "deepspeed_zero2")}
    assert [config.distributed_type.value for config in kinds.values()] == ["MULTI_GPU", "FSDP", "DEEPSPEED"]
    assert all(config.mixed_precision == "bf16" for config in kinds.values())
    wrapped = kinds["fsdp"].fsdp_config["fsdp_transformer_layer_cls_to_wrap"].split(",")
    assert wrapped == ScGeneForMaskedExpression._no_split_modules
    assert kinds["fsdp"].fsdp_config["fsdp_version"] == 2 and kinds["deepspeed_zero2"].deepspeed_config["zero_stage"] == 2


def test_processes_that_would_train_apart_are_stopped(tokenized, tmp_path):
    """The FSDP config on a machine without GPUs and without --use_cpu: accelerate starts 2 processes that do not
    synchronise (it shards only on GPU backends); the script stops with what to do instead of training 2 copies."""
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", CONFIGS / "fsdp.yaml",
         "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "29535",
         REPO / "examples" / "pretrain_masked_expression.py", "--dataset", tokenized / "tokenized",
         "--prior", tokenized / "gene_prior.safetensors", "--output_dir", tmp_path, "--max_steps", "1", *TINY_MODEL,
         "--report_to", "none"], capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode != 0 and "unsynchronised copies" in result.stderr and "--use_cpu" in result.stderr
    assert not (tmp_path / "model.safetensors").exists()


def test_streamed_pretraining_gives_each_process_its_own_shards(tokenized, tmp_path):
    """--streaming under torchrun with 2 CPU processes: the ranks end with the same weights and read their own cells:
    of the corpus's 8 contiguous shards, 4 per process (which 4 is shuffled with the seed), never an evaluation cell
    in training."""
    sys.path.insert(0, str(REPO / "examples"))
    from pretrain_masked_expression import held_out

    output = run([sys.executable, *launcher("torchrun"), REPO / "tests" / "rank_weights.py",
                  "--dataset", tokenized / "tokenized", "--prior", tokenized / "gene_prior.safetensors",
                  "--output_dir", tmp_path, "--streaming", "--stream_shards", "8", "--shuffle_buffer", "64",
                  "--max_steps", "6", "--per_device_train_batch_size", "4", "--ddp_backend", "gloo",
                  "--eval_strategy", "no", *TINY_MODEL, *COMMON],
                 env={"OMP_NUM_THREADS": "1", "RANK_WEIGHTS_DIR": str(tmp_path)})
    assert "pretraining eval loss" in output
    rank0, rank1 = (load_file(tmp_path / f"rank{rank}.safetensors") for rank in (0, 1))
    assert all(torch.equal(rank0[name], rank1[name]) for name in rank0)

    import datasets

    corpus = datasets.load_from_disk(str(tokenized / "tokenized"))
    row_of = {scgene.data.collators.cell_fingerprint(cell): row for row, cell in enumerate(corpus)}
    evaluation = {fingerprint for fingerprint, row in row_of.items() if held_out(corpus[row], 0.1)}
    shard_starts = np.cumsum([0] + scgene.data.export.shard_sizes(corpus.num_rows, 8))[1:-1]  # as Dataset.shard cuts
    shards_read = []
    for rank in (0, 1):
        read = json.loads((tmp_path / f"rank{rank}_cells.json").read_text())
        training = [fingerprint for fingerprint in read if fingerprint not in evaluation]
        # 6 steps of 4 cells, and one batch that accelerate's loader reads ahead; none twice within a pass
        assert len(training) == 7 * 4 and len(set(training)) == 28
        shards_read.append({int(np.searchsorted(shard_starts, row_of[f], side="right")) for f in training})
    assert len(shards_read[0] | shards_read[1]) > 4 and not shards_read[0] & shards_read[1]
    assert all(len(shards) <= 4 for shards in shards_read)


@pytest.mark.parametrize(("loading", "steps", "checkpoint_step"), [("map-style", 30, 5), ("streaming", 45, 40)])
def test_a_run_killed_after_a_checkpoint_resumes_to_the_uninterrupted_weights(tokenized, tmp_path, loading, steps,
                                                                             checkpoint_step):
    """kill -9 once a checkpoint is written, then --resume_from_checkpoint: the run ends with the weights of one that
    was never interrupted (dropout on, count views on: every random draw that shapes training is restored). Streamed,
    the checkpoint is in the second pass over the 270 training cells (34 steps a pass): the resumed run continues that
    pass, with that pass's masks. No --hidden_size: the model takes the prior's width."""
    arguments = [sys.executable, REPO / "examples" / "pretrain_masked_expression.py", "--dataset", tokenized / "tokenized",
                 "--prior", tokenized / "gene_prior.safetensors", "--max_steps", steps, "--save_strategy", "steps",
                 "--save_steps", checkpoint_step, "--per_device_train_batch_size", "8", "--learning_rate", "1e-3",
                 "--contrastive_loss_weight", "0.5", "--num_hidden_layers", "1", "--num_attention_heads", "2",
                 "--use_cpu", "--report_to", "none", "--seed", "0", "--disable_tqdm", "true"]  # width: the prior's
    if loading == "streaming":
        arguments += ["--streaming", "--stream_shards", "4", "--shuffle_buffer", "32"]
    run(arguments + ["--output_dir", tmp_path / "uninterrupted"], env={"OMP_NUM_THREADS": "1"})

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen([str(part) for part in arguments + ["--output_dir", interrupted]],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    checkpoint = interrupted / f"checkpoint-{checkpoint_step}"
    while not (checkpoint / "trainer_state.json").exists() and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL  # killed mid-run, not finished
    assert not (interrupted / "model.safetensors").exists()

    output = run(arguments + ["--output_dir", interrupted, "--resume_from_checkpoint", checkpoint], env={"OMP_NUM_THREADS": "1"})
    assert f"resuming from {checkpoint} at step {checkpoint_step}" in output
    expected, resumed = (load_file(folder / "model.safetensors") for folder in (tmp_path / "uninterrupted", interrupted))
    difference = max((expected[name] - resumed[name]).abs().max().item() for name in expected)
    print(f"resumed vs uninterrupted: max abs weight difference {difference:.2e}")
    assert difference <= 1e-6
    config = json.loads((interrupted / "config.json").read_text())
    assert (config["hidden_size"], config["intermediate_size"]) == (16, 32)  # the prior's width, 2x in the MLP


def test_pretraining_corpus_must_share_one_vocabulary(tokenized, tmp_path):
    """Several datasets pretrain together only when their gene ids mean the same genes."""
    from scgene.data import export_dataset

    cells = anndata.read_h5ad(tokenized / "cells.h5ad")[:40].copy()
    export_dataset(cells, tmp_path / "own_vocabulary", ScGeneTokenizer.from_anndata(cells))
    result = subprocess.run(
        [sys.executable, REPO / "examples" / "pretrain_masked_expression.py", "--dataset", tokenized / "tokenized",
         tmp_path / "own_vocabulary", "--prior", tokenized / "gene_prior.safetensors", "--output_dir", tmp_path / "out",
         "--max_steps", "1", *TINY_MODEL, *COMMON], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "another vocabulary" in result.stderr


def test_pretraining_with_the_regulation_prior_logs_the_loss_and_refuses_half_a_setting(tokenized, tmp_path):
    """`--regulation_prior collectri --regulation_loss_weight`: the training TFs' edges reach the loss (logged apart);
    either flag alone is refused."""
    arguments = [sys.executable, REPO / "examples" / "pretrain_masked_expression.py", "--dataset",
                 tokenized / "tokenized", "--prior", tokenized / "gene_prior.safetensors", "--max_steps", "2",
                 "--per_device_train_batch_size", "8", "--pooling", "mean", "--encoder_type", "dual_branch",
                 "--logging_steps", "1", *TINY_MODEL, *COMMON]
    output = run(arguments + ["--output_dir", tmp_path / "constrained", "--regulation_prior", "collectri",
                              "--regulation_loss_weight", "0.5"])
    assert "regulation prior:" in output and "training TFs (593 held out)" in output
    assert "'regulation_loss'" in output
    assert json.loads((tmp_path / "constrained" / "config.json").read_text())["regulation_loss_weight"] == 0.5
    half = subprocess.run([str(part) for part in arguments + ["--output_dir", tmp_path / "half",
                                                               "--regulation_loss_weight", "0.5"]],
                          capture_output=True, text=True, timeout=600)
    assert half.returncode != 0 and "--regulation_prior" in half.stderr
