"""Convert seed 000's original ScGene checkpoints to Hugging Face checkpoints, and prove they give the same numbers.

Steps: read the checkpoint safely (`torch.load(weights_only=True)`), infer the kind of model and its sizes from the
keys, rename every key by `KEY_TABLE` / `HEAD_TABLES`, load strictly with shape checks, save (safetensors, config,
tokenizer for the panel) into a temporary directory, reload it, compare it with the reference original
(`scgene.conversion.original`) on fixed inputs, write a model card draft, then rename the directory into place.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scgene.conversion.model_card import model_card
from scgene.conversion.original import ConversionError, ScBaseModel, ScBaseModelClassification, ScBaseModelCluster
from scgene.conversion.parity import PARITY_CELLS, PARITY_TOLERANCE, format_parity_report, measure_parity
from scgene.fileio import atomic_directory

NUM_SPECIAL_TOKENS = 3  # ids 0, 1, 2 are <pad>, <cls>, <mask>; panel genes follow in gene-list order
NESTING_KEYS = ("state_dict", "model_state_dict", "model", "module", "net")
CONFIG_KEYS = ("config", "args", "hparams", "hyper_parameters", "model_config")
NUM_HEADS_NAMES = ("num_heads", "nhead", "n_heads", "num_attention_heads", "heads")
GENE_EMBEDDING_KEYS = ("gene_embedding", "gene_prior", "embedding", "weight")

# Original key (regex)  ->  HF key, without the `scgene.` prefix the heads put before the backbone.
# `{proj}` marks `nn.MultiheadAttention.in_proj_*`, split in three along dim 0 into q_proj, k_proj, v_proj.
LAYER = r"transformer_encoder\.layers\.(\d+)\."
KEY_TABLE = [
    (r"linear_in\.(weight|bias)", r"embeddings.expression.value_projection.\1"),
    (LAYER + r"self_attn\.in_proj_(weight|bias)", r"encoder.layers.\1.attention.{proj}.\2"),
    (LAYER + r"self_attn\.out_proj\.(weight|bias)", r"encoder.layers.\1.attention.o_proj.\2"),
    (LAYER + r"norm1\.(weight|bias)", r"encoder.layers.\1.attention_norm.\2"),
    (LAYER + r"linear1\.(weight|bias)", r"encoder.layers.\1.feed_forward.up_proj.\2"),
    (LAYER + r"linear2\.(weight|bias)", r"encoder.layers.\1.feed_forward.down_proj.\2"),
    (LAYER + r"norm2\.(weight|bias)", r"encoder.layers.\1.feed_forward_norm.\2"),
]
# Head keys: full HF names (outside the backbone).
HEAD_TABLES = {
    "pretraining": [(r"linear_out\.(weight|bias)", r"value_head.\1")],
    "classifier": [
        (r"linear_out\.(weight|bias)", r"gene_projection.\1"),
        (r"cls_decoder\.0\.(weight|bias)", r"classifier.dense.\1"),
        (r"cls_decoder\.3\.(weight|bias)", r"classifier.out_proj.\1"),
    ],
    "cluster": [],
}
QKV = ("q_proj", "k_proj", "v_proj")
BACKBONE_PREFIX = {"pretraining": "scgene.", "classifier": "scgene.", "cluster": ""}
ORIGINAL_NAMES = {
    "pretraining": "scBaseModel",
    "classifier": "scBaseModel_classification",
    "cluster": "scBaseModel_cluster",
}
HF_CLASS_NAMES = {
    "pretraining": "ScGeneForMaskedExpression",
    "classifier": "ScGeneForCellClassification",
    "cluster": "ScGeneModel",
}


@dataclass
class OriginalSizes:
    """What the original checkpoint's keys say about the model."""

    kind: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_panel_genes: int | None = None  # known from the keys for the classifier only
    classifier_hidden_size: int | None = None
    num_labels: int | None = None


@dataclass
class ConversionResult:
    """What `convert` wrote and measured."""

    out_dir: Path
    kind: str
    config: dict
    parity: dict[str, float]
    parity_cells: int
    num_genes: int
    tolerance: float = PARITY_TOLERANCE

    def parity_report(self) -> str:
        """The report the command prints: what parity was measured on, then one line per output."""
        return format_parity_report(self.parity, self.tolerance, self.parity_cells, self.num_genes)


# ---------------------------------------------------------------------------------------------------------------------
# Reading inputs


def load_safely(path: str | Path):
    """`torch.load(weights_only=True)` on CPU, with a clear error when the file is missing or refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConversionError(f"{path} does not exist.") from None
    except Exception as error:  # torch raises UnpicklingError or RuntimeError for refused or corrupt files
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = next((line for line in lines if "Unsupported global" in line), None)
        if reason is None:  # not a refused class: the file is not a (complete) torch.save file
            detail = next((line for line in lines if line.startswith("Unsupported")), lines[0] if lines else "")
            raise ConversionError(
                f"Cannot read {path} with torch.load ({type(error).__name__}: {detail}): is it a complete file "
                "written by torch.save (not truncated by a copy or download)?"
            ) from None
        raise ConversionError(
            f"Cannot read {path} safely with torch.load(weights_only=True): {reason}\n"
            "Only tensors and plain containers are accepted. If the file pickles a whole nn.Module or an "
            "argparse.Namespace, re-save it from trusted code as torch.save(model.state_dict(), path)."
        ) from None


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Return `(state_dict, stored_config)` from a bare state_dict or one nested under a common key."""
    loaded = load_safely(path)
    if not isinstance(loaded, dict):
        raise ConversionError(f"{path} holds a {type(loaded).__name__}, expected a state_dict (a dict of tensors).")
    stored_config = next((loaded[key] for key in CONFIG_KEYS if isinstance(loaded.get(key), dict)), {})
    state_dict = loaded
    if not _is_state_dict(loaded):
        nested = [key for key in NESTING_KEYS if isinstance(loaded.get(key), dict) and _is_state_dict(loaded[key])]
        if not nested:
            raise ConversionError(
                f"{path} is neither a state_dict nor holds one under any of {NESTING_KEYS}; "
                f"its top-level keys are {sorted(map(str, loaded))[:20]}."
            )
        state_dict = loaded[nested[0]]
    return strip_common_prefix(dict(state_dict)), stored_config


def strip_common_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop a prefix shared by every key in front of `linear_in.weight`: `module.` (DataParallel / DDP), `model.`
    (a Lightning module's attribute), or both."""
    if "linear_in.weight" in state_dict:
        return state_dict
    prefixes = {key.removesuffix("linear_in.weight") for key in state_dict if key.endswith(".linear_in.weight")}
    if len(prefixes) == 1:
        (prefix,) = prefixes
        if all(key.startswith(prefix) for key in state_dict):
            return {key.removeprefix(prefix): value for key, value in state_dict.items()}
    return state_dict


def _is_state_dict(mapping: dict) -> bool:
    return bool(mapping) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in mapping.items())


def read_gene_embedding(path: str | Path) -> torch.Tensor:
    """Read the original's gene embedding `(input_dim, feature_dim)` from `.npy`, `.pt`/`.pth` or `.safetensors`."""
    path = Path(path)
    if not path.exists():
        raise ConversionError(f"Gene embedding file {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        tensors = {"array": torch.from_numpy(np.load(path, allow_pickle=False))}
    elif suffix in (".pt", ".pth"):
        loaded = load_safely(path)
        tensors = loaded if isinstance(loaded, dict) else {"tensor": loaded}
    elif suffix == ".safetensors":
        from safetensors.torch import load_file

        tensors = load_file(path)
    else:
        raise ConversionError(f"Gene embedding {path}: unknown format {suffix!r}; use .npy, .pt or .safetensors.")
    tensors = {key: value for key, value in tensors.items() if isinstance(value, torch.Tensor)}
    if len(tensors) != 1:
        named = [key for key in GENE_EMBEDDING_KEYS if key in tensors]
        if not named:
            raise ConversionError(
                f"Gene embedding {path} holds tensors {sorted(tensors)}; "
                f"keep one, or name it one of {GENE_EMBEDDING_KEYS}."
            )
        tensors = {named[0]: tensors[named[0]]}
    embedding = next(iter(tensors.values()))
    if embedding.dim() == 3:  # saved as the forward input (batch, input_dim, feature_dim): one matrix repeated
        if not bool((embedding == embedding[:1]).all()):
            raise ConversionError(
                f"Gene embedding {path} has shape {tuple(embedding.shape)} and differs between the cells of the "
                "batch; the converted model stores one (input_dim, feature_dim) matrix for every cell."
            )
        embedding = embedding[0]
    if embedding.dim() != 2:
        raise ConversionError(
            f"Gene embedding {path} has shape {tuple(embedding.shape)}; expected (input_dim, feature_dim)."
        )
    return embedding.to(torch.float32)


def read_gene_list(path: str | Path) -> list[str]:
    """One gene per line (Ensembl id or symbol), in the order of the original's input columns."""
    if not Path(path).exists():
        raise ConversionError(f"Gene list {path} does not exist.")
    genes = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    duplicates = sorted(gene for gene, count in Counter(genes).items() if count > 1)
    if duplicates:
        raise ConversionError(f"Gene list {path} repeats genes: {duplicates[:10]}.")
    return genes


# ---------------------------------------------------------------------------------------------------------------------
# Inferring the model from its keys


def infer_kind(state_dict: dict[str, torch.Tensor]) -> str:
    """`classifier` if `cls_decoder.*` keys exist, else `pretraining` with `linear_out`, else `cluster`."""
    missing = [key for key in ("linear_in.weight", "linear_in.bias") if key not in state_dict]
    if missing or not any(key.startswith("transformer_encoder.layers.") for key in state_dict):
        raise ConversionError(
            "Not an original ScGene checkpoint: expected linear_in.* and transformer_encoder.layers.* keys; "
            f"found {sorted(state_dict)[:10]}{' ...' if len(state_dict) > 10 else ''}."
        )
    if any(key.startswith("cls_decoder.") for key in state_dict):
        return "classifier"
    return "pretraining" if "linear_out.weight" in state_dict else "cluster"


def infer_sizes(state_dict: dict[str, torch.Tensor]) -> OriginalSizes:
    """Sizes from the weight shapes; the number of attention heads cannot be read from them (see `infer_num_heads`)."""
    kind = infer_kind(state_dict)
    linear_in = state_dict["linear_in.weight"]
    if linear_in.dim() != 2 or linear_in.shape[1] != 1:
        raise ConversionError(f"linear_in.weight has shape {tuple(linear_in.shape)}; expected (feature_dim, 1).")
    layer_ids = {int(match.group(1)) for key in state_dict if (match := re.match(LAYER, key))}
    if layer_ids != set(range(len(layer_ids))):
        raise ConversionError(f"transformer_encoder.layers has gaps: found layer indices {sorted(layer_ids)}.")
    linear1 = state_dict.get("transformer_encoder.layers.0.linear1.weight")
    if linear1 is None:
        raise ConversionError("transformer_encoder.layers.0.linear1.weight is missing; cannot infer the FFN size.")
    sizes = OriginalSizes(kind, linear_in.shape[0], len(layer_ids), linear1.shape[0])
    if kind == "classifier":
        for key in ("cls_decoder.0.weight", "cls_decoder.3.weight"):
            if key not in state_dict:
                raise ConversionError(
                    f"Classifier checkpoint without {key}: "
                    "cls_decoder must be Sequential(Linear, ReLU, Dropout, Linear)."
                )
        sizes.classifier_hidden_size, sizes.num_panel_genes = state_dict["cls_decoder.0.weight"].shape
        sizes.num_labels = state_dict["cls_decoder.3.weight"].shape[0]
    return sizes


def infer_num_heads(stored_config: dict, given: int | None, hidden_size: int) -> int:
    """The head count from `--num-heads` or a config stored in the checkpoint; the weights do not determine it."""
    stored = next((int(stored_config[name]) for name in NUM_HEADS_NAMES if name in stored_config), None)
    if given is not None and stored is not None and given != stored:
        raise ConversionError(f"--num-heads {given} contradicts the checkpoint's stored config ({stored} heads).")
    num_heads = given if given is not None else stored
    if num_heads is None:
        raise ConversionError(
            "Cannot infer the number of attention heads: nn.MultiheadAttention stores all heads in one "
            f"in_proj_weight ({3 * hidden_size} x {hidden_size}), whatever the head count, and the checkpoint "
            f"stores no config naming it. Pass --num-heads (a divisor of feature_dim={hidden_size}, e.g. "
            "the nhead the original was trained with)."
        )
    if num_heads <= 0 or hidden_size % num_heads:
        raise ConversionError(f"--num-heads {num_heads} must be a positive divisor of feature_dim={hidden_size}.")
    return num_heads


# ---------------------------------------------------------------------------------------------------------------------
# Renaming and strict loading


def rename_state_dict(state_dict: dict[str, torch.Tensor], kind: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Rename every original key to its HF name; returns `(hf_state_dict, hf_key -> original_key)`."""
    prefix = BACKBONE_PREFIX[kind]
    table = [(pattern, prefix + target) for pattern, target in KEY_TABLE] + HEAD_TABLES[kind]
    renamed, origin, unknown = {}, {}, []
    for key, tensor in state_dict.items():
        match = next(((p, t) for p, t in table if re.fullmatch(p, key)), None)
        if match is None:
            unknown.append(key)
            continue
        target = re.sub(match[0], match[1], key)
        if "{proj}" in target:
            if tensor.shape[0] % 3:
                raise ConversionError(f"{key} has shape {tuple(tensor.shape)}; its first dim must be 3 x feature_dim.")
            for name, part in zip(QKV, tensor.chunk(3, dim=0)):
                renamed[target.format(proj=name)] = part.clone()
                origin[target.format(proj=name)] = key
        else:
            renamed[target] = tensor
            origin[target] = key
    if unknown:
        raise ConversionError(
            f"Unexpected keys for an original {ORIGINAL_NAMES[kind]} checkpoint (no mapping in KEY_TABLE): "
            f"{sorted(unknown)}"
        )
    return renamed, origin


def load_strictly(model: torch.nn.Module, renamed: dict[str, torch.Tensor], origin: dict[str, str]) -> None:
    """Load with no missing or unexpected keys and matching shapes; the gene prior is already set on the model."""
    expected = model.state_dict()
    prior_key = next(key for key in expected if key.endswith("embeddings.gene_prior.weight"))
    # the original head reads raw features: keep the new head's identity standardisation (mean 0, std 1 at init)
    standardisation = {key: t for key, t in expected.items() if key.endswith(("classifier.feature_mean", "classifier.feature_std"))}
    missing = sorted(set(expected) - set(renamed) - {prior_key} - set(standardisation))
    unexpected = sorted(set(renamed) - set(expected))
    if missing or unexpected:
        raise ConversionError(
            "The checkpoint does not fill the converted model exactly.\n"
            f"  missing (in the model, not produced from the checkpoint): {missing}\n"
            f"  unexpected (produced from the checkpoint, not in the model): {unexpected}"
        )
    wrong = [
        f"{origin.get(key, key)} -> {key}: got {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}"
        for key, tensor in renamed.items()
        if tensor.shape != expected[key].shape
    ]
    if wrong:
        raise ConversionError("Shape mismatch (checkpoint key -> HF key):\n  " + "\n  ".join(wrong))
    model.load_state_dict({**renamed, **standardisation, prior_key: expected[prior_key]}, strict=True)


# ---------------------------------------------------------------------------------------------------------------------
# Building both sides


def build_reference(sizes: OriginalSizes, num_heads: int, state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The original model (reference implementation) with the checkpoint's weights, in eval mode."""
    common = dict(
        feature_dim=sizes.hidden_size,
        num_layers=sizes.num_hidden_layers,
        num_heads=num_heads,
        dim_feedforward=sizes.intermediate_size,
    )
    if sizes.kind == "classifier":
        model = ScBaseModelClassification(
            input_dim=sizes.num_panel_genes,
            num_classes=sizes.num_labels,
            hidden_dim=sizes.classifier_hidden_size,
            **common,
        )
    else:
        model = (ScBaseModel if sizes.kind == "pretraining" else ScBaseModelCluster)(**common)
    check_original_keys(state_dict, model.state_dict(), ORIGINAL_NAMES[sizes.kind])
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def check_original_keys(
    state_dict: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], original_name: str
) -> None:
    """The checkpoint's keys and shapes against the reference original's, named as in the checkpoint."""
    unexpected = sorted(set(state_dict) - set(expected))
    missing = sorted(set(expected) - set(state_dict))
    if unexpected or missing:
        lines = [f"The checkpoint does not match an original {original_name} with the sizes read from its keys."]
        if unexpected:
            lines.append(
                f"  Unexpected keys for an original {original_name} checkpoint (no mapping in KEY_TABLE): {unexpected}"
            )
        if missing:
            lines.append(f"  Missing keys (an original {original_name} has them, the checkpoint does not): {missing}")
        raise ConversionError("\n".join(lines))
    wrong = [
        f"{key}: got {tuple(tensor.shape)}, expected {tuple(expected[key].shape)}"
        for key, tensor in state_dict.items()
        if tensor.shape != expected[key].shape
    ]
    if wrong:
        raise ConversionError(
            f"Shape mismatch against an original {original_name} with the sizes read from linear_in, "
            "transformer_encoder.layers.0.linear1 and cls_decoder:\n  " + "\n  ".join(wrong)
        )


def build_hf_config(sizes: OriginalSizes, num_heads: int, num_panel_genes: int):
    """The `ScGeneConfig` that reproduces the original: seed 000's standard post-LN encoder with linear values."""
    from scgene.configuration_scgene import ScGeneConfig

    heads = {}
    if sizes.kind == "classifier":
        heads = dict(
            classifier_pooling="gene_projection",
            num_panel_genes=num_panel_genes,
            classifier_hidden_size=sizes.classifier_hidden_size,
            num_labels=sizes.num_labels,
            freeze_backbone=True,
        )
    return ScGeneConfig(
        vocab_size=NUM_SPECIAL_TOKENS + num_panel_genes,
        encoder_type="standard",
        attention_type="mha",
        expression_encoding="linear",
        norm_position="post",
        hidden_act="relu",
        hidden_size=sizes.hidden_size,
        num_hidden_layers=sizes.num_hidden_layers,
        num_attention_heads=num_heads,
        intermediate_size=sizes.intermediate_size,
        layer_norm_eps=1e-5,
        pooling="mean",  # the original has no <cls> token; its cell embedding is left to the user, mean is the default
        **heads,
    )


def hf_model_class(kind: str):
    """`ScGeneForMaskedExpression`, `ScGeneForCellClassification` or `ScGeneModel`."""
    import scgene.modeling_scgene as modeling

    return getattr(modeling, HF_CLASS_NAMES[kind])


def gene_prior_matrix(embedding: torch.Tensor) -> torch.Tensor:
    """`(vocab_size, d)`: zero rows for <pad>, <cls>, <mask>, then the original gene embedding rows."""
    return torch.cat([embedding.new_zeros(NUM_SPECIAL_TOKENS, embedding.shape[1]), embedding])


def check_gene_embedding(embedding: torch.Tensor, sizes: OriginalSizes, genes: list[str] | None) -> int:
    """Check the embedding against the checkpoint and the gene list; returns the panel size."""
    num_genes, dim = embedding.shape
    if dim != sizes.hidden_size:
        raise ConversionError(
            f"The gene embedding is {num_genes} x {dim} but the checkpoint's feature_dim is {sizes.hidden_size}."
        )
    if sizes.num_panel_genes is not None and num_genes != sizes.num_panel_genes:
        raise ConversionError(
            f"The gene embedding has {num_genes} genes but the classifier's cls_decoder.0 reads "
            f"input_dim={sizes.num_panel_genes}."
        )
    if genes is not None and len(genes) != num_genes:
        raise ConversionError(f"The gene list has {len(genes)} genes but the gene embedding has {num_genes} rows.")
    return num_genes


# ---------------------------------------------------------------------------------------------------------------------
# Conversion


def convert(
    checkpoint: str | Path,
    gene_embedding: str | Path,
    out_dir: str | Path,
    genes: str | Path | None = None,
    num_heads: int | None = None,
    overwrite: bool = False,
    tolerance: float = PARITY_TOLERANCE,
    parity_cells: int = PARITY_CELLS,
    target_sum: float = 1e4,
) -> ConversionResult:
    """Convert one original checkpoint into `out_dir` (written atomically, only once parity holds after a reload)."""
    out_dir = Path(out_dir)
    if parity_cells < 1:
        raise ConversionError(f"The parity check needs at least one cell, got {parity_cells}.")
    if out_dir.exists() and not overwrite:
        raise ConversionError(f"{out_dir} already exists; choose another --out or pass --overwrite.")
    state_dict, stored_config = load_checkpoint(checkpoint)
    sizes = infer_sizes(state_dict)
    num_heads = infer_num_heads(stored_config, num_heads, sizes.hidden_size)
    original = build_reference(sizes, num_heads, state_dict)  # checks the keys and shapes in the checkpoint's names
    embedding = read_gene_embedding(gene_embedding)
    gene_list = read_gene_list(genes) if genes is not None else None
    num_genes = check_gene_embedding(embedding, sizes, gene_list)

    config = build_hf_config(sizes, num_heads, num_genes)
    model_class = hf_model_class(sizes.kind)
    model = model_class(config)
    model.set_gene_prior(gene_prior_matrix(embedding))
    renamed, origin = rename_state_dict(state_dict, sizes.kind)
    special_key = BACKBONE_PREFIX[sizes.kind] + "embeddings.special_tokens.weight"
    renamed[special_key] = torch.zeros(NUM_SPECIAL_TOKENS, sizes.hidden_size)  # the original has no special tokens
    origin[special_key] = "(zeros: the original has no <pad>/<cls>/<mask>)"
    load_strictly(model, renamed, origin)

    with atomic_directory(out_dir) as staging:  # replaces an older out_dir only once parity holds
        model.save_pretrained(staging)
        input_ids = write_panel_tokenizer(staging, gene_list, num_genes, target_sum)
        reloaded = model_class.from_pretrained(staging, dtype=torch.float32).eval()
        parity = measure_parity(original, reloaded, embedding, input_ids, num_cells=parity_cells)
        if any(diff > tolerance for diff in parity.values()):
            raise ConversionError(
                "The converted model does not reproduce the original:\n"
                + format_parity_report(parity, tolerance, parity_cells, num_genes)
            )
        sources = {"checkpoint": Path(checkpoint), "gene embedding": Path(gene_embedding)}
        if genes is not None:
            sources["gene list"] = Path(genes)
        card = model_card(
            ORIGINAL_NAMES[sizes.kind],
            HF_CLASS_NAMES[sizes.kind],
            sizes,
            num_heads,
            num_genes,
            sources,
            parity,
            tolerance,
            has_tokenizer=gene_list is not None,
            parity_cells=parity_cells,
            target_sum=target_sum,
        )
        (staging / "README.md").write_text(card)
    return ConversionResult(out_dir, sizes.kind, config.to_dict(), parity, parity_cells, num_genes, tolerance)


def write_panel_tokenizer(
    directory: Path, gene_list: list[str] | None, num_genes: int, target_sum: float = 1e4
) -> list[int]:
    """Save the panel's tokenizer (when a gene list is given) and return the ids the reloaded one gives the panel.

    The panel's genes must get ids 3, 4, ... in the gene-list order, the rows of the prior built from the embedding.
    The tokenizer makes the original's inputs: every panel gene in panel order, zeros included, no `<cls>` token.
    """
    expected = list(range(NUM_SPECIAL_TOKENS, NUM_SPECIAL_TOKENS + num_genes))
    if gene_list is None:
        return expected
    from scgene.tokenization_scgene import ScGeneTokenizer

    try:
        tokenizer = ScGeneTokenizer.from_gene_list(
            gene_list, gene_selection="all", add_cls_token=False, max_length=None, target_sum=target_sum
        )
    except ValueError as error:
        raise ConversionError(f"Cannot build the panel tokenizer: {error}") from None
    tokenizer.save_pretrained(directory)
    try:
        input_ids = list(ScGeneTokenizer.from_pretrained(directory).convert_genes_to_ids(gene_list))
    except KeyError as error:
        raise ConversionError(f"The saved panel tokenizer does not know the panel's genes: {error}") from None
    if input_ids != expected:
        raise ConversionError(
            f"The saved panel tokenizer maps the gene list to {input_ids[:10]}..., "
            "expected ids 3, 4, ... in list order."
        )
    return input_ids
