"""The model layer, one front door: the policy's backends, its tokenizers, its files, and which
of its parameters train and how they are sharded.

  config.py        ModelConfig, the `model=` schema
  build.py         build_model (the backend `model.backend` names), frozen_copy
  xtransformers.py the built-in backend, CausalLM: the interface every stage calls
  hf.py            a local Hugging Face checkpoint behind the same interface, and its tokenizer
  tokenizer.py     the tokenizer interface and the built-in task's character tokenizer
  bpe.py           byte-level BPE for real text
  checkpoint.py    a policy's weights, model.yaml and tokenizer.json in a stage dir
  lora.py          LoRA adapters (peft)
  freezing.py      which parameters a stage trains (LoRA, the last N layers)
  fsdp.py          sharded training (trainer.strategy=fsdp)

Everything else (tasks, data, stages, training, the orchestrator) builds on this package and
imports from here; nothing here imports them (tests/test_imports.py).
"""

from rlhf.models import fsdp
from rlhf.models.bpe import BPETokenizer
from rlhf.models.build import build_model, frozen_copy
from rlhf.models.checkpoint import load_policy, load_tokenizer, load_weights, save_model_files, save_weights
from rlhf.models.config import ModelConfig
from rlhf.models.freezing import finish_trainable, prepare_trainable, train_last_n_layers
from rlhf.models.fsdp import gather_policy, shard_in, transformer_blocks
from rlhf.models.hf import HFCausalLM, HFTokenizer, load_hf_model, load_hf_tokenizer, make_tiny_checkpoint
from rlhf.models.lora import (
    LoRAConfig,
    adapter_state_dict,
    apply_lora,
    base_state_dict,
    disabled_adapters,
    has_lora,
    merge_lora,
    remove_lora,
)
from rlhf.models.tokenizer import EOS, PAD, CharTokenizer, Tokenizer
from rlhf.models.xtransformers import CausalLM

__all__ = [
    "BPETokenizer", "CausalLM", "CharTokenizer", "EOS", "HFCausalLM", "HFTokenizer", "LoRAConfig", "ModelConfig", "PAD",
    "Tokenizer", "adapter_state_dict", "apply_lora", "base_state_dict", "build_model", "disabled_adapters",
    "finish_trainable", "frozen_copy", "fsdp", "gather_policy", "has_lora", "load_hf_model", "load_hf_tokenizer",
    "load_policy", "load_tokenizer", "load_weights", "make_tiny_checkpoint", "merge_lora", "prepare_trainable",
    "remove_lora", "save_model_files", "save_weights", "shard_in", "train_last_n_layers", "transformer_blocks",
]
