"""The native decoder: a whole Llama/Mistral/Qwen2/Qwen3 model per call in C (``csrc/engine.c``).

``NativeDecoder(qmodel, dtype)`` packs the checkpoint's int4 weights straight into the kernels' nib64
layout (q/k/v rows written into one preallocated matrix, gate/up into another), keeps the norms, the
embedding and the float lm_head (bf16 as stored; another dtype cast to the activations', block by block), and
allocates the KV cache for the positions a request needs (``reset(n)``), not the model's
context. A lazily read lowbit checkpoint (``read_checkpoint(path, lazy=True)``) is converted a block of rows
at a time from its packed codes on disk (:class:`lowbit.checkpoint.StoredWeight`): no matrix is ever held
unpacked, and no float copy of a quantized weight is made, so the peak is the packed weights plus a few MB.
``forward(ids)`` runs the tokens at the next positions in
one native call (one OpenMP team for every layer), returning fp32 logits; ``reset()`` empties the cache.

Activations: ``float32`` runs float FMAs on fp32 activations (the reference-exact path, the fp32
transformers path within 1e-4); ``bfloat16`` rounds each linear's input to int8 per 64 columns, as
``cpu.vnni_int4`` does (VPDPBUSD on AVX-512 VNNI, VPMADDUBSW on AVX2, same sums), while the residual
stream, norms, attention and KV cache stay fp32. :func:`unsupported` says why a checkpoint cannot run here.
"""

from __future__ import annotations

import ctypes
import importlib

import torch

from lowbit.errors import LowbitError
from lowbit.run.nn import EMBEDDINGS
from lowbit.run.runtime import Runtime

from . import cpuinfo, native

FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3"}
ACT_MODES = {torch.float32: 0, torch.bfloat16: 1}
HEAD_F32, HEAD_BF16, HEAD_INT4, HEAD_INT8 = 0, 1, 2, 3
EMBED_INT8 = 2  # Model.embed_bf16: embed points to a QMat of int8 rows (csrc/engine.c embed_int8_row)
GEMM_ROWS, GEMM_AMX = 0, 1  # Model.gemm: int8-activation prompt chunks on the row kernels or the AMX tiles
MAX_GROUPS = 1024  # per weight row (csrc/engine.c)
CHUNK = 512  # prompt tokens per native call (bounds the scratch; weights are read, and unpacked for AMX, once per chunk)

_I = ctypes.c_int64
_P = ctypes.c_void_p


class QMat(ctypes.Structure):
    _fields_ = [("n", _I), ("k", _I), ("group", _I), ("packed", _P), ("scales", _P), ("zeros", _P), ("bias", _P)]


class Layer(ctypes.Structure):
    _fields_ = [("qkv", QMat), ("o", QMat), ("gu", QMat), ("down", QMat), ("in_norm", _P), ("post_norm", _P),
                ("q_norm", _P), ("k_norm", _P)]


class Model(ctypes.Structure):
    _fields_ = [("hidden", _I), ("n_layers", _I), ("n_heads", _I), ("n_kv", _I), ("head_dim", _I), ("inter", _I),
                ("vocab", _I), ("capacity", _I), ("window", _I), ("eps", ctypes.c_float),
                ("attn_scale", ctypes.c_float), ("act_mode", ctypes.c_int), ("head_kind", ctypes.c_int),
                ("embed_bf16", ctypes.c_int), ("gemm", ctypes.c_int), ("embed", _P), ("head", _P), ("head_q", QMat),
                ("final_norm", _P), ("cos", _P), ("sin", _P), ("layers", ctypes.POINTER(Layer)), ("kcache", _P),
                ("vcache", _P), ("prof", _P)]


#: the ops :meth:`NativeDecoder.profile` times (csrc/engine.c PROF_*); "norm" is both RMSNorms of every layer
PROFILE_OPS = ("embedding", "norm", "qkv", "rope+kv", "attention", "attn out+residual", "gate/up", "silu*up",
               "down+residual", "final norm+lm_head")


def _get(config, key, default=None):
    v = getattr(config, key, default)
    return default if v is None else v


def _rope_params(config) -> dict:
    return dict(_get(config, "rope_parameters", None) or _get(config, "rope_scaling", None) or {})


def head_dim(config) -> int:
    return int(_get(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


#: the roles (lowbit.models.LAYER_ROLES) of the seven linears the native decoder runs per layer
LINEAR_ROLES = ("q", "k", "v", "o", "gate", "up", "down")


def _adapter(qmodel):
    """The family adapter that names the checkpoint's modules (the one it carries, else the installed one's)."""
    from lowbit.exporting import with_adapter

    return with_adapter(qmodel).adapter


def _layer_names(adapter, config, i: int) -> dict[str, str]:
    """Role → module path of decoder layer ``i``'s seven linears, as the family adapter names them."""
    roles = adapter.layer_roles(config)
    return {r: adapter.layer_prefix(i) + roles[r] for r in LINEAR_ROLES}


def _weight(qmodel, name: str):
    """The quantized linear ``name``: a :class:`lowbit.checkpoint.StoredWeight` (codes still on disk) where the
    checkpoint was read lazily, else the QuantizedWeight; both give scheme, shapes, scales, zeros, g_idx, bias."""
    stored = getattr(qmodel.qweights, "stored", None)
    return stored(name) if stored is not None else qmodel.qweights[name]


def _code_rows(w):
    """``w``'s uint8 codes in blocks of rows (a StoredWeight reads and unpacks them block by block)."""
    if hasattr(w, "code_rows"):
        return w.code_rows()
    return (w.codes[r:r + 1024] for r in range(0, w.out_features, 1024))


def wants_vnni() -> bool:
    return native.vnni_unavailable_reason() is None


def unsupported(qmodel, dtype: torch.dtype, lm_head: str = "float", embedding: str = "float") -> str | None:
    """None when the native decoder runs this checkpoint here, else the one-line reason why not."""
    reason = native.unavailable_reason()
    if reason is not None:
        return reason
    config = qmodel.config
    mt = getattr(config, "model_type", None)
    if mt not in FAMILIES:
        return f"model type {mt!r} is not one of the native decoder's families ({', '.join(FAMILIES)})"
    if dtype not in ACT_MODES:
        return f"activations {str(dtype).replace('torch.', '')}: the native decoder runs fp32 or bf16"
    adapter = _adapter(qmodel)
    roles = adapter.layer_roles(config) if adapter is not None else {}
    if not set(LINEAR_ROLES) | {"attn_norm", "mlp_norm"} <= set(roles):
        return "the family adapter does not name the roles the native decoder needs"
    if _get(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}: the native decoder runs SiLU MLPs"
    if _get(config, "use_sliding_window", False) or "sliding_attention" in (_get(config, "layer_types", None) or []):
        return "per-layer sliding-window attention is not in the native decoder"
    rope_type = _rope_params(config).get("rope_type", _rope_params(config).get("type", "default"))
    if rope_type in ("dynamic", "longrope"):
        return f"rope scaling {rope_type!r} depends on the sequence length; not in the native decoder"
    if config.num_attention_heads % config.num_key_value_heads:
        return "attention heads are not a multiple of the KV heads"
    if head_dim(config) % 2:
        return "odd head_dim"
    if lm_head == "int8" and not wants_vnni():
        return "an int8 lm_head needs AVX-512 VNNI in the native decoder"
    if lm_head in ("int8", "int4") and config.hidden_size % 64:
        return f"a quantized lm_head needs hidden_size % 64 == 0, got {config.hidden_size}"
    if embedding not in EMBEDDINGS:
        return f"embedding {embedding!r} is not one of {', '.join(EMBEDDINGS)}"
    if embedding == "int8" and lm_head == "float" and adapter.lm_head not in qmodel.qweights and (
            bool(_get(config, "tie_word_embeddings", False)) or adapter.lm_head + ".weight" not in qmodel.float_tensors):
        return "an int8 embedding with the tied float lm_head would keep the float table too; add --lm-head int8"
    n = int(config.num_hidden_layers)
    expected = {name for i in range(n) for name in _layer_names(adapter, config, i).values()}
    extra = set(qmodel.qweights) - expected - {adapter.lm_head}
    if extra:
        return f"quantized modules outside the decoder layers' seven linears, e.g. {sorted(extra)[0]}"
    missing = expected - set(qmodel.qweights)
    if missing:
        return f"the native decoder needs every layer's seven linears quantized; {sorted(missing)[0]} is float"
    facts = {name: _weight(qmodel, name) for name in qmodel.qweights}  # scales, zeros, g_idx: codes not read
    for name, qw in facts.items():
        s = qw.scheme
        if s.bits != 4:
            return f"{name} is {s.bits}-bit; the native decoder runs 4-bit weights"
        if qw.in_features % 64:
            return f"{name}: in_features {qw.in_features} is not a multiple of 64"
        gs = s.group_width(qw.in_features)
        if gs % 64 or qw.in_features % gs:
            return f"{name}: group size {s.group_size}; the native decoder needs groups of 64, 128 or per channel"
        if qw.in_features // gs > MAX_GROUPS:
            return f"{name}: more than {MAX_GROUPS} groups per row"
        if qw.scales.dtype != torch.float16 and not torch.equal(qw.scales.half().to(qw.scales.dtype), qw.scales):
            return f"{name}: scales are not float16 values (the native decoder stores them as fp16)"
        if not qw.has_trivial_g_idx():
            return f"{name} has act-order (g_idx); the native decoder needs columns in group order"
    for i in range(n):
        names = _layer_names(adapter, config, i)
        for fused in (("q", "k", "v"), ("gate", "up")):
            gs = {facts[names[x]].scheme.group_size for x in fused}
            if len(gs) > 1:
                return f"layer {i}: {'/'.join(fused)} have different group sizes"
    return None


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the system (glibc ``malloc_trim``; nothing elsewhere). Reading a
    checkpoint frees many buffers of a few MB; glibc keeps such freed memory in the heap, so without this the
    resident set would carry the reads' garbage beside the packed weights."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)


#: bytes of a float table read per block while it is cast (a lazily read checkpoint's embedding and lm_head)
TABLE_CHUNK_BYTES = 4 * 1024**2


def _table(ft, name: str, dtype: torch.dtype) -> torch.Tensor:
    """A float table (embedding, lm_head) as the engine reads it: bf16 as stored (the engine widens it to fp32
    exactly, so fp32 activations give the sums of an fp32 copy), any other dtype cast to the activation
    ``dtype`` (fp32 stays fp32 for fp32 activations). From a lazily read checkpoint it is read and cast a block
    of rows at a time into its destination (never the stored table and its cast copy at once)."""
    chunked = getattr(ft, "chunked", None)
    if chunked is None:
        t = ft[name]
        return (t if t.dtype == torch.bfloat16 else t.to(dtype)).contiguous()
    src = chunked(name, chunk_bytes=TABLE_CHUNK_BYTES)
    out = torch.empty(src.shape, dtype=torch.bfloat16 if src.dtype == torch.bfloat16 else dtype)
    r = 0
    for block_ in src.chunks():
        out[r:r + block_.shape[0]] = block_
        r += block_.shape[0]
    return out


def _fuse(qws) -> tuple[QMat, list[torch.Tensor]]:
    """One QMat over the rows of several quantized linears with the same input (QuantizedWeights or
    StoredWeights), each written into its rows of preallocated tensors (no concatenated copies), its codes
    converted to nib64 a block of rows at a time (and its tensors, kept alive)."""
    k = qws[0].in_features
    gs = qws[0].scheme.group_width(k)
    n = sum(q.out_features for q in qws)
    ng = qws[0].scales.shape[1]
    packed = torch.empty(n, k // 2, dtype=torch.uint8)
    scales = torch.empty(n, ng, dtype=torch.float16)
    zeros = torch.empty(n, ng, dtype=torch.uint8)
    bias = torch.zeros(n, dtype=torch.float32) if any(q.bias is not None for q in qws) else None
    r0 = 0
    for q in qws:
        r = r0
        for codes in _code_rows(q):
            packed[r:r + codes.shape[0]] = native.pack_nibbles(codes)
            r += codes.shape[0]
        if r != r0 + q.out_features:
            raise LowbitError(f"native decoder: {q.out_features} rows expected, {r - r0} codes rows read.")
        scales[r0:r] = q.scales
        zeros[r0:r] = q.zeros
        if q.bias is not None:
            bias[r0:r] = q.bias
        r0 = r
    keep = [packed, scales, zeros] + ([bias] if bias is not None else [])
    m = QMat(packed.shape[0], k, gs, packed.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
             None if bias is None else bias.data_ptr())
    return m, keep


class NativeDecoder(Runtime):
    """The checkpoint in the native decoder's layout, with a KV cache of ``capacity`` positions: the
    ``native`` runtime (:class:`lowbit.Runtime`) of ``--runtime``.

    :param qmodel: a QuantizedModel that :func:`unsupported` accepts.
    :param dtype: ``torch.float32`` (fp32 activations) or ``torch.bfloat16`` (int8 activations per 64 columns).
    :param lm_head: ``float`` (the checkpoint's, in ``dtype``), ``int4`` (g64 RTN) or ``int8`` (per channel,
        AVX-512 VNNI only), quantized at load time as ``lowbit.run.nn.quantize_lm_head`` does.
    :param embedding: ``float`` (bf16 as stored, else in ``dtype``) or ``int8`` (opt-in: per-row symmetric int8
        codes, the int8 lm_head's quantization, a quarter of fp32's bytes; with a tied ``int8`` lm_head the two are
        one table), looked up and decoded to fp32 per token.
    :param capacity: KV cache positions to allocate now (0: none until :meth:`reset` is given a size, as
        :func:`lowbit.run.engine.generate` does from each request).
    :param consume: take each layer's weights out of ``qmodel.qweights`` once packed, so the unpacked codes
        (1 byte per weight) are freed layer by layer instead of living beside the packed copy until the end
        (a lazily read checkpoint holds none: its codes are read from disk as they are converted).
    """

    name = "native"
    priority = 10

    @classmethod
    def unsupported(cls, qmodel, dtype, lm_head: str = "float", embedding: str = "float") -> str | None:
        return unsupported(qmodel, dtype, lm_head, embedding)

    def __init__(self, qmodel, dtype: torch.dtype = torch.bfloat16, lm_head: str = "float", capacity: int = 256,
                 consume: bool = False, embedding: str = "float"):
        reason = unsupported(qmodel, dtype, lm_head, embedding)
        if reason is not None:
            raise LowbitError(f"native decoder: {reason}.")
        release_free_heap()  # what reading and verifying the checkpoint freed, before the weights are allocated
        self.config = c = qmodel.config
        self.dtype = dtype
        self.vnni = wants_vnni()
        self.lib = native.engine_library(self.vnni)
        self.keep: list[torch.Tensor] = []
        ft = qmodel.float_tensors
        n = int(c.num_hidden_layers)
        adapter = _adapter(qmodel)
        roles = adapter.layer_roles(c)
        self.layers = (Layer * n)()
        for i in range(n):
            names = _layer_names(adapter, c, i)
            lay = self.layers[i]
            for field, parts in (("qkv", ("q", "k", "v")), ("o", ("o",)), ("gu", ("gate", "up")), ("down", ("down",))):
                m, keep = _fuse([_weight(qmodel, names[x]) for x in parts])
                setattr(lay, field, m)
                self.keep += keep
            if consume and isinstance(qmodel.qweights, dict):
                for path in names.values():
                    del qmodel.qweights[path]
            p = adapter.layer_prefix(i)
            lay.in_norm = self._f32(ft[p + roles["attn_norm"] + ".weight"])
            lay.post_norm = self._f32(ft[p + roles["mlp_norm"] + ".weight"])
            qn, kn = (ft.get(p + roles[r] + ".weight") if r in roles else None for r in ("q_norm", "k_norm"))
            lay.q_norm = None if qn is None else self._f32(qn)
            lay.k_norm = None if kn is None else self._f32(kn)
        md = self.md = Model()
        md.hidden, md.n_layers = int(c.hidden_size), n
        md.n_heads, md.n_kv, md.head_dim = int(c.num_attention_heads), int(c.num_key_value_heads), head_dim(c)
        md.inter, md.vocab = int(c.intermediate_size), int(c.vocab_size)
        md.window = int(_get(c, "sliding_window", 0) or 0) if c.model_type == "mistral" else 0
        md.eps = float(_get(c, "rms_norm_eps", 1e-6))
        md.attn_scale = head_dim(c) ** -0.5
        md.act_mode = ACT_MODES[dtype]
        self.amx = self.vnni and dtype == torch.bfloat16 and native.amx_unavailable_reason() is None
        md.gemm = GEMM_AMX if self.amx else GEMM_ROWS
        md.layers = self.layers
        emb_name, head_name = adapter.embedding + ".weight", adapter.lm_head + ".weight"
        tied = bool(_get(c, "tie_word_embeddings", False)) or head_name not in ft
        md.final_norm = self._f32(ft[adapter.final_norm + ".weight"])
        emb = None
        if embedding == "float":
            emb = _table(ft, emb_name, dtype)
            self.keep.append(emb)
            md.embed, md.embed_bf16 = emb.data_ptr(), int(emb.dtype == torch.bfloat16)
        if adapter.lm_head in qmodel.qweights:
            m, keep = _fuse([_weight(qmodel, adapter.lm_head)])
            md.head_kind, md.head_q = HEAD_INT4, m
            self.keep += keep
        elif lm_head == "float":
            hw = emb if tied else _table(ft, head_name, dtype)
            self.keep.append(hw)
            md.head, md.head_kind = hw.data_ptr(), HEAD_BF16 if hw.dtype == torch.bfloat16 else HEAD_F32
        else:
            md.head_kind, md.head_q = self._quant_table(ft, emb_name if tied else head_name, lm_head, emb if tied else None)
        if embedding == "int8":
            if tied and lm_head == "int8":  # one int8 table serves both
                md.embed = ctypes.addressof(md) + Model.head_q.offset
            else:
                self._emb_q = self._quant_table(ft, emb_name, "int8")[1]
                md.embed = ctypes.addressof(self._emb_q)
            md.embed_bf16 = EMBED_INT8
        # the embedding's bytes a decode step does not read (none where the lm_head reads the same table)
        shared = tied and adapter.lm_head not in qmodel.qweights and lm_head == embedding
        self._emb_unread = 0 if shared else md.vocab * md.hidden * (1 if emb is None else emb.element_size())
        self.lm_head, self.embedding = lm_head, embedding
        self.capacity = 0
        self.slots = 1
        self.past = [0]  # positions filled, per cache slot
        self._scratch = torch.empty(0, dtype=torch.uint8)
        self._scratch_key = None
        self.kcache = self.vcache = None
        if capacity:
            self.reset(capacity)

    def _f32(self, t: torch.Tensor) -> int:
        t = t.float().contiguous()
        self.keep.append(t)
        return t.data_ptr()

    def _quant_table(self, ft, name: str, mode: str, table: torch.Tensor | None = None):
        """(head kind, QMat) of the float table ``name`` (lm_head or embedding) quantized at load time as
        ``lowbit.run.nn.quantize_lm_head`` does (:data:`lowbit.run.nn.LM_HEAD_SCHEMES`: rows are quantized
        independently), a block of rows at a time into preallocated codes: from ``table`` where it is already
        in memory, else from the checkpoint (a lazily read one in blocks, never the whole float table)."""
        from lowbit.primitives import quantize
        from lowbit.run.nn import LM_HEAD_SCHEMES
        from lowbit.scheme import QuantScheme

        bits, gs, sym = LM_HEAD_SCHEMES[mode]
        scheme = QuantScheme(bits, gs, sym=sym)
        chunked = getattr(ft, "chunked", None)
        if table is None and chunked is not None:
            src = chunked(name, chunk_bytes=TABLE_CHUNK_BYTES)
            (n, k), blocks = src.shape, src.chunks()
        else:
            t = ft[name] if table is None else table
            (n, k), blocks = t.shape, (t[i:i + 1024] for i in range(0, t.shape[0], 1024))  # 8 MB of fp32 at hidden 2048
        ng = scheme.num_groups(k)
        packed = torch.empty(n, k // 2 if bits == 4 else k, dtype=torch.uint8)
        scales = torch.empty(n, ng, dtype=torch.float16)
        zeros = torch.empty(n, ng, dtype=torch.uint8)
        r = 0
        for block_ in blocks:
            q = quantize(block_.float(), scheme)
            rows = slice(r, r + block_.shape[0])
            packed[rows] = native.pack_nibbles(q.codes) if bits == 4 else q.codes
            scales[rows], zeros[rows] = q.scales, q.zeros
            r += block_.shape[0]
        self.keep += [packed, scales, zeros]
        m = QMat(n, k, scheme.group_width(k), packed.data_ptr(), scales.data_ptr(), zeros.data_ptr(), None)
        return (HEAD_INT4 if bits == 4 else HEAD_INT8), m

    # ------------------------------------------------------------------------------------------------
    def _rope_table(self, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin ``[capacity, head_dim/2]`` from the family's own transformers rotary module (so rope_theta
        and rope scaling such as llama3's are exactly transformers')."""
        mt = self.config.model_type
        mod = importlib.import_module(f"transformers.models.{mt}.modeling_{mt}")
        rot = getattr(mod, f"{FAMILIES[mt]}RotaryEmbedding")(config=self.config)
        pos = torch.arange(capacity)[None]
        with torch.no_grad():
            cos, sin = rot(torch.zeros(1, dtype=torch.float32), pos)
        h = self.md.head_dim // 2
        return cos[0, :, :h].float().contiguous(), sin[0, :, :h].float().contiguous()

    @property
    def n_past(self) -> int:
        """Positions filled in slot 0 (the one sequence of :meth:`forward` without ``slot``)."""
        return self.past[0]

    def reset(self, capacity: int | None = None, slots: int | None = None) -> None:
        """Empty the KV cache; with ``capacity`` (positions per sequence) or ``slots`` (sequences, for
        :meth:`forward_rows`), (re)allocate it for that many."""
        capacity = self.capacity if capacity is None else capacity
        slots = self.slots if slots is None else slots
        if slots < 1:
            raise LowbitError(f"the KV cache needs at least 1 sequence slot, got {slots}.")
        self.past = [0] * slots
        if capacity == self.capacity and slots == self.slots and (self.kcache is not None or capacity == 0):
            return
        if capacity < 1:
            raise LowbitError(f"KV cache capacity must be at least 1 position, got {capacity}.")
        md = self.md
        shape = (slots, md.n_layers, md.n_kv, capacity, md.head_dim)
        md.capacity = self.capacity = 0  # the old cache goes before the new one is allocated
        self.kcache = self.vcache = None
        self.kcache = torch.zeros(shape, dtype=torch.float32)
        self.vcache = torch.zeros(shape, dtype=torch.float32)
        if getattr(self, "cos", None) is None or self.cos.shape[0] != capacity:
            self.cos, self.sin = self._rope_table(capacity)
        md.kcache, md.vcache = self.kcache.data_ptr(), self.vcache.data_ptr()
        md.cos, md.sin = self.cos.data_ptr(), self.sin.data_ptr()
        md.capacity = self.capacity = capacity
        self.slots = slots
        self._scratch_key = None

    def weight_bytes(self) -> int:
        """Bytes of every tensor the decoder holds except the KV cache (each storage once)."""
        seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self.keep}
        return sum(seen.values())

    def streamed_bytes(self) -> int:
        """Bytes read per decode step: all weights but the embedding table, unless it is the lm_head too."""
        return self.weight_bytes() - self._emb_unread

    def cache_bytes(self) -> int:
        return 2 * self.kcache.numel() * 4 if self.kcache is not None else 0

    def _ids(self, ids) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.int32).reshape(-1).contiguous()
        if ids.numel() == 0:
            raise LowbitError("native decoder: no tokens to run.")
        if int(ids.min()) < 0 or int(ids.max()) >= self.md.vocab:
            raise LowbitError(f"token id out of range 0..{self.md.vocab - 1}.")
        return ids

    def _scratch_for(self, rows: int, threads: int) -> int:
        """The scratch of a call with ``rows`` rows on ``threads`` threads (grown, kept between calls)."""
        if self._scratch_key is None or self._scratch_key[0] < rows or self._scratch_key[1] != threads:
            self._scratch = torch.empty(self.lib.lowbit_engine_scratch_bytes(ctypes.byref(self.md), rows, threads) + 64,
                                        dtype=torch.uint8)
            self._scratch_key = (rows, threads)
        return self._scratch.data_ptr()

    def forward(self, ids, all_logits: bool = False, threads: int | None = None, slot: int = 0) -> torch.Tensor:
        """Run ``ids`` (a list or 1-D tensor of token ids) at the next positions of the sequence in cache ``slot``;
        fp32 logits ``[len(ids), vocab]`` with ``all_logits``, else ``[vocab]`` of the last token."""
        ids = self._ids(ids)
        m = ids.numel()
        if not 0 <= slot < self.slots:
            raise LowbitError(f"native decoder: sequence slot {slot} is not one of the {self.slots} allocated.")
        if self.past[slot] + m > self.capacity:
            raise LowbitError(f"{self.past[slot] + m} positions do not fit the KV cache of {self.capacity} "
                              f"(prompt and new tokens must fit; reset with a larger capacity).")
        threads = threads or torch.get_num_threads()
        out = torch.empty((m if all_logits else 1), self.md.vocab, dtype=torch.float32)
        for c0 in range(0, m, CHUNK):
            c1 = min(m, c0 + CHUNK)
            scratch = self._scratch_for(min(m, CHUNK), threads)
            dst = out[c0:c1] if all_logits else out
            last = all_logits or c1 == m
            rc = self.lib.lowbit_engine_forward(ctypes.byref(self.md), ids[c0:].data_ptr(), c1 - c0, self.past[slot],
                                                slot, dst.data_ptr() if last else self._scratch_logits(),
                                                int(all_logits), threads, scratch)
            if rc != 0:
                raise LowbitError("native decoder: positions do not fit the KV cache.")
            self.past[slot] += c1 - c0
        return out if all_logits else out[0]

    def forward_rows(self, ids, slots, threads: int | None = None) -> torch.Tensor:
        """Batched decode: token ``ids[i]`` at the next position of the sequence in cache slot ``slots[i]``, all
        in one call (the weights are read once for every sequence); fp32 logits ``[len(ids), vocab]``."""
        ids = self._ids(ids)
        slot_t = torch.as_tensor(slots, dtype=torch.int64).reshape(-1).contiguous()
        m = ids.numel()
        if slot_t.numel() != m or len(set(slot_t.tolist())) != m:
            raise LowbitError(f"native decoder: {m} tokens need {m} distinct sequence slots, got {slot_t.tolist()}.")
        if int(slot_t.min()) < 0 or int(slot_t.max()) >= self.slots:
            raise LowbitError(f"native decoder: sequence slots {slot_t.tolist()} are not all among the "
                              f"{self.slots} allocated.")
        pos = torch.tensor([self.past[i] for i in slot_t.tolist()], dtype=torch.int64)
        if int(pos.max()) >= self.capacity:
            raise LowbitError(f"{int(pos.max()) + 1} positions do not fit the KV cache of {self.capacity} "
                              f"(prompt and new tokens must fit; reset with a larger capacity).")
        threads = threads or torch.get_num_threads()
        out = torch.empty(m, self.md.vocab, dtype=torch.float32)
        for c0 in range(0, m, CHUNK):
            c1 = min(m, c0 + CHUNK)
            scratch = self._scratch_for(min(m, CHUNK), threads)
            rc = self.lib.lowbit_engine_forward_rows(ctypes.byref(self.md), ids[c0:].data_ptr(), c1 - c0,
                                                     pos[c0:].data_ptr(), slot_t[c0:].data_ptr(), out[c0:].data_ptr(),
                                                     threads, scratch)
            if rc != 0:
                raise LowbitError("native decoder: positions do not fit the KV cache.")
        for i in slot_t.tolist():
            self.past[i] += 1
        return out

    def profile(self, prompt_len: int = 128, steps: int = 16, threads: int | None = None) -> dict[str, float]:
        """Milliseconds per decode step spent in each op (:data:`PROFILE_OPS`, wall time of thread 0 between
        the team's barriers, so a phase includes waiting for the slowest thread), median-free mean over
        ``steps`` greedy steps after a ``prompt_len`` random prompt."""
        self.reset(max(self.capacity, prompt_len + steps + 1))
        ids = torch.randint(0, self.md.vocab, (prompt_len,), generator=torch.Generator().manual_seed(0))
        tok = int(self.forward(ids, threads=threads).argmax())
        acc = (ctypes.c_double * len(PROFILE_OPS))()
        self.md.prof = ctypes.cast(acc, _P).value
        try:
            for _ in range(steps):
                tok = int(self.forward([tok], threads=threads).argmax())
        finally:
            self.md.prof = None
        return {op: acc[i] * 1e3 / steps for i, op in enumerate(PROFILE_OPS)}

    def _scratch_logits(self) -> int:
        buf = getattr(self, "_discard", None)
        if buf is None:
            buf = self._discard = torch.empty(self.md.vocab, dtype=torch.float32)
        return buf.data_ptr()

    def describe(self) -> str:
        isa = "AVX-512 VNNI" if self.vnni else "AVX2"
        if self.md.gemm == GEMM_AMX:
            isa += ", AMX prompt"
        act = "fp32 activations" if self.dtype == torch.float32 else f"int8 activations ({isa})"
        return f"native decoder, {act}, lm_head {self.lm_head}" + (", embedding int8" if self.embedding == "int8" else "")


def cpu_summary() -> str:
    return cpuinfo.describe()
