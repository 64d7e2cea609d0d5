"""Helpers of the fuzz tests: run a read under a time and memory bound, fingerprint a file tree (to
show a command left its inputs as they were), and write a tiny GGUF file.

``bounded`` turns a hang into an exception (SIGALRM) and caps the address space for the duration
(a huge allocation then fails instead of swapping the machine), so that a fuzz property can say
"never a hang, never a huge allocation". Main thread, Linux only.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import signal
import stat
from collections.abc import Iterator
from pathlib import Path


class Hang(Exception):
    """A bounded call ran past its time limit."""


@contextlib.contextmanager
def bounded(seconds: int = 20, extra_bytes: int = 2 * 1024**3) -> Iterator[None]:
    """Raise Hang after ``seconds``; allow at most ``extra_bytes`` more address space meanwhile."""
    def on_alarm(signum, frame):
        raise Hang(f"the call took over {seconds} s")

    old_handler = signal.signal(signal.SIGALRM, on_alarm)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as fh:
        vm = int(fh.read().split()[0]) * resource.getpagesize()
    cap = vm + extra_bytes if hard == resource.RLIM_INFINITY else min(vm + extra_bytes, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        signal.signal(signal.SIGALRM, old_handler)


def tree_digest(path: Path | str, max_read: int = 256 * 1024**2) -> str:
    """sha256 of everything at ``path`` (a file, a directory tree, a symlink, a FIFO…): every entry's
    relative name, kind, mode, and a regular file's bytes or a link's target. Special files are not
    opened (a FIFO would block, /dev/zero never end), and a file over ``max_read`` bytes (a sparse
    "huge" file) is taken by its size, inode and change times instead of read. Equal digests before
    and after a command mean it changed nothing there."""
    h = hashlib.sha256()
    root = Path(path)

    def entry(p: Path, rel: str) -> None:
        st = os.lstat(p)
        h.update(f"{rel}\0{stat.S_IFMT(st.st_mode)}\0{stat.S_IMODE(st.st_mode)}\0".encode())
        if stat.S_ISLNK(st.st_mode):
            h.update(os.readlink(p).encode())
        elif stat.S_ISREG(st.st_mode) and st.st_size > max_read:
            h.update(f"{st.st_size}\0{st.st_ino}\0{st.st_mtime_ns}\0{st.st_ctime_ns}".encode())
        elif stat.S_ISREG(st.st_mode):
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        elif stat.S_ISDIR(st.st_mode):
            for child in sorted(os.listdir(p)):
                entry(p / child, f"{rel}/{child}")

    if os.path.lexists(root):
        entry(root, ".")
    return h.hexdigest()


def write_tiny_gguf(path: Path | str, hidden: int = 64, inter: int = 128, heads: int = 2, kv_heads: int = 1,
                    layers: int = 1, seed: int = 0) -> Path:
    """A seeded random float32 llama with a byte-level BPE tokenizer as a GGUF file (needs ``gguf``)."""
    import json

    import gguf
    import numpy as np

    from .models import tiny_tokenizer

    tok = tiny_tokenizer(256)
    tokens = [t for t, _ in sorted(tok.get_vocab().items(), key=lambda kv: kv[1])]
    merges = json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]
    vocab, head_dim = len(tokens), hidden // heads
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(inter)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * vocab)
    w.add_token_scores([0.0] * vocab)
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,), "output.weight": (vocab, hidden)}
    for i in range(layers):
        shapes.update({f"blk.{i}.attn_norm.weight": (hidden,), f"blk.{i}.ffn_norm.weight": (hidden,),
                       f"blk.{i}.attn_q.weight": (heads * head_dim, hidden),
                       f"blk.{i}.attn_k.weight": (kv_heads * head_dim, hidden),
                       f"blk.{i}.attn_v.weight": (kv_heads * head_dim, hidden),
                       f"blk.{i}.attn_output.weight": (hidden, heads * head_dim),
                       f"blk.{i}.ffn_gate.weight": (inter, hidden), f"blk.{i}.ffn_up.weight": (inter, hidden),
                       f"blk.{i}.ffn_down.weight": (hidden, inter)})
    for name, shape in shapes.items():
        w.add_tensor(name, (rng.standard_normal(shape) * 0.02).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return Path(path)
