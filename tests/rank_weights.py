"""Runs examples/pretrain_masked_expression.py with the given arguments, then saves the weights this process ends
with to $RANK_WEIGHTS_DIR/rank{RANK}.safetensors, so that a test can compare what every DDP rank trained, and the
content hashes of the cells the collator received, in order, to rank{RANK}_cells.json (which cells each rank read)."""

import json
import os
import sys
from pathlib import Path

from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import pretrain_masked_expression  # noqa: E402

from scgene.data import DataCollatorForMaskedExpression  # noqa: E402
from scgene.data.collators import cell_fingerprint  # noqa: E402

cells_read = []
collate = DataCollatorForMaskedExpression.__call__


def recording_collate(self, features):
    cells_read.extend(cell_fingerprint(feature) for feature in features)
    return collate(self, features)


DataCollatorForMaskedExpression.__call__ = recording_collate
trainer = pretrain_masked_expression.main()
out, rank = Path(os.environ["RANK_WEIGHTS_DIR"]), os.environ.get("RANK", "0")
distributed_type = trainer.accelerator.distributed_type
wrappers = sorted({type(module).__name__ for module in trainer.model_wrapped.modules()} - {"ScGeneLayer"})
(out / f"rank{rank}_setup.json").write_text(json.dumps({"distributed_type": str(distributed_type), "modules": wrappers}))
if distributed_type != "FSDP":  # FSDP ranks hold shards: compare the model it saves instead
    model = trainer.accelerator.unwrap_model(trainer.model)
    weights = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    save_file(weights, out / f"rank{rank}.safetensors")
(out / f"rank{rank}_cells.json").write_text(json.dumps(cells_read))
