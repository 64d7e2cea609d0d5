"""Tiny seeded llama models with a real (byte-level BPE) tokenizer, for fast tests."""

from __future__ import annotations

from pathlib import Path

import torch

from ..calibration import BUILTIN, builtin_text


def tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE tokenizer trained (deterministically) on the start of the built-in text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([builtin_text(BUILTIN["wikitext2"])[:50_000]], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def tiny_llama_config(**overrides):
    from transformers import LlamaConfig

    cfg = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=384, max_position_embeddings=512, tie_word_embeddings=False)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def tiny_llama(seed: int = 0, **overrides):
    """A seeded random ``LlamaForCausalLM`` (fp32, eval mode)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)  # transformers' init uses the global generator; tests only
    model = LlamaForCausalLM(tiny_llama_config(**overrides)).eval()
    return model


def save_tiny_llama(path: Path | str, seed: int = 0, **overrides) -> Path:
    """Write a tiny llama + tokenizer as an HF directory (safetensors) and return its path."""
    path = Path(path)
    tiny_llama(seed, **overrides).save_pretrained(str(path), safe_serialization=True)
    tiny_tokenizer(overrides.get("vocab_size", 384)).save_pretrained(str(path))
    return path


#: per-family overrides of the tiny config (every family: 2 layers, hidden 128, 4 heads of 32, 2 KV heads)
TINY_FAMILIES: dict[str, dict] = {
    "llama": {},
    "phi3": {},
    "gemma2": {"query_pre_attn_scalar": 32},
    "gemma3_text": {"query_pre_attn_scalar": 32, "sliding_window": 64},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
    "gemma3": {"text_config": {"query_pre_attn_scalar": 32, "sliding_window": 64},
               "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
                                 "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
               "mm_tokens_per_image": 4, "boi_token_index": 380, "eoi_token_index": 381, "image_token_index": 382},
    "qwen2_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64,
                  "shared_expert_intermediate_size": 128},
    "qwen3_moe": {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 64},
}


def tiny_config(model_type: str, **overrides):
    """A tiny config of any HF ``model_type`` (:data:`TINY_FAMILIES` lists the tested ones)."""
    from transformers import AutoConfig

    cfg = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=32, vocab_size=384, max_position_embeddings=512,
               tie_word_embeddings=False, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    family = dict(TINY_FAMILIES.get(model_type, {}))
    if "vision_config" in family:  # an image-text model: the tiny sizes describe its text model
        text = {**cfg, **family.pop("text_config", {}), **overrides}
        return AutoConfig.for_model(model_type, text_config=text, **family)
    cfg.update(family)
    cfg.update(overrides)
    return AutoConfig.for_model(model_type, **cfg)


def tiny_model(model_type: str, seed: int = 0, **overrides):
    """A seeded random causal LM of ``model_type`` (fp32, eval mode), built from a config (no download)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=torch.float32).eval()


def save_tiny_model(path: Path | str, model_type: str, seed: int = 0, **overrides) -> Path:
    """Write :func:`tiny_model` and the tiny tokenizer as an HF directory and return its path."""
    path = Path(path)
    tiny_model(model_type, seed, **overrides).save_pretrained(str(path), safe_serialization=True)
    tiny_tokenizer(overrides.get("vocab_size", 384)).save_pretrained(str(path))
    return path
