"""Recovery fine-tuning of converted models (the paper's recipe), on memory-mapped packed data.

    from mla_ext.train import TrainConfig, finetune
    history = finetune(model, tokenizer, "default", TrainConfig(steps=200, seq_len=512), "run1")
    model = mla_ext.load_pretrained("run1/final")
"""
from .checkpoint import list_checkpoints
from .data import DataError, GlobalOrder, PackedDataset, TextSource, pack, resolve_source
from .loop import TrainConfig, finetune, plot_history, read_log
from .schedule import lr_factor, make_scheduler

__all__ = ["TrainConfig", "finetune", "pack", "PackedDataset", "TextSource", "resolve_source",
           "GlobalOrder", "DataError", "lr_factor", "make_scheduler", "read_log", "plot_history",
           "list_checkpoints"]
