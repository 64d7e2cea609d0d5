"""Peak memory and time of the streaming pass against model size (synthetic models of real shapes).

Builds random models of real shapes once (Llama 3.2 1B and 3B, Llama 2 7B, and the layers of
Qwen1.5-MoE-A2.7B, 8 of its 24, stored one tensor per expert linear as its checkpoints are) as bf16
safetensors shards in a cache directory (weights drawn one tensor at a time, N(0, 0.02) like
transformers' init, norms 1), then
runs ``lowbit quantize`` on each in a fresh subprocess and records its wall time, its peak RSS
(the kernel's high-water mark for the child) and the per-layer time and RSS from the checkpoint's
report. The output directory is deleted after each run.

    python benchmarks/scale/run.py                        # all sizes, rtn and gptq
    python benchmarks/scale/run.py --sizes 1b --methods rtn
    python benchmarks/scale/run.py --sizes moe --methods rtn --format lowbit
    python benchmarks/scale/run.py --table                # regenerate RESULTS.md's table from results.jsonl

Disk: 1B 2.5 GB, 3B 6.4 GB, 7B 13.5 GB, MoE 10.4 GB of bf16 shards (``--cache``, default ~/.cache/lowbit/scale),
plus the run's output (up to ~15 GB for 7B with two export formats) while it runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.jsonl"

#: shapes of public models (Llama 3.2 1B and 3B, Llama 2 7B; Qwen1.5-MoE-A2.7B's layers, 8 of 24, whose
#: float32 copy (21 GB) would not fit beside anything else in 24 GiB: only streaming quantizes it here)
SIZES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    "moe": dict(model_type="qwen2_moe", hidden_size=2048, intermediate_size=5632, num_hidden_layers=8,
                num_attention_heads=16, num_key_value_heads=16, vocab_size=151936, tie_word_embeddings=False,
                num_experts=60, num_experts_per_tok=4, moe_intermediate_size=1408,
                shared_expert_intermediate_size=5632),
}
METHODS = {
    "rtn": ["--method", "rtn"],
    "gptq": ["--method", "gptq", "--nsamples", "8", "--seqlen", "512", "--batch-size", "4"],
}


def config_of(size: str):
    from transformers import AutoConfig

    c = dict(SIZES[size])
    return AutoConfig.for_model(c.pop("model_type", "llama"), max_position_embeddings=4096, rms_norm_eps=1e-5, **c)


@functools.cache
def skeleton_of(size: str):
    """The model on the meta device in the form lowbit quantizes (MoE experts one linear each), and its adapter."""
    from lowbit.models import adapter_for
    from lowbit.plugins import registry
    from lowbit.weights import empty_model

    config = config_of(size)
    model = empty_model(config)
    adapter = adapter_for(config, registry("architectures"))
    adapter.prepare(model)
    return model, adapter


def build(size: str, cache: Path) -> Path:
    """The synthetic model's directory, written once (atomically) and reused; tensors are named as the
    family's checkpoints name them (one per expert linear for MoE)."""
    import torch

    from lowbit.hf import ShardWriter
    from lowbit.testing.models import tiny_tokenizer

    path = cache / size
    if (path / "config.json").is_file():
        return path
    model, adapter = skeleton_of(size)
    config = model.config
    tmp = Path(tempfile.mkdtemp(prefix=f".{size}.tmp-", dir=cache))
    gen = torch.Generator().manual_seed(0)
    writer = ShardWriter(tmp, max_shard_bytes=2 * 1024**3)
    for name, p in model.named_parameters():
        t = torch.ones(p.shape) if p.dim() == 1 else torch.empty(p.shape).normal_(0, 0.02, generator=gen)
        writer.add(adapter.checkpoint_name(name), t.to(torch.bfloat16))
        del t
    writer.close()
    config.dtype = "bfloat16"
    config.save_pretrained(str(tmp))
    tiny_tokenizer().save_pretrained(str(tmp))
    os.replace(tmp, path)
    return path


def disk_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def tree_bytes(root: Path, prefix: str) -> int:
    """Bytes of the files under the entries of ``root`` whose names contain ``prefix`` (the output,
    its work and temporary directories), each inode counted once (hard links are one copy)."""
    seen, total = set(), 0
    for entry in list(root.iterdir()) if root.is_dir() else []:
        if prefix not in entry.name:
            continue
        for dirpath, _dirs, files in os.walk(entry):
            for f in files:
                try:
                    st = os.lstat(os.path.join(dirpath, f))
                except OSError:  # renamed or removed while we walk
                    continue
                if st.st_ino not in seen:
                    seen.add(st.st_ino)
                    total += st.st_blocks * 512
    return total


class DiskPeak:
    """Polls :func:`tree_bytes` in a thread while a run lasts; ``peak`` is the largest total seen."""

    def __init__(self, root: Path, prefix: str, every: float = 0.5):
        import threading

        self.root, self.prefix, self.every, self.peak = root, prefix, every, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_bytes(self.root, self.prefix))
            self._stop.wait(self.every)

    def __enter__(self) -> DiskPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_bytes(self.root, self.prefix))


def run_one(size: str, method: str, model_dir: Path, work: Path, group_size: int, formats: str,
            extra: list[str]) -> dict:
    out = work / f"{size}-{method}"
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "lowbit.cli", "quantize", str(model_dir), *METHODS[method], "--bits", "4",
           "--group-size", str(group_size), "--format", formats, "--out", str(out), "--json", *extra]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err, DiskPeak(work, out.name) as disk:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own high-water mark, not all children's
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - t0
        peak_kib = usage.ru_maxrss
        if proc.returncode:
            err.seek(0)
            raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err.read()[-3000:]}")
    manifest = json.loads((out / "lowbit" / "lowbit.json").read_text())
    layers = manifest["report"]["layers"]
    out_bytes = {f: sum(p.stat().st_size for p in (out / f).rglob("*") if p.is_file()) for f in os.listdir(out)}
    shutil.rmtree(out)
    from lowbit.cpuinfo import cpu_name

    return {
        "size": size, "method": method, "group_size": group_size, "formats": formats, "extra": extra,
        "layers": len(layers), "params_b": None, "disk_gb": round(disk_bytes(model_dir) / 1e9, 2),
        "wall_s": round(wall, 1), "pass_s": manifest["report"]["seconds"],
        "layer_s_median": round(statistics.median(r["seconds"] for r in layers), 2),
        "layer_rss_mib_max": max(r["rss_mib"] for r in layers),
        "layer_rss_mib_first": layers[0]["rss_mib"], "layer_rss_mib_last": layers[-1]["rss_mib"],
        "peak_rss_mib": peak_kib >> 10,
        "out_gb": {f: round(b / 1e9, 2) for f, b in out_bytes.items()},
        "peak_disk_gb": round(disk.peak / 1e9, 2),
        "cpu": cpu_name(), "threads": os.cpu_count(), "load": [round(x, 1) for x in os.getloadavg()],
        "commit": _commit(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def _commit() -> str | None:
    proc = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() or None


def params_of(size: str) -> float:
    model, _ = skeleton_of(size)
    return sum(p.numel() for p in model.parameters()) / 1e9


def layer_bound_mib(size: str, method: str) -> int:
    """The issue's bound: one decoder layer in fp32 + calibration activations + 1 GiB."""
    model, adapter = skeleton_of(size)
    layer = max(sum(p.numel() for p in lay.parameters()) for lay in adapter.layers(model)) * 4
    h = model.config.hidden_size
    acts = 8 * 512 * h * 4 * 2 if method == "gptq" else 0  # the layer's inputs and outputs
    return (layer + acts) // 2**20 + 1024


def _secs(s: float | None) -> str:
    return "–" if s is None else f"{s:.0f} s"


def _outputs(r: dict) -> str:
    return ", ".join(f"{f} {gb} GB" for f, gb in sorted(r.get("out_gb", {}).items())) or "–"


def _disk(r: dict) -> str:
    return f"{r['peak_disk_gb']} GB" if "peak_disk_gb" in r else "–"


def _ratio(r: dict) -> str:
    sizes = r.get("out_gb", {})
    return f"{sizes['lowbit'] / sizes['autoawq']:.2f}×" if sizes.get("autoawq") else "–"


def table(rows: list[dict]) -> str:
    lines = ["| model | params | layers | bf16 on disk | method | wall | pass | per layer (median) | "
             "RSS after layer 1 / last | peak RSS | bound (layer fp32 + acts + 1 GiB) | outputs on disk | "
             "peak disk (outputs + work) | lowbit / autoawq size | commit | load |",
             "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['size']} | {params_of(r['size']):.2f} B | {r['layers']} | {r['disk_gb']} GB | {r['method']} "
            f"g{r['group_size']} | {r['wall_s']:.0f} s | {_secs(r['pass_s'])} | {r['layer_s_median']:.1f} s | "
            f"{r['layer_rss_mib_first']} / {r['layer_rss_mib_last']} MiB | **{r['peak_rss_mib']} MiB** | "
            f"{layer_bound_mib(r['size'], r['method'])} MiB | {_outputs(r)} | {_disk(r)} | {_ratio(r)} | "
            f"{r.get('commit') or '?'} | {r['load'][0]} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1b,3b,7b")
    ap.add_argument("--methods", default="rtn,gptq")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--format", default="lowbit,autoawq,gptq-v2")
    ap.add_argument("--cache", type=Path, default=Path(os.environ.get("LOWBIT_SCALE_CACHE",
                                                                      Path.home() / ".cache/lowbit/scale")))
    ap.add_argument("--work", type=Path, default=None, help="where outputs go while a run lasts (default: the cache)")
    ap.add_argument("--extra", default="", help="more flags for lowbit quantize, e.g. '--compute-dtype bf16'")
    ap.add_argument("--build-only", action="store_true")
    ap.add_argument("--table", action="store_true", help="print the table of results.jsonl and exit")
    a = ap.parse_args()
    if a.table:
        print(table([json.loads(x) for x in RESULTS.read_text().splitlines() if x.strip()]))
        return
    a.cache.mkdir(parents=True, exist_ok=True)
    work = a.work or a.cache
    for size in a.sizes.split(","):
        t0 = time.perf_counter()
        path = build(size, a.cache)
        print(f"{size}: {path} ({disk_bytes(path) / 1e9:.1f} GB, ready in {time.perf_counter() - t0:.0f} s)", flush=True)
        if a.build_only:
            continue
        for method in a.methods.split(","):
            row = run_one(size, method, path, work, a.group_size, a.format, a.extra.split())
            print(json.dumps(row), flush=True)
            with RESULTS.open("a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
