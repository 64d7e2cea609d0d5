"""lowbit (native decoder and transformers modules) against llama.cpp Q4_0/Q4_1 and bf16 transformers.

    python benchmarks/cpu/bench_llamacpp.py                           # 1 thread, CPU clock (RESULTS.md)
    python benchmarks/cpu/bench_llamacpp.py --threads 2 --clock wall  # both cores, wall clock
    python benchmarks/cpu/bench_llamacpp.py --models demo             # one model

Models: ``demo`` (SmolLM2-135M, the demo model; its float weights as lowbit converts them) and
``llama-3.2-1b-shape`` (Llama-3.2-1B's shapes: hidden 2048, 16 layers, 32 heads / 8 KV heads, MLP 8192, tied
embeddings, rope_theta 500000 with llama3 scaling; random N(0, 0.02) weights written once under ``--out``,
the demo model's tokenizer and vocabulary of 49152 instead of 128256).

From the same float weights: lowbit W4 g64 asym (GPTQ for the demo model, RTN for the random one) with the
float lm_head and with the lm_head quantized to int8 at load time, each on the native decoder and on the
transformers modules (``lowbit bench --runtime both``); the weights dequantized to bf16 in plain
transformers; llama.cpp (llama-cpp-python) on Q4_0 and Q4_1 GGUFs that llama.cpp's own tools make:
``convert_hf_to_gguf.py`` from llama-cpp-python's sdist (downloaded once with pip into ``--out``) writes F16,
``llama_cpp.llama_model_quantize`` writes Q4_0 and Q4_1 with llama.cpp's default choices for the other
tensors. Prompt 128 random tokens, 64 greedy decode steps, batch 1, median of 3 runs, each row in its own
child process; perplexity (demo only) on the same 4 WikiText-2 test windows of 512 tokens for every row.
Each table goes to ``benchmarks/cpu/llamacpp-<model>-<clock>-<threads>thread.json`` and stdout, with
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


def synthetic_1b(out: Path) -> Path:
    """Llama-3.2-1B's shapes with random weights (bf16 safetensors) and the demo model's tokenizer, made once."""
    d = out / "synthetic" / "llama-3.2-1b-shape"
    if (d / "config.json").exists():
        return d
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(demo_dir())
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=64, vocab_size=len(tok), max_position_embeddings=131072,
                      rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id,
                      rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192})
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                for rows in torch.split(p, 4096):
                    rows.copy_(torch.randn(rows.shape, generator=g) * 0.02)
    model.tie_weights()
    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
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


def ggufs(name: str, hf: Path, out: Path) -> dict[str, Path]:
    """F16 by llama.cpp's converter, then Q4_0 and Q4_1 by llama.cpp's quantizer, cached under ``out/gguf``."""
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
    for qt in ("Q4_0", "Q4_1"):
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


def checkpoint(name: str, hf: Path, out: Path, method: str) -> Path:
    dst = out / f"{name}-{method}-w4g64"
    if not (dst / "lowbit").exists():
        sh([sys.executable, "-m", "lowbit.cli", "quantize", hf, "--method", method, "--bits", "4", "--group-size", "64",
            "--out", dst, "--no-progress"])
    return dst / "lowbit"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("out"), help="checkpoints, GGUFs and the synthetic model")
    ap.add_argument("--models", default="demo,llama-3.2-1b-shape")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=("wall", "cpu"), default="cpu")
    ap.add_argument("--repeat", type=int, default=3)
    a, rest = ap.parse_known_args()
    for name in a.models.split(","):
        if name == "demo":
            hf, method, ppl = demo_dir(), "gptq", ["--ppl-windows", "4", "--ppl-seqlen", "512"]
        elif name == "llama-3.2-1b-shape":
            hf, method, ppl = synthetic_1b(a.out), "rtn", []
        else:
            raise SystemExit(f"unknown model {name!r}: demo or llama-3.2-1b-shape")
        files = ggufs(name, hf, a.out)
        ckpt = checkpoint(name, hf, a.out, method)
        up0 = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        cmd = [sys.executable, "-m", "lowbit.cli", "bench", ckpt, "--runtime", "both", "--lm-head", "float",
               "--lm-head", "int8", "--llama-cpp", files["Q4_0"], "--llama-cpp", files["Q4_1"], "--prompt-len", "128",
               "--new-tokens", "64", "--repeat", str(a.repeat), "--threads", str(a.threads), "--clock", a.clock,
               *ppl, *rest, "--json"]
        report = json.loads(sh(cmd, capture_output=True, text=True).stdout)
        report["uptime"] = [up0, subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()]
        report["model_name"] = name
        path = HERE / f"llamacpp-{name}-{a.clock}-{a.threads}thread.json"
        path.write_text(json.dumps(report, indent=1) + "\n")
        from lowbit.run.bench import format_model_table

        print(f"\n## {name}\nuptime: {report['uptime'][0]} / after: {report['uptime'][1]}\n")
        print(format_model_table(report), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
