"""Guard tests: the docs say what the code does.

- docs/cli.md is exactly what docs/gen_cli.py renders from the argparse parser;
- every hook spec in lowbit.hookspecs is documented in docs/plugins.md with the same parameters,
  and nothing else is documented as a hook;
- every ``$ lowbit ...`` command in a ```console block of the docs parses with the real parser,
  names methods and formats that exist, and the fast ones (plugins, kernels, --help) run.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
DOC_FILES = sorted(DOCS.glob("*.md")) + [ROOT / "examples/plugin-example/README.md"]
FAST = {"plugins", "kernels"}


def _gen_cli():
    spec = importlib.util.spec_from_file_location("gen_cli", DOCS / "gen_cli.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_reference_is_generated_from_the_parser(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    gen = _gen_cli()
    expected = gen.render()
    assert (DOCS / "cli.md").read_text(encoding="utf-8") == expected, "docs/cli.md is stale: run python docs/gen_cli.py"
    from lowbit.cli import build_parser

    for path, _ in gen.walk(build_parser()):
        assert f"## `{' '.join(('lowbit',) + path)}`" in expected


# ------------------------------------------------------------------------------------ hooks
def _hook_specs() -> dict[str, inspect.Signature]:
    from lowbit import hookspecs

    return {name: inspect.signature(fn) for name, fn in vars(hookspecs).items()
            if name.startswith("lowbit_") and callable(fn)}


def _documented_hooks() -> dict[str, list[tuple[str, str | None]]]:
    """hook name → [(parameter, annotation or None)] from ``def lowbit_...(...)`` lines in plugins.md."""
    text = (DOCS / "plugins.md").read_text(encoding="utf-8")
    out = {}
    for m in re.finditer(r"^def (lowbit_\w+)\(([^)]*)\)\s*->\s*None:\s*\.\.\.\s*$", text, re.M):
        params = []
        for p in filter(None, (x.strip() for x in m.group(2).split(","))):
            name, _, ann = p.partition(":")
            params.append((name.strip(), ann.strip() or None))
        out[m.group(1)] = params
    return out


def test_every_hook_is_documented_with_its_signature():
    specs, documented = _hook_specs(), _documented_hooks()
    assert specs, "no hook specs found"
    for name, sig in specs.items():
        assert name in documented, f"docs/plugins.md does not document hook {name}"
        want = [(p.name, str(p.annotation).strip("'\"") if p.annotation is not p.empty else None)
                for p in sig.parameters.values()]
        assert documented[name] == want, f"{name}: docs say {documented[name]}, the spec says {want}"
        assert f"### {name}" in (DOCS / "plugins.md").read_text(encoding="utf-8"), f"{name} has no section"


def test_no_documented_hook_is_missing_from_the_specs():
    extra = set(_documented_hooks()) - set(_hook_specs())
    assert not extra, f"docs/plugins.md documents hooks that do not exist: {sorted(extra)}"


def test_plugins_doc_names_every_switch_and_suite():
    text = (DOCS / "plugins.md").read_text(encoding="utf-8")
    for word in ("LOWBIT_DISABLE_PLUGIN_AUTOLOAD", "LOWBIT_DISABLED_PLUGINS", "LOWBIT_DISABLED_KERNELS",
                 "KernelConformance", "PackerConformance", "ExporterConformance", "QuantizerConformance"):
        assert word in text, f"docs/plugins.md does not mention {word}"
    import lowbit.testing

    for name in lowbit.testing.__all__:
        if name.endswith("Conformance"):
            assert name in text, f"suite {name} is not documented"


# ------------------------------------------------------------------------------------ commands
def _commands() -> list[tuple[str, int, str]]:
    """(file, line, command) for every ``$ `` line of a ```console block (backslash continuations joined)."""
    found = []
    for path in DOC_FILES:
        in_console = False
        pending = None
        for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.startswith("```"):
                in_console = line.strip() == "```console"
                continue
            if not in_console:
                continue
            if pending is not None:
                pending = (pending[0], pending[1] + " " + line.strip().rstrip("\\"))
                if not line.rstrip().endswith("\\"):
                    found.append((path.relative_to(ROOT).as_posix(), pending[0], pending[1]))
                    pending = None
            elif line.startswith("$ "):
                cmd = line[2:].strip()
                if cmd.endswith("\\"):
                    pending = (no, cmd.rstrip("\\"))
                else:
                    found.append((path.relative_to(ROOT).as_posix(), no, cmd))
    return found


COMMANDS = _commands()


def _split(cmd: str) -> tuple[dict[str, str], list[str]]:
    """Leading ``VAR=value`` assignments and the argv."""
    argv = shlex.split(cmd)
    env = {}
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):
        k, _, v = argv.pop(0).partition("=")
        env[k] = v
    return env, argv


LOWBIT_COMMANDS = [c for c in COMMANDS if _split(c[2])[1][:1] == ["lowbit"]]


def test_docs_have_lowbit_commands():
    files = {f for f, _, _ in LOWBIT_COMMANDS}
    for name in ("docs/plugins.md", "docs/walkthroughs.md", "docs/formats.md"):
        assert name in files, f"{name} has no $ lowbit command in a console block"


@pytest.mark.parametrize("where,line,cmd", LOWBIT_COMMANDS, ids=[f"{f}:{n}" for f, n, _ in LOWBIT_COMMANDS])
def test_command_parses(where, line, cmd):
    from lowbit.cli import build_parser

    _, argv = _split(cmd)
    try:
        args = build_parser().parse_args(argv[1:])
    except SystemExit as e:  # --help / --version exit 0; a parse error exits 2
        assert e.code == 0, f"{where}:{line}: `{cmd}` does not parse"
        return
    from lowbit.plugins import registry
    from lowbit.recipe import METHODS

    if getattr(args, "method", None) is not None:
        assert args.method in METHODS, f"{where}:{line}: unknown --method {args.method}"
    fmt = getattr(args, "format", None)
    if fmt:
        try:
            import lowbit_exporters  # noqa: F401
        except ImportError:
            pytest.skip("lowbit-exporters is not installed: cannot check --format names")
        for f in fmt.split(","):
            assert f in registry("exporters"), f"{where}:{line}: unknown --format {f}"


FAST_COMMANDS = [c for c in LOWBIT_COMMANDS
                 if (lambda argv: argv[1:2] and (argv[1] in FAST or "--help" in argv or argv[1:] == ["--version"]))(
                     _split(c[2])[1])]


def test_some_commands_are_fast():
    assert any("plugins" in c for _, _, c in FAST_COMMANDS) and any("kernels" in c for _, _, c in FAST_COMMANDS)


@pytest.mark.parametrize("where,line,cmd", FAST_COMMANDS, ids=[f"{f}:{n}" for f, n, _ in FAST_COMMANDS])
def test_fast_command_runs(where, line, cmd, monkeypatch, capsys):
    from lowbit.cli import main
    from lowbit.plugins import reset_plugin_manager

    env, argv = _split(cmd)
    for k in [k for k in __import__("os").environ if k.startswith("LOWBIT_")]:
        monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    reset_plugin_manager()
    try:
        try:
            code = main(argv[1:])
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr().out
        assert code == 0, f"{where}:{line}: `{cmd}` exited {code}"
        assert out.strip(), f"{where}:{line}: `{cmd}` printed nothing"
        if env.get("LOWBIT_DISABLE_PLUGIN_AUTOLOAD") and argv[1] == "plugins":
            assert out.strip().splitlines()[-1].startswith("lowbit "), "autoload switch did not leave built-ins only"
    finally:
        reset_plugin_manager()
