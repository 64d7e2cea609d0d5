"""Intel xFasterTransformer (xFT) INT4/INT8 directories, written directly (formats.md §4): no
AutoGPTQ, no xFT converter (whose bugs §4.6 lists).

Layout: ``config.ini`` (section ``[llama]`` or ``[qwen2]``) plus raw little-endian ``.bin`` files.
Per decoder layer L the quantized matrices are ``[in, out]`` row-major: q/k/v fused along the output
dim into ``model.layers.L.attention.query_key_value``, the output projection as ``attention.dense``, and
``mlp.{gate,up,down}_proj``, each with ``qweight.0.bin``, ``scales.0.bin`` and ``zeros.0.bin``.

* uint4 (4-bit): byte ``[k][j] = q[k][2j] | q[k][2j+1] << 4`` (even output column in the low nibble).
* int8 (8-bit): byte = ``int8(q − 128)``.
* scales: fp32 widening of the fp16 scales; zeros: fp32 ``−s·z`` (uint4) / ``−s·(z − 128)`` (int8),
  so that xFT's ``w = s·v + zero`` equals ``s·(q − z)`` exactly.
* embeddings, norms and lm_head (and a q/k/v bias) in ``weight_data_type``: by default the dtype of
  the model's float tensors (fp32, fp16 or bf16; set ``XFTExporter.float_dtype`` to choose).

Per channel only: the xFT runtime aborts unless ``quant_groupsize == -1``.

**Reading zeros back.** The stored zero is ``Z = fp32(−s·z)`` with ``s`` an fp16 value widened to
fp32. ``s`` has at most 11 significant bits and ``z`` (or ``z − 128``) at most 8, so the product is
exact in fp32's 24-bit mantissa; ``−Z / s`` is then the exact integer ``z`` (IEEE division is
correctly rounded and the true quotient is representable). The reader recovers ``z`` that way and
checks it is an integer in range; a file whose zeros were rounded (e.g. a product taken in fp16) is
accepted when ``−Z/s`` is within 1e-2 of an integer, and rejected otherwise. Where ``s = 0`` and
``Z = 0`` every zero decodes the same; the reader takes ``2**(bits-1)``.

Beyond the converter's keys, ``config.ini`` gets ``hidden_size`` (as xFT's float converter writes),
``rope_theta``/``rope_type``/``scaling_factor`` (the quantized converter forgets them) and
``quant_scheme = sym|asym`` (the key the converter has commented out); config.json, tokenizer and
generation config are written beside them so that the directory reads back completely.
"""

from __future__ import annotations

import configparser
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from lowbit import CheckpointError, Exporter, QuantizedModel, QuantizedWeight, QuantScheme, UnsupportedSchemeError
from lowbit.exporting import with_adapter
from lowbit.hf import checkpoint_file, load_config, load_extras, write_config, write_extras
from lowbit.models import Adapter

from ._common import _get, check_sym_zeros, family, linear_shapes, strip_quantization_config

# xFT's layout, in xFT's own names; a model's modules are found through its adapter's roles
# (lowbit.models.Adapter.layer_roles), so no family's module names appear here.
#: the model types xFT's runtime knows (its config.ini section names): llama-style decoders
MODEL_TYPES = ("llama", "qwen2")
#: a decoder layer's files are named under this prefix (L: the layer's index)
_LAYER_FILES = "model.layers.{}."
#: quantized matrix file stem → the roles fused into it, in column order
_MATRICES = {"attention.query_key_value": ("q", "k", "v"), "attention.dense": ("o",),
             "mlp.gate_proj": ("gate",), "mlp.up_proj": ("up",), "mlp.down_proj": ("down",)}
#: role of a layer's norm → its file stem
_NORM_FILES = {"attn_norm": "input_layernorm.weight", "mlp_norm": "post_attention_layernorm.weight"}
#: the files of the embedding, the final norm and the output projection
_EMBEDDING_FILE = "model.wte.bin"
_FINAL_NORM_FILE = "model.final_layernorm.weight.bin"
_LM_HEAD_FILE = "model.lm_head.weight.bin"


def _layout_refusal(adapter: Adapter | None, config) -> str | None:
    """None when xFT has a layout for this model (a model type its runtime knows, an adapter naming
    every role the layout needs), else why not."""
    mt = _get(config, "model_type")
    if adapter is None or mt not in MODEL_TYPES:
        by = f" (adapter {adapter.name})" if adapter is not None else ""
        return f"xFT export supports model types {', '.join(MODEL_TYPES)}, got {mt!r}{by}"
    roles = adapter.layer_roles(config)
    missing = [r for rs in _MATRICES.values() for r in rs if r not in roles] + [r for r in _NORM_FILES if r not in roles]
    if missing:
        return f"xFT's layout needs the roles {', '.join(missing)}, which adapter {adapter.name} does not name"
    return None


def _matrices(adapter: Adapter, config) -> dict[str, tuple[str, ...]]:
    """xFT file stem → the adapter's leaf paths (inside a decoder layer) fused into it."""
    roles = adapter.layer_roles(config)
    return {stem: tuple(roles[r] for r in rs) for stem, rs in _MATRICES.items()}


def _norms(adapter: Adapter, config) -> dict[str, str]:
    """The adapter's norm weight paths (inside a decoder layer) → xFT's file stem."""
    roles = adapter.layer_roles(config)
    return {f"{roles[r]}.weight": stem for r, stem in _NORM_FILES.items()}

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_REQUIRED = ("head_num", "size_per_head", "inter_size", "num_layer", "vocab_size", "activation_type")


class _Remaining:
    """The entries of a (possibly lazy) mapping not popped yet, each read only when popped."""

    def __init__(self, mapping):
        self._m, self._left = mapping, set(mapping)

    def pop(self, key, default=None):
        if key not in self._left:
            return default
        self._left.discard(key)
        return self._m[key]

    def __bool__(self) -> bool:
        return bool(self._left)

    def __len__(self) -> int:
        return len(self._left)

    def __iter__(self):
        return iter(sorted(self._left))


def _write_bin(t: torch.Tensor, path: Path) -> None:
    t.detach().contiguous().cpu().view(torch.uint8).numpy().tofile(path)


def _read_bin(path: Path, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    path = checkpoint_file(path.parent, path.name)  # never a link out of the directory, a FIFO or a device
    if not path.is_file():
        raise CheckpointError(f"{path.parent}: {path.name} is missing; the xFT directory is incomplete.")
    nbytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
    size = path.stat().st_size
    if size != nbytes:
        raise CheckpointError(f"{path} holds {size} bytes, expected {nbytes} for {dtype} {list(shape)}; "
                              "the file is truncated or config.ini disagrees with it.")
    raw = torch.from_numpy(np.fromfile(path, dtype=np.uint8))
    return raw.view(dtype).reshape(shape).clone()


def _rope(config) -> tuple[float, dict | None]:
    params = _get(config, "rope_parameters") or {}
    scaling = _get(config, "rope_scaling") or None
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    theta = theta or _get(config, "rope_theta") or 10000.0
    if isinstance(params, dict) and params.get("rope_type") not in (None, "default"):
        scaling = params
    return float(theta), scaling


def _ids(v):
    if isinstance(v, (list, tuple)):
        v = v[0] if v else None
    return v


def xft_matrix(parts: list[QuantizedWeight]) -> dict[str, torch.Tensor]:
    """The ``qweight``, ``scales`` and ``zeros`` of one xFT matrix from per-channel weights fused
    along the output dim (q, k, v for the attention input; one weight otherwise).

    Codes go ``[in, out]``: 4-bit codes ``[[0,1,2,3],[4,5,6,7]]`` (rows = input k) become the bytes
    ``10 32 54 76`` (row 0 = ``0x10, 0x32``: column 0 in the low nibble, column 1 in the high); 8-bit
    codes ``[0,127,128,255]`` become ``80 FF 00 7F`` (``q − 128`` as int8). Scales ``[0.5, 0.25,
    0.125, 0.0625]`` are written as fp32 ``00 00 00 3F  00 00 80 3E …`` and zeros ``[1,2,3,4]`` as
    ``−s·z = [−0.5, −0.5, −0.375, −0.25]``; an 8-bit zero of 128 gives ``−0.0`` (``00 00 00 80``).
    """
    bits = parts[0].scheme.bits
    codes = torch.cat([p.codes.t() for p in parts], dim=1)  # [K, N_total]
    s = torch.cat([p.scales[:, 0] for p in parts]).float()
    z = torch.cat([p.zeros[:, 0] for p in parts]).float()
    if bits == 4:
        c = codes.to(torch.uint8)
        qweight = (c[:, 0::2] & 0xF) | ((c[:, 1::2] & 0xF) << 4)
        zeros = -(s * z)
    else:
        qweight = (codes.to(torch.int16) - 128).to(torch.int8)
        zeros = -(s * (z - 128))
    return {"qweight": qweight.contiguous(), "scales": s.contiguous(), "zeros": zeros.contiguous()}


class XFTExporter(Exporter):
    name = "xft"
    description = "Intel xFasterTransformer int4/int8 directory (config.ini + .bin), per-channel only"
    #: dtype of embeddings, norms, lm_head and bias files; None keeps the model's float dtype
    float_dtype: ClassVar[torch.dtype | None] = None

    @classmethod
    def check(cls, scheme: QuantScheme, config=None) -> str | None:
        if not scheme.per_channel:
            return (f"xFT needs per-channel weights (group_size=-1; its runtime aborts otherwise), got "
                    f"group_size={scheme.group_size}; quantize with --group-size -1")
        if scheme.bits not in (4, 8):
            return f"xFT holds 4-bit (uint4) and 8-bit (int8) weights, got {scheme.bits}-bit"
        if config is not None:
            adapter = family(config)
            reason = _layout_refusal(adapter, config)
            if reason:
                return reason
            qkv = set(_matrices(adapter, config)["attention.query_key_value"])
            others = sorted(adapter.biased_linears(config) - qkv)
            if others:
                return (f"xFT holds a bias only on the fused q/k/v projection; this {_get(config, 'model_type')} "
                        f"has biases on {', '.join(others)}")
            if scheme.bits == 4:
                for leaf, (n, _k) in linear_shapes(adapter, config).items():
                    if n % 2:
                        return f"xFT uint4 packs output columns in pairs; {leaf} has odd out_features {n}"
        return None

    @classmethod
    def detect(cls, path: Path) -> bool:
        ini = Path(path) / "config.ini"
        if not ini.is_file():
            return False
        cp = configparser.ConfigParser()
        try:
            cp.read(ini)
        except configparser.Error:
            return False
        return bool(cp.sections()) and "head_num" in cp[cp.sections()[0]]

    # -- write ---------------------------------------------------------------------------------
    def write(self, qmodel: QuantizedModel, out_dir: Path) -> None:
        out_dir = Path(out_dir)
        scheme, config = qmodel.scheme, qmodel.config
        reason = self.check(scheme, config)
        if reason:
            raise UnsupportedSchemeError(f"cannot write {scheme.describe()} as xft: {reason}.")
        adapter = with_adapter(qmodel).adapter  # check() has refused a model without one
        floats = _Remaining(qmodel.float_tensors)  # read on access: the model may be read lazily
        embed_name, norm_name = f"{adapter.embedding}.weight", f"{adapter.final_norm}.weight"
        embed, norm = floats.pop(embed_name, None), floats.pop(norm_name, None)
        if embed is None or norm is None:
            raise CheckpointError(f"xft export needs {embed_name} and {norm_name} among the "
                                  "float tensors; the quantized model is incomplete.")
        lm_head = floats.pop(f"{adapter.lm_head}.weight", None)
        if lm_head is None:
            if not _get(config, "tie_word_embeddings", False):
                raise CheckpointError(f"xft export needs {adapter.lm_head}.weight (the model does not tie it to the "
                                      "embeddings).")
            lm_head = embed
        fdtype = self.float_dtype or (embed.dtype if embed.dtype in _DTYPE_NAMES else torch.float32)
        layers = int(_get(config, "num_hidden_layers"))
        qweights = _Remaining(qmodel.qweights)
        matrices, norms = _matrices(adapter, config), _norms(adapter, config)
        for L in range(layers):
            pre, files = adapter.layer_prefix(L), _LAYER_FILES.format(L)
            for stem, leaves in matrices.items():
                parts = []
                for leaf in leaves:
                    qw = qweights.pop(pre + leaf, None)
                    if qw is None:
                        raise UnsupportedSchemeError(
                            f"xft export needs every decoder linear quantized; {pre + leaf} is not. "
                            "Quantize all linears, or pick --format gptq/autoawq.")
                    check_sym_zeros(qw, pre + leaf)
                    parts.append(qw)
                self._write_matrix(parts, out_dir / f"{files}{stem}", stem, fdtype)
            for src, dst in norms.items():
                t = floats.pop(pre + src, None)
                if t is None:
                    raise CheckpointError(f"xft export needs {pre + src}; the quantized model is incomplete.")
                _write_bin(t.to(fdtype), out_dir / f"{files}{dst}.bin")
        if qweights:
            raise UnsupportedSchemeError(f"xFT has no place for quantized {sorted(qweights)[0]} "
                                         f"({len(qweights)} such modules).")
        if floats:
            raise UnsupportedSchemeError(f"xFT has no place for float tensor {sorted(floats)[0]} "
                                         f"({len(floats)} such tensors); it holds llama/qwen2 decoders only.")
        _write_bin(embed.to(fdtype), out_dir / _EMBEDDING_FILE)
        _write_bin(norm.to(fdtype), out_dir / _FINAL_NORM_FILE)
        _write_bin(lm_head.to(fdtype), out_dir / _LM_HEAD_FILE)
        self._write_ini(qmodel, out_dir, fdtype)
        write_config(config, out_dir)
        write_extras(qmodel, out_dir)

    def _write_matrix(self, parts: list[QuantizedWeight], base: Path, stem: str, fdtype: torch.dtype) -> None:
        for suffix, t in xft_matrix(parts).items():
            _write_bin(t, base.with_name(f"{base.name}.{suffix}.0.bin"))
        biases = [p.bias for p in parts]
        if any(b is not None for b in biases):
            if stem != "attention.query_key_value" or any(b is None for b in biases):
                raise UnsupportedSchemeError(f"xFT holds a bias only on the fused q/k/v projection (all three); "
                                             f"{base.name} has one it cannot store.")
            _write_bin(torch.cat(biases).to(fdtype), base.with_name(base.name + ".bias.0.bin"))

    def _write_ini(self, qmodel: QuantizedModel, out_dir: Path, fdtype: torch.dtype) -> None:
        c, s = qmodel.config, qmodel.scheme
        heads = int(_get(c, "num_attention_heads"))
        hidden = int(_get(c, "hidden_size"))
        head_dim = int(_get(c, "head_dim") or hidden // heads)
        theta, scaling = _rope(c)
        sec = {
            "model_name": _get(c, "_name_or_path") or _get(c, "model_type"),
            "head_num": heads,
            "kv_head_num": int(_get(c, "num_key_value_heads") or heads),
            "hidden_size": hidden,
            "size_per_head": head_dim,
            "inter_size": int(_get(c, "intermediate_size")),
            "max_pos_seq_len": int(_get(c, "max_position_embeddings")),
            "num_layer": int(_get(c, "num_hidden_layers")),
            "layernorm_eps": _get(c, "rms_norm_eps", 1e-6),
            "layernorm_type": "pre_layernorm",
            "activation_type": _get(c, "hidden_act", "silu"),
            "rope_theta": theta,
            "scaling_factor": (scaling or {}).get("factor", 1.0),
            "rope_type": (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "null",
            "has_post_decoder_layernorm": 1,
            "vocab_size": int(_get(c, "vocab_size")),
            "start_id": _ids(_get(c, "bos_token_id")),
            "end_id": _ids(_get(c, "eos_token_id")),
            "pad_id": _ids(_get(c, "pad_token_id")),
            "weight_data_type": _DTYPE_NAMES[fdtype],
            "attn_params_type": "GQAttnParams",
            "ffn_params_type": "LlamaFFNParams",
            "quant_qweight_data_type": "uint4" if s.bits == 4 else "int8",
            "quant_scales_data_type": "fp32",
            "quant_zeros_data_type": "fp32",
            "quant_groupsize": -1,
            "quant_scheme": "sym" if s.sym else "asym",
        }
        cp = configparser.ConfigParser()
        cp[_get(c, "model_type")] = {k: str(v) for k, v in sec.items() if v is not None}
        with open(out_dir / "config.ini", "w") as f:
            cp.write(f)

    # -- read ----------------------------------------------------------------------------------
    def _ini(self, path: Path) -> tuple[str, configparser.SectionProxy]:
        ini = checkpoint_file(path, "config.ini")
        if not ini.is_file():
            raise CheckpointError(f"{path} has no config.ini; it is not an xFT model directory.")
        cp = configparser.ConfigParser()
        try:
            cp.read(ini)
        except configparser.Error as err:
            raise CheckpointError(f"{ini} cannot be parsed ({type(err).__name__}); the xFT directory is damaged.") from err
        if not cp.sections():
            raise CheckpointError(f"{ini} has no section; it is not an xFT config.")
        name = cp.sections()[0]
        sec = cp[name]
        missing = [k for k in _REQUIRED if k not in sec]
        if missing:
            raise CheckpointError(f"{ini} lacks {', '.join(missing)}; it is not a complete xFT config.")
        return name, sec

    def read(self, path: Path) -> QuantizedModel:
        path = Path(path)
        mtype, sec = self._ini(path)
        qtype = sec.get("quant_qweight_data_type")
        if qtype not in ("uint4", "int8"):
            raise CheckpointError(f"{path}/config.ini: quant_qweight_data_type is {qtype!r}; lowbit reads quantized xFT "
                                  "models (uint4, int8), not float ones.")
        if sec.get("quant_groupsize", "-1").strip() != "-1":
            raise CheckpointError(f"{path}/config.ini: quant_groupsize {sec.get('quant_groupsize')} is not -1; xFT "
                                  "holds per-channel weights only.")
        for key in ("quant_scales_data_type", "quant_zeros_data_type"):
            if sec.get(key, "fp32") != "fp32":
                raise CheckpointError(f"{path}/config.ini: {key} is {sec.get(key)}; xFT requires fp32.")
        fdtype = _DTYPES.get(sec.get("weight_data_type", "fp16"))
        if fdtype is None:
            raise CheckpointError(f"{path}/config.ini: weight_data_type {sec.get('weight_data_type')!r} is not "
                                  f"readable (reads {', '.join(_DTYPES)}).")
        try:
            heads, kv = int(sec["head_num"]), int(sec.get("kv_head_num", sec["head_num"]))
            head_dim, inter = int(sec["size_per_head"]), int(sec["inter_size"])
            layers, vocab = int(sec["num_layer"]), int(sec["vocab_size"])
        except ValueError as err:
            raise CheckpointError(f"{path}/config.ini holds a non-integer size ({err}).") from err
        bits = 4 if qtype == "uint4" else 8
        esize = torch.empty(0, dtype=fdtype).element_size()
        norm_file = path / _FINAL_NORM_FILE
        if not norm_file.is_file():
            raise CheckpointError(f"{path}: {_FINAL_NORM_FILE} is missing; the xFT directory is incomplete.")
        hidden, rest = divmod(norm_file.stat().st_size, esize)
        if rest or not hidden:
            raise CheckpointError(f"{norm_file} holds {norm_file.stat().st_size} bytes, not a whole number of "
                                  f"{sec.get('weight_data_type', 'fp16')} values; the file is truncated.")
        if "hidden_size" in sec and int(sec["hidden_size"]) != hidden:
            raise CheckpointError(f"{path}: config.ini says hidden_size {sec['hidden_size']} but the final norm holds "
                                  f"{hidden} values; config and tensors disagree.")
        qsym = sec.get("quant_scheme")
        embed = _read_bin(path / _EMBEDDING_FILE, fdtype, (vocab, hidden))
        final_norm = _read_bin(norm_file, fdtype, (hidden,))
        lm_head = _read_bin(path / _LM_HEAD_FILE, fdtype, (vocab, hidden))
        same = torch.equal(lm_head, embed)
        config = self._config(path, mtype, sec, hidden, heads, kv, head_dim, inter, layers, vocab, same)
        tied = _get(config, "tie_word_embeddings", False)
        if tied and not same:
            raise CheckpointError(f"{path}: config.json ties lm_head to the embeddings but {_LM_HEAD_FILE} "
                                  f"differs from {_EMBEDDING_FILE}; config and tensors disagree.")
        adapter = family(config)
        if _layout_refusal(adapter, config):
            raise CheckpointError(f"{path}: model type {_get(config, 'model_type')!r} has no xFT layout lowbit reads "
                                  f"({', '.join(MODEL_TYPES)}).")
        floats: dict[str, torch.Tensor] = {f"{adapter.embedding}.weight": embed, f"{adapter.final_norm}.weight": final_norm}
        if not tied:
            floats[f"{adapter.lm_head}.weight"] = lm_head
        matrices, norms, shapes = _matrices(adapter, config), _norms(adapter, config), linear_shapes(adapter, config)
        out_sizes = {stem: tuple(shapes[leaf][0] for leaf in leaves) for stem, leaves in matrices.items()}
        in_sizes = {stem: shapes[leaves[0]][1] for stem, leaves in matrices.items()}
        raw: dict[str, tuple] = {}
        for L in range(layers):
            pre, files = adapter.layer_prefix(L), _LAYER_FILES.format(L)
            for stem in matrices:
                raw[(pre, stem)] = self._read_matrix(path, files + stem, bits, in_sizes[stem], out_sizes[stem], fdtype)
            for name, stem in norms.items():
                floats[pre + name] = _read_bin(path / f"{files}{stem}.bin", fdtype, (hidden,))
        all_zeros = torch.cat([r[2] for r in raw.values()])
        mid = 1 << (bits - 1)
        sym = (qsym == "sym") if qsym in ("sym", "asym") else bool((all_zeros == mid).all())
        scheme = QuantScheme(bits=bits, group_size=-1, sym=sym)
        qweights = {}
        for (pre, stem), (codes, scales, zeros, bias, splits) in raw.items():
            col = 0
            for leaf, n in zip(matrices[stem], splits):
                b = None if bias is None else bias[col:col + n].clone()
                qw = QuantizedWeight(codes=codes[col:col + n].contiguous(), scales=scales[col:col + n, None].contiguous(),
                                     zeros=zeros[col:col + n, None].contiguous(), scheme=scheme, bias=b)
                check_sym_zeros(qw, f"{path}: {pre}{leaf}")
                qweights[pre + leaf] = qw
                col += n
        strip_quantization_config(config)
        qmodel = QuantizedModel(config, scheme, qweights, floats, manifest={"source": {"format": "xft", "path": str(path)}},
                                adapter=adapter)
        qmodel.tokenizer, qmodel.generation_config = load_extras(path)
        return qmodel

    def _read_matrix(self, path: Path, key: str, bits: int, k: int, splits: tuple[int, ...], fdtype):
        n = sum(splits)
        base = path / key
        if bits == 4:
            if n % 2:
                raise CheckpointError(f"{path}: {key} has odd width {n}; uint4 needs pairs of columns.")
            packed = _read_bin(base.with_name(base.name + ".qweight.0.bin"), torch.uint8, (k, n // 2))
            codes = torch.empty(k, n, dtype=torch.uint8)
            codes[:, 0::2] = packed & 0xF
            codes[:, 1::2] = packed >> 4
        else:
            raw = _read_bin(base.with_name(base.name + ".qweight.0.bin"), torch.int8, (k, n))
            codes = (raw.to(torch.int16) + 128).to(torch.uint8)
        s = _read_bin(base.with_name(base.name + ".scales.0.bin"), torch.float32, (n,))
        zf = _read_bin(base.with_name(base.name + ".zeros.0.bin"), torch.float32, (n,))
        s16 = s.half()
        if not torch.equal(s16.float(), s) or not torch.isfinite(s).all():
            raise CheckpointError(f"{path}: {key} scales are not float16 values widened to fp32; lowbit holds fp16 "
                                  "scales exactly and cannot read them bit-exactly.")
        offset = 0 if bits == 4 else 128
        zero_s = s == 0
        ratio = torch.where(zero_s, torch.zeros_like(zf), -zf / torch.where(zero_s, torch.ones_like(s), s))
        z = torch.round(ratio)
        if bool((zero_s & (zf != 0)).any()):
            raise CheckpointError(f"{path}: {key} has a zero scale with a non-zero offset; not an s·(q−z) weight.")
        z = torch.where(zero_s, torch.full_like(z, (1 << (bits - 1)) - offset), z) + offset
        maxq = (1 << bits) - 1
        if bool(((ratio - torch.round(ratio)).abs() > 1e-2).any()) or bool(((z < 0) | (z > maxq)).any()):
            raise CheckpointError(f"{path}: {key} zeros are not −scale·z for integer z in [0, {maxq}]; "
                                  "config.ini and the tensors disagree or the file is not an xFT export.")
        bias = None
        bias_file = base.with_name(base.name + ".bias.0.bin")
        if bias_file.is_file():
            bias = _read_bin(bias_file, fdtype, (n,))
        return codes.t().contiguous(), s16, z.to(torch.uint8), bias, splits

    def _config(self, path, mtype, sec, hidden, heads, kv, head_dim, inter, layers, vocab, tied):
        if (path / "config.json").is_file():
            config = load_config(path)
            ini = {"num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": inter,
                   "num_hidden_layers": layers, "vocab_size": vocab, "hidden_size": hidden}
            for key, v in ini.items():
                have = _get(config, key)
                if key == "num_key_value_heads" and have is None:
                    have = _get(config, "num_attention_heads")
                if have != v:
                    raise CheckpointError(f"{path}: config.json {key}={have} but config.ini/tensors give {v}; "
                                          "config and tensors disagree.")
            return config
        from transformers import AutoConfig

        if mtype not in MODEL_TYPES:
            raise CheckpointError(f"{path}/config.ini section [{mtype}] is not a model type lowbit reads "
                                  f"({', '.join(MODEL_TYPES)}).")
        kw = dict(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                  intermediate_size=inter, num_hidden_layers=layers, vocab_size=vocab,
                  max_position_embeddings=int(sec.get("max_pos_seq_len", 2048)),
                  rms_norm_eps=float(sec.get("layernorm_eps", 1e-6)), hidden_act=sec.get("activation_type", "silu"),
                  rope_theta=float(sec.get("rope_theta", 10000.0)), tie_word_embeddings=tied)
        for key, ikey in (("bos_token_id", "start_id"), ("eos_token_id", "end_id"), ("pad_token_id", "pad_id")):
            if ikey in sec:
                kw[key] = int(sec[ikey])
        return AutoConfig.for_model(mtype, **kw)

    def inspect(self, path: Path) -> dict:
        qm = self.read(Path(path))
        _, sec = self._ini(Path(path))
        s = qm.scheme
        return {
            "format": "xft", "version": sec.get("quant_qweight_data_type"),
            "weight_data_type": sec.get("weight_data_type"), "scheme": s.to_dict(), "modules": len(qm.qweights),
            "runtimes": {
                "xFT": "yes" if "rope_theta" in sec else "yes, but config.ini lacks rope_theta (xFT then uses 10000)",
                "lowbit": "yes",
                "vLLM": "no: vLLM reads HF safetensors checkpoints, not xFT .bin directories",
                "transformers+gptqmodel": "no: transformers cannot load xFT .bin directories; export autoawq or gptq",
                "AutoAWQ": "no: AutoAWQ reads only AWQ safetensors checkpoints",
            },
        }
