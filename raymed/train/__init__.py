"""Ray Train fine-tuning (DDP or FSDP2), one module per concern:

    model       the model and its trainable scope (full, top_layers, lora)
    metrics     next-token metrics, shared with `raymed eval`
    checkpoint  checkpoint directories: write, verify complete, load strictly
    fsdp        FSDP2 sharding, and sharded (DCP) checkpoints with a consolidated export
    runlog      rank 0's metrics.jsonl, TensorBoard events and train.log
    loop        each worker's loop: token-weighted steps, report, resume
    validation  validation over every block, each worker scoring its share
    trainer     the TorchTrainer (`fit`)
"""

from raymed.train.checkpoint import ADAPTER_DIR, COMPLETE_FILE, STATE_FILE, load_checkpoint_model, save_checkpoint_model
from raymed.train.fsdp import SHARDED_DIR, load_sharded_state, local_state_bytes
from raymed.train.loop import WorkerLoop, endless_epochs, read_losses, train_loop_per_worker
from raymed.train.validation import validate
from raymed.train.metrics import token_metrics, val_metrics
from raymed.train.model import apply_scope, build_model, check_model_fits, flops_per_token, load_tokenizer
from raymed.train.paths import checkpoints_dir, train_dir
from raymed.train.runlog import EVENTS_FILE, METRICS_FILE
from raymed.train.trainer import fit

__all__ = [
    "ADAPTER_DIR", "COMPLETE_FILE", "EVENTS_FILE", "METRICS_FILE", "SHARDED_DIR", "STATE_FILE", "WorkerLoop",
    "apply_scope", "load_sharded_state", "local_state_bytes",
    "build_model", "check_model_fits", "checkpoints_dir", "endless_epochs", "fit", "flops_per_token",
    "load_checkpoint_model", "load_tokenizer", "read_losses", "save_checkpoint_model", "token_metrics",
    "train_dir", "train_loop_per_worker", "val_metrics", "validate",
]
