"""Hugging Face backend: a LOCAL `transformers` causal-LM checkpoint behind the project's model
and tokenizer interfaces, so every stage runs on it unchanged.

    python -m rlhf run model=hf model.path=/path/to/checkpoint recipe=sft

`HFCausalLM` wraps `AutoModelForCausalLM` with the same interface as `rlhf.models.xtransformers.CausalLM`:
forward / forward_hidden / hidden / decode_step (the model's own KV cache; left padding handled with an
attention mask and position ids counted from each row's first real token), hidden_size,
vocab_size, max_seq_len, num_parameters. `HFTokenizer` wraps the checkpoint's fast tokenizer
into the project's tokenizer interface and saves itself as one JSON file (`{"kind": "hf", ...}`)
that `rlhf.models.checkpoint.load_tokenizer` reads back.

Nothing here downloads: every load passes `local_files_only=True`, and a path that is not a
local checkpoint folder is a `ConfigError`. `transformers` is imported lazily (the `hf` extra).

Left out on purpose: quantized loading, device maps and remote code (`trust_remote_code`);
a model whose forward does not take `attention_mask` is not supported.
"""

from __future__ import annotations

import inspect
import json
import string
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from rlhf.errors import ConfigError, DataError

__all__ = ["HFCausalLM", "HFTokenizer", "load_hf_model", "load_hf_tokenizer", "make_tiny_checkpoint"]

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def _transformers():
    try:
        import transformers
    except ModuleNotFoundError:
        raise ConfigError("model.backend=hf needs the `hf` extra: pip install 'rlhf[hf]'") from None
    # the per-tensor "Loading weights" bars would flood every stage's log
    transformers.utils.logging.disable_progress_bar()
    return transformers


def checkpoint_dir(path: Any) -> Path:
    """The checkpoint folder `path`, checked to be local: never a hub id, never a download."""
    if path is None or path == "???":
        raise ConfigError("model=hf needs model.path=DIR, a local Hugging Face checkpoint folder")
    folder = Path(str(path)).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"model.path={path}: not a local folder (the hf backend loads local checkpoints only, never from the hub)")
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model.path={path}: not a Hugging Face checkpoint folder (no config.json)")
    return folder


def _model_path(cfg) -> Any:
    from omegaconf import OmegaConf

    if OmegaConf.is_config(cfg) and OmegaConf.is_missing(cfg, "path"):
        return None
    return getattr(cfg, "path", None)


# --------------------------------------------------------------------------- the model


PACKED_PAIR_ARCHS = {"gpt2", "llama"}
# attention kernels whose handling of a custom 4D mask a test checks: sdpa takes it as booleans,
# eager adds it to the scores (flash-attention kernels drop it)
PACKED_PAIR_ATTENTION = {"sdpa", "eager"}


class HFCausalLM(nn.Module):
    """A `transformers` causal LM with the interface of `rlhf.models.xtransformers.CausalLM`.

    `self.model` is the Hugging Face model itself (what export saves with `save_pretrained`
    and what LoRA targets).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        text_cfg = model.config.get_text_config()
        self.hidden_size: int = int(text_cfg.hidden_size)
        self.vocab_size: int = int(model.get_output_embeddings().weight.shape[0])
        self.max_seq_len: int = int(getattr(text_cfg, "max_position_embeddings", None) or 2048)
        # a few architectures (Bloom's ALiBi, say) take positions from the mask alone
        self._takes_position_ids = "position_ids" in inspect.signature(model.forward).parameters
        # preference pairs share their prompt (rlhf.preference_batch.pack_pairs) only where a custom
        # 4D mask and position ids are known to be honoured (tests/test_hf_backend.py)
        self.attention: str = str(model.config._attn_implementation)
        self.packs_pairs: bool = (
            self._takes_position_ids and model.config.model_type in PACKED_PAIR_ARCHS and self.attention in PACKED_PAIR_ATTENTION
        )

    @property
    def config(self):
        return self.model.config

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        # Right-padded training batches need no attention mask: causal attention never lets a
        # real token see the padding after it.
        return self.model(input_ids=tokens, use_cache=False).logits

    def forward_hidden(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(input_ids=tokens, use_cache=False, output_hidden_states=True)
        # the last entry is the final layer after the final norm, like x-transformers' embeddings
        return out.logits, out.hidden_states[-1]

    def forward_packed(self, tokens: torch.Tensor, positions: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """Logits for rows holding several sequences: `positions` (B, T) and `allowed` (B, 1, T, T),
        which keys each query may see on top of the causal mask (see rlhf.models.xtransformers.CausalLM)."""
        causal = torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool, device=tokens.device).tril()
        mask = allowed & causal
        if self.attention == "eager":  # eager attention adds its mask to the scores
            weights = self.model.get_input_embeddings().weight
            mask = torch.zeros(mask.shape, dtype=weights.dtype, device=tokens.device).masked_fill(~mask, torch.finfo(weights.dtype).min)
        return self.model(input_ids=tokens, position_ids=positions, attention_mask=mask, use_cache=False).logits

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """The final hidden states without the LM head (the base model applies the final norm)."""
        return self.model.base_model(input_ids=tokens, use_cache=False).last_hidden_state

    def decode_step(self, tokens: torch.Tensor, cache=None, seq_start_pos: Optional[torch.Tensor] = None):
        """Logits for the next token after `tokens` (left-padded; real tokens start at seq_start_pos).

        With the cache returned by the previous call only the tokens it has not seen run
        through the network. Padding is masked out and positions count from each row's first
        real token, so a row's output does not depend on how much padding it got.
        """
        batch, width = tokens.shape
        if seq_start_pos is None:
            seq_start_pos = torch.zeros(batch, dtype=torch.long, device=tokens.device)
        positions = torch.arange(width, device=tokens.device)[None, :] - seq_start_pos[:, None]
        attention_mask = (positions >= 0).long()
        seen = 0 if cache is None else cache.get_seq_length()
        kwargs = {"position_ids": positions.clamp(min=0)[:, seen:]} if self._takes_position_ids else {}
        out = self.model(
            input_ids=tokens[:, seen:],
            attention_mask=attention_mask,
            past_key_values=cache,
            use_cache=True,
            **kwargs,
        )
        return out.logits[:, -1], out.past_key_values

    def num_parameters(self, exclude_embedding: bool = False) -> int:
        return int(self.model.num_parameters(exclude_embeddings=exclude_embedding))

    def lora_targets(self) -> list[str]:
        """Default LoRA targets (rlhf.models.lora): the names of every linear layer in the blocks, as
        peft's "all-linear" picks them: GPT-2 c_attn/c_proj/c_fc, Llama q_proj...down_proj.
        The output head is left out."""
        from transformers.pytorch_utils import Conv1D  # GPT-2's transposed linear

        head = self.model.get_output_embeddings()
        names = {
            name.rpartition(".")[2]
            for name, module in self.model.named_modules()
            if isinstance(module, (nn.Linear, Conv1D)) and module is not head
        }
        return sorted(names)


def _use_fused_gelu(model: nn.Module) -> None:
    """Swap the tanh-approximate GELU that GPT-2-style checkpoints write out in Python
    (`gelu_new`: seven elementwise kernels forward, more backward) for torch's fused one: the
    same function to float rounding, 17% of a GPT-2 DPO step on CPU before the swap. Only the
    modules change; the config, and so an exported checkpoint, still names its own activation."""
    from transformers.activations import FastGELUActivation, GELUTanh, NewGELUActivation

    for module in list(model.modules()):
        for name, child in module.named_children():
            if type(child) in (NewGELUActivation, FastGELUActivation):
                setattr(module, name, GELUTanh())


def _set_dropout(model: nn.Module, p: float) -> None:
    """Apply `model.dropout` to a pretrained model (0 by default).

    Checkpoints ship with their pre-training dropout (GPT-2: 0.1). RL stages compare
    log-probs in training mode with those from sampling, which dropout would make differ.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = p
        if isinstance(getattr(module, "attention_dropout", None), float):  # Llama-style functional dropout
            module.attention_dropout = p
    text_cfg = model.config.get_text_config()
    for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop", "attention_dropout", "hidden_dropout", "dropout"):
        if isinstance(getattr(text_cfg, name, None), float):
            setattr(text_cfg, name, p)


def load_hf_model(cfg, pretrained_weights: bool = True) -> HFCausalLM:
    """The checkpoint at `cfg.path` as an `HFCausalLM` (float32; mixed precision comes from the trainer).

    pretrained_weights=False builds the architecture from the checkpoint's config without
    reading its weights (for loading trained weights right after).
    """
    folder = checkpoint_dir(_model_path(cfg))
    transformers = _transformers()
    attention = getattr(cfg, "attn_implementation", None)
    kwargs = {"dtype": torch.float32} | ({"attn_implementation": str(attention)} if attention is not None else {})
    try:
        if pretrained_weights:
            if not any((folder / name).is_file() for name in WEIGHT_FILES):
                raise ConfigError(f"model.path={folder}: no weights (expected one of {', '.join(WEIGHT_FILES)})")
            model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, **kwargs)
        else:
            config = transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)
            model = transformers.AutoModelForCausalLM.from_config(config, **kwargs)
    except (OSError, ValueError, KeyError, ImportError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if attention is not None and "attention" in str(err).lower():
            raise ConfigError(f"model.attn_implementation={attention}: {first[:300]}") from None
        raise ConfigError(f"model.path={folder}: cannot load a causal LM from it ({first})") from None
    _set_dropout(model, float(getattr(cfg, "dropout", 0.0) or 0.0))
    _use_fused_gelu(model)
    # from_pretrained returns eval mode; a policy starts in train mode like rlhf.models.xtransformers.CausalLM
    return HFCausalLM(model).train()


# --------------------------------------------------------------------------- the tokenizer


class HFTokenizer:
    """A checkpoint's fast tokenizer in the project's tokenizer interface.

    Encoding and decoding go straight to the `tokenizers` backend, so a run and a reload from
    the saved JSON behave identically. `encode` adds no special tokens (BOS included); special
    tokens written in the text are still recognised, as `transformers` does, so chat-formatted
    text encodes as the model expects. `decode` drops special tokens and skips `transformers`'
    `clean_up_tokenization_spaces` rewrite, which would change answers such as "a ,b".
    pad_id is the checkpoint's pad token, or its EOS when it has none (GPT-2): the response
    masks, not the pad id, decide what is trained on.
    """

    kind = "hf"

    def __init__(self, backend, eos_id: int, pad_id: int, special_tokens: dict[str, str], chat_template: Optional[str] = None, source: Optional[str] = None):
        self._tok = backend
        self.eos_id, self.pad_id = int(eos_id), int(pad_id)
        self.special_tokens = dict(special_tokens)
        self.chat_template = chat_template
        self.source = source
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> HFTokenizer:
        from tokenizers import Tokenizer

        transformers = _transformers()
        try:
            hf_tok = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, KeyError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"model.path={folder}: cannot load its tokenizer ({first})") from None
        backend = getattr(hf_tok, "backend_tokenizer", None)
        if backend is None:
            raise ConfigError(f"model.path={folder}: the hf backend needs a fast tokenizer (tokenizer.json)")
        eos_id = hf_tok.eos_token_id
        if eos_id is None:
            raise ConfigError(f"model.path={folder}: the tokenizer has no EOS token; responses could never end")
        pad_id = hf_tok.pad_token_id if hf_tok.pad_token_id is not None else eos_id
        # a private copy with no truncation or padding baked in from how the checkpoint was saved
        tok = Tokenizer.from_str(backend.to_str())
        tok.no_truncation()
        tok.no_padding()
        chat_template = hf_tok.chat_template if isinstance(hf_tok.chat_template, str) else None
        return cls(tok, eos_id, pad_id, hf_tok.special_tokens_map, chat_template, str(folder))

    @classmethod
    def load(cls, path: str | Path) -> HFTokenizer:
        from tokenizers import Tokenizer

        path = Path(path)
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
            tok = Tokenizer.from_str(json.dumps(spec["tokenizer"]))
            return cls(tok, spec["eos_id"], spec["pad_id"], spec.get("special_tokens", {}), spec.get("chat_template"), spec.get("source"))
        except FileNotFoundError:
            raise DataError(f"{path}: tokenizer file not found") from None
        except Exception as err:  # bad JSON, a missing key, or tokenizers' bare Exception
            raise DataError(f"{path}: not a valid hf tokenizer file ({type(err).__name__}: {err})") from None

    def save(self, path: str | Path) -> None:
        payload = {
            "kind": self.kind,
            "tokenizer": json.loads(self._tok.to_str()),
            "eos_id": self.eos_id,
            "pad_id": self.pad_id,
            "special_tokens": self.special_tokens,
            "chat_template": self.chat_template,
            "source": self.source,
        }
        Path(path).write_text(json.dumps(payload, ensure_ascii=False), encoding="utf-8")

    @property
    def bos_id(self) -> Optional[int]:
        """The checkpoint's beginning-of-sequence token (rlhf.sampling.encode_prompt opens an
        empty prompt with it), or None if it has none."""
        bos = self.special_tokens.get("bos_token")
        bos = bos.get("content") if isinstance(bos, dict) else bos
        return self._tok.token_to_id(bos) if isinstance(bos, str) else None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def to_transformers(self):
        """A `transformers` fast tokenizer with the same vocabulary, specials and chat template (for export)."""
        from tokenizers import Tokenizer

        transformers = _transformers()
        hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(self._tok.to_str()), **self.special_tokens)
        if hf_tok.pad_token is None:
            # what this run padded with; transformers' generate wants one too
            hf_tok.pad_token = self._tok.id_to_token(self.pad_id)
        if self.chat_template:
            hf_tok.chat_template = self.chat_template
        return hf_tok

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, source={self.source!r})"


def load_hf_tokenizer(cfg) -> HFTokenizer:
    """The tokenizer of the checkpoint at `cfg.path` (a ModelConfig), in the project's interface."""
    return HFTokenizer.from_pretrained(checkpoint_dir(_model_path(cfg)))


# --------------------------------------------------------------------------- a tiny local checkpoint


def make_tiny_checkpoint(
    folder: str | Path,
    texts: Iterable[str],
    arch: str = "gpt2",
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 2,
    vocab_size: int = 512,
    max_positions: int = 256,
    seed: int = 0,
) -> Path:
    """Write a small, randomly initialised GPT-2 (or Llama) checkpoint with its own byte-level BPE
    tokenizer to `folder`, built entirely locally: for tests, benchmarks and trying the backend
    offline. The tokenizer is trained on `texts` (the built-in task's: rlhf.tasks.builtin.solved_texts,
    so task prompts tokenise compactly) and printable ASCII; it includes a minimal chat template
    so templates are carried through save and export.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    transformers = _transformers()
    folder = Path(folder)
    eos = "<|endoftext|>"
    texts = [*texts, string.printable]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[eos], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, unk_token=eos)
    hf_tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    eos_id = hf_tok.eos_token_id
    if arch == "gpt2":
        config = transformers.GPT2Config(
            n_layer=n_layer, n_embd=n_embd, n_head=n_head, vocab_size=len(hf_tok), n_positions=max_positions,
            bos_token_id=eos_id, eos_token_id=eos_id,
        )
    elif arch == "llama":
        config = transformers.LlamaConfig(
            num_hidden_layers=n_layer, hidden_size=n_embd, num_attention_heads=n_head, num_key_value_heads=n_head,
            intermediate_size=4 * n_embd, vocab_size=len(hf_tok), max_position_embeddings=max_positions,
            bos_token_id=eos_id, eos_token_id=eos_id, tie_word_embeddings=True,
        )
    else:
        raise ConfigError(f"arch={arch!r} is not one of: gpt2, llama")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(folder))
    hf_tok.save_pretrained(str(folder))
    return folder
