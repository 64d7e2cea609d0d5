"""Guard test: a model family's module names live in its adapter (``lowbit/models/``) and a format's
own names in its exporter, so that a new family touches one file.

The names are taken from the built-in adapters themselves (every linear, role, norm, router,
embedding, final norm and lm_head path of a tiny model of each family), so a new family's names
are guarded too. Every string (regex escapes dropped) and attribute name in the code of the
published packages outside ``lowbit/models/`` (docstrings and comments aside: they may give
examples) must name none of them. Exempt are a
format's own names, which may coincide with a family's: the tables of xFT's layout in
``xft.py`` and GPTQ's ``lm_head`` config key.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = [ROOT / "packages" / p for p in ("core/src/lowbit", "exporters/src/lowbit_exporters",
                                          "backend-cpu/src/lowbit_cpu", "backend-cuda/src/lowbit_cuda")]
ADAPTERS = ROOT / "packages/core/src/lowbit/models"
#: path components too generic to be a family's fact on their own ("mlp.gate" is a router; "lm_head"
#: is also lowbit's word for the output projection: ``--lm-head``)
GENERIC = {"model", "layers", "weight", "bias", "mlp", "experts", "gate", "norm", "lm_head"}
#: (file name, module-level assignment) holding a format's own names
FORMAT_TABLES = {("xft.py", n) for n in ("_LAYER_FILES", "_MATRICES", "_NORM_FILES", "_EMBEDDING_FILE",
                                         "_FINAL_NORM_FILE", "_LM_HEAD_FILE")}
#: (file name, string) a format's own key that is also a family's module name
FORMAT_STRINGS = {("gptq.py", "lm_head")}  # GPTQ's quantize_config says whether lm_head is quantized


def _family_names() -> tuple[set[str], set[str]]:
    """(components, dotted paths): every path component and whole path the built-in adapters name."""
    from lowbit.models import BUILTIN
    from lowbit.testing.models import TINY_FAMILIES, tiny_model

    paths: set[str] = set()
    for model_type in TINY_FAMILIES:
        model = tiny_model(model_type)
        adapter = next(a for a in BUILTIN if model_type in a.model_types)
        paths |= set(adapter.linear_shapes(model.config)) | set(adapter.layer_roles(model.config).values())
        paths |= {adapter.layers_path, adapter.embedding, adapter.final_norm, adapter.lm_head}
        paths |= set(adapter.float_modules) | {p for pair in adapter.checkpoint_renames for p in pair}
        for layer in adapter.layers(model):
            for g in adapter.groups(layer):
                paths |= {g.prev or "", g.inspect or "", g.source or "", *g.also_scaled}
            paths |= set(adapter.blocks(layer))
    paths = {p.strip(".") for p in paths if p}
    parts = {c for p in paths for c in p.split(".") if not c.isdigit()} - GENERIC
    dotted = {p for p in paths if "." in p} | {f"{p}.weight" for p in paths}
    return parts, dotted


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def _exempt(path: Path, tree: ast.Module) -> set[int]:
    out = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and (path.name, t.id) in FORMAT_TABLES for t in node.targets):
            out |= {id(n) for n in ast.walk(node)}
    return out


def _strings(path: Path):
    """(line, text) of every string constant and attribute name of the code in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _docstrings(tree) | _exempt(path, tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            if (path.name, node.value) not in FORMAT_STRINGS:
                yield node.lineno, node.value.replace("\\", "")  # r"model\.layers" names model.layers
        elif isinstance(node, ast.Attribute):
            yield node.lineno, node.attr


def _files():
    for root in SOURCES:
        for f in sorted(root.rglob("*.py")):
            if ADAPTERS not in f.parents:
                yield f


def test_the_scan_sees_the_families_names():
    parts, dotted = _family_names()
    assert {"q_proj", "gate_up_proj", "w1", "block_sparse_moe", "input_layernorm", "pre_feedforward_layernorm",
            "embed_tokens", "vision_tower"} <= parts
    assert {"lm_head.weight", "model.norm.weight", "self_attn.q_proj"} <= dotted
    assert len(list(_files())) > 30


def test_no_family_module_name_outside_the_adapters():
    parts, dotted = _family_names()
    found = []
    for f in _files():
        for line, s in _strings(f):
            words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", s))
            hits = sorted(words & parts) + sorted(d for d in dotted if d in s)
            if hits:
                found.append(f"{f.relative_to(ROOT)}:{line}: {s!r} names {', '.join(hits)}")
    if found:
        pytest.fail("family module names outside lowbit/models (move the fact into the adapter, or ask it "
                    "for a role):\n" + "\n".join(found))


def _is_minus_one(node: ast.AST) -> bool:
    return (isinstance(node, ast.Constant) and node.value == -1) or (
        isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub)
        and isinstance(node.operand, ast.Constant) and node.operand.value == 1)


def test_the_per_channel_sentinel_is_read_in_one_place():
    """``group_size == -1`` means per channel; ``QuantScheme.per_channel`` and ``group_width`` are its one
    reading, so no other code compares a group size with -1 (a format or library that spells per channel
    as -1 is handed ``scheme.group_size`` as it is)."""
    found = []
    for root in SOURCES:
        for f in sorted(root.rglob("*.py")):
            if f.name == "scheme.py" and f.parent.name == "lowbit":
                continue
            for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Compare) and any(_is_minus_one(c) for c in (node.left, *node.comparators)):
                    text = ast.unparse(node)
                    if "group" in text or re.search(r"\bgs\b", text):
                        found.append(f"{f.relative_to(ROOT)}:{node.lineno}: {text}")
    if found:
        pytest.fail("group sizes compared with -1 outside QuantScheme (use scheme.per_channel or "
                    "scheme.group_width(k)):\n" + "\n".join(found))
