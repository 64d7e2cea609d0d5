"""lowbit (native decoder and transformers modules) against llama.cpp Q4_0/Q4_1 and bf16 transformers.

    python benchmarks/cpu/bench_llamacpp.py                           # 1 thread, CPU clock (RESULTS.md)
    python benchmarks/cpu/bench_llamacpp.py --threads 2 --clock wall  # both cores, wall clock
    python benchmarks/cpu/bench_llamacpp.py --models demo             # one model
    python benchmarks/cpu/bench_llamacpp.py --models llama-2-7b-shape --prompt-lens 128,1024 --schemes g64-asym \
        --runtime native --lm-heads float --gguf-types Q4_0 --new-tokens 16,8   # the 7B rows of RESULTS.md

Models: ``demo`` (SmolLM2-135M, the demo model; its float weights as lowbit converts them) and two synthetic
shapes with random N(0, 0.02) weights written once under ``--out`` (bf16 safetensors, one tensor at a time, so
the 7B shape never needs its 13 GB in memory) and the demo model's tokenizer (49152 tokens, which llama.cpp's
converter knows): ``llama-3.2-1b-shape`` (hidden 2048, 16 layers, 32 heads / 8 KV heads, MLP 8192, tied
embeddings, rope_theta 500000 with llama3 scaling) and ``llama-2-7b-shape`` (hidden 4096, 32 layers, 32 heads,
MLP 11008, untied, rope_theta 10000).

From the same float weights: lowbit W4 at each ``--schemes`` entry (``g64-asym``: group 64 asymmetric;
``g32-sym``: group 32 symmetric, Q4_0's bits) by GPTQ for the demo model and RTN for the random ones, with the
float lm_head and with the lm_head quantized to int8 at load time, each on the native decoder and on the
transformers modules (``lowbit bench --runtime both``; ``--runtime``, ``--lm-heads`` and ``--gguf-types`` pick
fewer rows where a model is too large to run them all); the weights dequantized to bf16 in plain
transformers; llama.cpp (llama-cpp-python) on Q4_0 and Q4_1 GGUFs that llama.cpp's own tools make:
``convert_hf_to_gguf.py`` from llama-cpp-python's sdist (downloaded once with pip into ``--out``; it imports
``sentencepiece`` before it falls back to the tokenizer.json vocabulary, so install that too) writes F16,
``llama_cpp.llama_model_quantize`` writes Q4_0 and Q4_1 with llama.cpp's default choices for the other
tensors. Prompts of each ``--prompt-lens`` length (random tokens), 64 greedy decode steps after the shortest
prompt and 8 after longer ones, batch 1, median of ``--repeat`` runs, each row in its own child process;
perplexity (demo only) on the same 4 WikiText-2 test windows of 512 tokens for every row. Each table goes to
``benchmarks/cpu/llamacpp-<model>[-<scheme>][-p<prompt>]-<clock>-<threads>thread.json`` and stdout, with
``uptime`` before and after (the machine is shared).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

LLAMA_CPP_VERSION = "0.3.36"
HERE = Path(__file__).parent


def sh(cmd, **kw):
    print("+", " ".join(str(c) for c in cmd), file=sys.stderr, flush=True)
    return subprocess.run([str(c) for c in cmd], check=True, **kw)


def demo_dir() -> Path:
    from lowbit.loading import resolve, resolve_local

    return resolve_local(resolve("demo"))


#: the synthetic shapes (LlamaConfig fields); the vocabulary is the demo tokenizer's
SHAPES = {
    "llama-3.2-1b-shape": dict(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, tie_word_embeddings=True,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "llama-2-7b-shape": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, head_dim=128, max_position_embeddings=4096, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
}
#: W4 schemes of the lowbit rows: quantize flags
SCHEMES = {"g64-asym": ["--group-size", "64"], "g32-sym": ["--group-size", "32", "--sym"]}


def synthetic(name: str, out: Path) -> Path:
    """A synthetic model of ``SHAPES[name]`` with random weights (bf16 safetensors shards) and the demo model's
    tokenizer, written once, one tensor at a time."""
    d = out / "synthetic" / name
    if (d / "config.json").exists():
        return d
    import torch
    from transformers import AutoTokenizer, LlamaConfig

    from lowbit.hf import ShardWriter
    from lowbit.weights import empty_model

    tok = AutoTokenizer.from_pretrained(demo_dir())
    cfg = LlamaConfig(vocab_size=len(tok), rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, **SHAPES[name])
    model = empty_model(cfg)
    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    writer = ShardWriter(tmp, max_shard_bytes=2 * 1024**3)
    for pname, p in model.named_parameters():
        if cfg.tie_word_embeddings and pname == "lm_head.weight":
            continue
        t = torch.ones(p.shape) if pname.endswith("norm.weight") else torch.randn(p.shape, generator=g) * 0.02
        writer.add(pname, t.to(torch.bfloat16))
        del t
    writer.close()
    cfg.dtype = "bfloat16"
    cfg.architectures = ["LlamaForCausalLM"]  # llama.cpp's converter picks its writer by this
    cfg.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    os.replace(tmp, d)
    return d


def llama_cpp_src(out: Path) -> Path:
    """vendor/llama.cpp of llama-cpp-python's sdist (its convert_hf_to_gguf.py and gguf-py), fetched once with pip."""
    root = out / "llama-cpp-src"
    src = root / f"llama_cpp_python-{LLAMA_CPP_VERSION}" / "vendor" / "llama.cpp"
    if (src / "convert_hf_to_gguf.py").exists() and (src / "conversion").is_dir():
        return src
    root.mkdir(parents=True, exist_ok=True)
    sh([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
        f"llama-cpp-python=={LLAMA_CPP_VERSION}", "-d", root])
    with tarfile.open(next(root.glob("llama_cpp_python-*.tar.gz"))) as tf:
        members = [m for m in tf.getmembers() if "/vendor/llama.cpp/convert_hf_to_gguf.py" in m.name
                   or "/vendor/llama.cpp/gguf-py/" in m.name or "/vendor/llama.cpp/conversion/" in m.name]
        tf.extractall(root, members=members, filter="data")
    return src


def ggufs(name: str, hf: Path, out: Path, types=("Q4_0", "Q4_1")) -> dict[str, Path]:
    """F16 by llama.cpp's converter, then ``types`` (Q4_0, Q4_1) by llama.cpp's quantizer, cached under
    ``out/gguf``."""
    import llama_cpp

    d = out / "gguf"
    d.mkdir(parents=True, exist_ok=True)
    f16 = d / f"{name}-F16.gguf"
    if not f16.exists():
        src = llama_cpp_src(out)
        env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
        sh([sys.executable, src / "convert_hf_to_gguf.py", hf, "--outfile", f"{f16}.tmp", "--outtype", "f16"], env=env)
        os.replace(f"{f16}.tmp", f16)
    res = {}
    for qt in types:
        q = d / f"{name}-{qt}.gguf"
        if not q.exists():
            params = llama_cpp.llama_model_quantize_default_params()
            params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qt}")
            params.nthread = 2
            rc = llama_cpp.llama_model_quantize(str(f16).encode(), f"{q}.tmp".encode(), params)
            if rc != 0:
                raise SystemExit(f"llama_model_quantize {qt} failed ({rc})")
            os.replace(f"{q}.tmp", q)
        res[qt] = q
    return res


def checkpoint(name: str, hf: Path, out: Path, method: str, scheme: str) -> Path:
    dst = out / f"{name}-{method}-w4{scheme}"
    if not (dst / "lowbit").exists():
        sh([sys.executable, "-m", "lowbit.cli", "quantize", hf, "--method", method, "--bits", "4", *SCHEMES[scheme],
            "--out", dst, "--no-progress"])
    return dst / "lowbit"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("out"), help="checkpoints, GGUFs and the synthetic model")
    ap.add_argument("--models", default="demo,llama-3.2-1b-shape,llama-2-7b-shape")
    ap.add_argument("--schemes", default="g64-asym", help=f"lowbit W4 schemes, comma-separated: {', '.join(SCHEMES)}")
    ap.add_argument("--prompt-lens", default="128", help="prompt lengths, comma-separated (e.g. 128,1024)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--runtime", choices=("both", "native", "transformers"), default="both",
                    help="the lowbit rows' runtime(s) (default both)")
    ap.add_argument("--lm-heads", default="float,int8", help="the lowbit rows' lm_head modes, comma-separated")
    ap.add_argument("--gguf-types", default="Q4_0,Q4_1", help="llama.cpp rows, comma-separated (Q4_0, Q4_1)")
    ap.add_argument("--new-tokens", default="64,8",
                    help="decode steps after the shortest prompt, and after the longer ones (default 64,8)")
    a, rest = ap.parse_known_args()
    new_short, new_long = (int(x) for x in a.new_tokens.split(","))
    gguf_types = a.gguf_types.split(",")
    prompts = sorted(int(p) for p in a.prompt_lens.split(","))
    schemes = a.schemes.split(",")
    for bad in [m for m in a.models.split(",") if m != "demo" and m not in SHAPES] + \
               [x for x in schemes if x not in SCHEMES]:
        raise SystemExit(f"unknown model or scheme {bad!r}: models demo, {', '.join(SHAPES)}; schemes {', '.join(SCHEMES)}")
    from lowbit.run.bench import format_model_table

    for name in a.models.split(","):
        if name == "demo":
            hf, method, ppl = demo_dir(), "gptq", ["--ppl-windows", "4", "--ppl-seqlen", "512"]
        else:
            hf, method, ppl = synthetic(name, a.out), "rtn", []
        files = ggufs(name, hf, a.out, gguf_types)
        for scheme in schemes:
            ckpt = checkpoint(name, hf, a.out, method, scheme)
            for plen in prompts:
                up0 = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
                cmd = [sys.executable, "-m", "lowbit.cli", "bench", ckpt, "--runtime", a.runtime,
                       *[x for h in a.lm_heads.split(",") for x in ("--lm-head", h)],
                       *[x for t in gguf_types for x in ("--llama-cpp", files[t])],
                       "--prompt-len", str(plen), "--new-tokens", str(new_short if plen == prompts[0] else new_long),
                       "--repeat", str(a.repeat), "--threads", str(a.threads), "--clock", a.clock,
                       *(ppl if plen == prompts[0] else []), *rest, "--json"]
                report = json.loads(sh(cmd, stdout=subprocess.PIPE, text=True).stdout)  # its stderr shows
                report["uptime"] = [up0, subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()]
                report["model_name"], report["scheme"] = name, scheme
                tag = name + ("" if scheme == "g64-asym" else f"-{scheme}") + ("" if plen == 128 else f"-p{plen}")
                path = HERE / f"llamacpp-{tag}-{a.clock}-{a.threads}thread.json"
                path.write_text(json.dumps(report, indent=1) + "\n")
                print(f"\n## {name}, W4 {scheme}, prompt {plen}\nuptime: {report['uptime'][0]} / after: "
                      f"{report['uptime'][1]}\n")
                print(format_model_table(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
