"""Recovery fine-tuning of converted models (the paper's recipe), on memory-mapped packed data.

    from mla_ext.train import TrainConfig, finetune
    history = finetune(model, tokenizer, "default", TrainConfig(steps=200, seq_len=512), "run1")
    model = mla_ext.load_pretrained("run1/final")

With the original's chat answers mixed in (a quarter of the tokens) and distilled from it:

    from mla_ext.train import chat_data, corpus_prompts, mix_sources
    chat = chat_data(original, tokenizer, corpus_prompts(1024))      # generated once, cached
    data = mix_sources("default", chat.source(), 0.25)
    finetune(model, tokenizer, data, TrainConfig(distill=0.5), "run2", teacher=original)
"""
from .chat import ChatData, chat_data, corpus_prompts
from .checkpoint import list_checkpoints
from .data import (DataError, GlobalOrder, PackedDataset, TextSource, mix_sources, pack,
                   resolve_source)
from .loop import TrainConfig, finetune, plot_history, read_log
from .schedule import lr_factor, make_scheduler

__all__ = ["TrainConfig", "finetune", "pack", "PackedDataset", "TextSource", "resolve_source",
           "GlobalOrder", "DataError", "lr_factor", "make_scheduler", "read_log", "plot_history",
           "list_checkpoints", "mix_sources", "chat_data", "corpus_prompts", "ChatData"]
