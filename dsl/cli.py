"""`riprap`: check | compile | fmt | explain | graph | run | demo (contract section 8).

Exit codes: 0 clean or warnings only, 1 any error in a file, 2 a usage or I/O error
(a missing path, a directory with no `.riprap` files, an unreadable file). Diagnostics
of `check` go to stdout (text, or a JSON list with `--format json`); the other commands
print theirs on stderr, since their stdout is their product. No input ever
ends in a traceback: an unexpected exception is reported in one line with exit 2.

`graph`, `run` and `demo` belong to other layers and are imported only when called
(the one place where `dsl` reaches into `sidecar`: the front door).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Sequence, TextIO

from dsl.diagnostics import Diagnostic, Span, render_json, render_text, sort_key
from dsl.statements import ENGINES
from dsl.units import CompiledUnit

IO_CODES = frozenset({"RP001", "RP002", "RP003"})
DELEGATED = {
    "graph": ("dsl.graph", "the dependency graph of several policy files (mermaid or dot)"),
    "run": ("sidecar.cli", "run the sidecar, hot-reloading FILE (a .riprap or a compiled .json)"),
    "demo": ("sidecar.demo", "the end-to-end demonstration"),
}


class _Usage(Exception):
    """A usage error: message to stderr, exit 2."""


def _version() -> str:
    """The installed distribution's version (`riprap --version`, as ruff and mypy answer)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("riprap")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="riprap",
        description="Fault tolerance written down once: check, compile and run riprap policy files.",
    )
    p.add_argument("--version", action="version", version=f"riprap {_version()}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    c = sub.add_parser("check", help="compile files or directories of *.riprap and report problems")
    c.add_argument("paths", nargs="+", metavar="PATH")
    c.add_argument("--format", choices=("text", "json"), default="text")
    c.add_argument("--strict", action="store_true", help="treat warnings as errors")
    c.add_argument(
        "--engine",
        choices=ENGINES,
        default="python",
        help="also warn about what this engine runs differently (default python: nothing differs)",
    )
    c.add_argument(
        "--max-amplification",
        type=float,
        default=10.0,
        metavar="N",
        help="warn when retries along a call path multiply beyond N (default 10)",
    )
    k = sub.add_parser("compile", help="print (or write) the compiled plan as JSON, or Envoy configuration")
    k.add_argument("file", metavar="FILE")
    k.add_argument("-o", "--output", metavar="PATH")
    k.add_argument("--target", choices=("plan", "envoy"), default="plan",
                   help="plan: the JSON plan (default); envoy: Envoy configuration written into the folder -o")
    k.add_argument("--format", choices=("text", "json"), default="text", help="diagnostics format")
    f = sub.add_parser("fmt", help="rewrite files (or directories of *.riprap) in canonical form")
    f.add_argument("files", nargs="+", metavar="FILE")
    f.add_argument("--check", action="store_true", help="only report; exit 1 when a file is not canonical")
    e = sub.add_parser("explain", help="each service's resolved policy in plain words")
    e.add_argument("file", metavar="FILE")
    e.add_argument("rest", nargs="*", metavar="SERVICE | FILE", help="one service to explain, or more files (a mesh)")
    e.add_argument(
        "--engine",
        choices=ENGINES,
        default=None,
        help="also say which statements this engine runs natively, through an extension point, approximately",
    )
    for name, (_, help_text) in DELEGATED.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return p


def main(argv: list[str] | None = None) -> int:
    """The console script. Returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    try:
        if args_list and args_list[0] in DELEGATED:
            return _delegate(args_list[0], args_list[1:])
        parser = _parser()
        try:
            args = parser.parse_args(args_list)
        except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
            return int(exc.code) if isinstance(exc.code, int) else 2
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        handler = {"check": _check, "compile": _compile, "fmt": _fmt, "explain": _explain}[args.command]
        return handler(args)
    except _Usage as exc:
        print(f"riprap: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # noqa: BLE001 - the last line of defence: a message, never a traceback
        print(f"riprap: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2


def _delegate(command: str, argv: list[str]) -> int:
    module_name = DELEGATED[command][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            print(f"riprap: '{command}' is not available in this installation ({module_name} is missing)", file=sys.stderr)
            return 2
        raise
    entry = getattr(module, "main", None)
    if entry is None:
        print(f"riprap: '{command}' is not available ({module_name} has no main)", file=sys.stderr)
        return 2
    result = entry(argv)
    return int(result) if isinstance(result, int) else 0


# ---- check ----------------------------------------------------------------------------


def expand_paths(paths: Sequence[str]) -> tuple[list[str], list[Diagnostic]]:
    """Files to compile: each file as given, each directory's *.riprap (recursive, sorted)."""
    files: list[str] = []
    seen: set[Path] = set()  # resolved paths: `a.riprap` and `./a.riprap` are one file
    problems: list[Diagnostic] = []

    def add(name: str) -> None:
        key = Path(name).resolve()
        if key not in seen:
            seen.add(key)
            files.append(name)

    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*.riprap") if p.is_file())
            if not found:
                problems.append(Diagnostic("RP003", "error", None, f"{raw}: directory has no .riprap files"))
            for f in found:
                add(f)
        elif path.exists():
            add(raw)
        else:
            problems.append(Diagnostic("RP001", "error", None, f"{raw}: no such file or directory"))
    return files, problems


def load_unit(path: str) -> CompiledUnit:
    """A file named on the command line: a `.riprap` compiled, or a compiled plan `.json`
    (schema-validated), which `run` accepts too (section 8), so `check`, `compile --target
    envoy` and `explain` take it as well. Directories only ever contribute `*.riprap`."""
    if path.endswith(".json"):
        from dsl.loader import load_plan_source

        return load_plan_source(path)
    from dsl.compiler import compile_file

    return compile_file(path)


def _emit(diags: Sequence[Diagnostic], units: Sequence[CompiledUnit], fmt: str, out: TextIO) -> None:
    ordered = sorted(diags, key=sort_key)
    if fmt == "json":
        out.write(render_json(ordered) + "\n")
        return
    sources = {u.path: u.source for u in units}
    for d in ordered:
        print(render_text(d, sources), file=out)


def _summary(n_files: int, diags: Sequence[Diagnostic]) -> str:
    errors = sum(1 for d in diags if d.is_error)
    warnings = len(diags) - errors
    files = "file" if n_files == 1 else "files"
    return (
        f"checked {n_files} {files}: {errors} error{'s' if errors != 1 else ''}, "
        f"{warnings} warning{'s' if warnings != 1 else ''}"
    )


def _exit_code(diags: Sequence[Diagnostic]) -> int:
    if any(d.code in IO_CODES for d in diags):
        return 2
    return 1 if any(d.is_error for d in diags) else 0


def _check(args: argparse.Namespace) -> int:
    from dsl.analysis import analyse

    if args.max_amplification <= 0:
        raise _Usage("--max-amplification must be greater than 0")
    files, diags = expand_paths(args.paths)
    units = [load_unit(f) for f in files]
    for unit in units:
        diags += unit.diagnostics
    diags += analyse(units, max_amplification=args.max_amplification)
    if args.engine != "python":
        from dsl.engines import engine_findings

        for unit in units:
            diags += engine_findings(unit, args.engine)
    if args.strict:
        diags = [d.as_error() for d in diags]
    # check's output is its diagnostics: stdout, like ruff and mypy; the summary line joins
    # them in text mode and stays off stdout when stdout must be a pure JSON list
    _emit(diags, units, args.format, sys.stdout)
    print(_summary(len(files), diags), file=sys.stdout if args.format == "text" else sys.stderr)
    return _exit_code(diags)


# ---- compile --------------------------------------------------------------------------


def plan_json(unit: CompiledUnit) -> str:
    """The plan as the CLI prints it: indent 2, keys in the plan's own stable order."""
    from dsl.compiler import plan_dict

    assert unit.plan is not None
    return json.dumps(plan_dict(unit.plan), indent=2, ensure_ascii=False) + "\n"


def _compile(args: argparse.Namespace) -> int:
    from dsl.analysis import analyse

    files, diags = expand_paths([args.file])
    if diags:
        _emit(diags, [], args.format, sys.stderr)
        return 2
    if os.path.isdir(args.file):
        raise _Usage(f"compile takes one file, not a directory: {args.file}")
    unit = load_unit(args.file)
    # the same one-file analysis as `check FILE` (fallback cycles are errors), so the exit
    # codes agree
    diags = list(unit.diagnostics) + analyse([unit])
    code = _exit_code(diags)
    if unit.plan is None or code:
        _emit(diags, [unit], args.format, sys.stderr)
        return code or 1
    if args.target == "envoy":
        return _compile_envoy(unit, args.output, diags, args.format)
    _emit(diags, [unit], args.format, sys.stderr)
    text = plan_json(unit)
    if args.output:
        try:
            Path(args.output).write_text(text, encoding="utf-8")
        except OSError as exc:
            print(f"riprap: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
            return 2
    else:
        sys.stdout.write(text)
    return code


def _compile_envoy(unit: CompiledUnit, output: str | None, diags: list[Diagnostic], fmt: str) -> int:
    """`--target envoy`: Envoy configuration into the folder `output` (sidecar, imported lazily)."""
    if not output:
        raise _Usage("compile --target envoy needs -o DIR (the folder for envoy.yaml and the files it names)")
    from sidecar.engines.envoy.target import compile_to_dir

    assert unit.plan is not None
    try:
        paths, notes = compile_to_dir(unit.plan, Path(output))
    except OSError as exc:
        _emit(diags, [unit], fmt, sys.stderr)
        print(f"riprap: cannot write {output}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    # where Envoy does the closest thing (docs/engines.md): diagnostics like any other (section
    # 8: the source line and a caret; with --format json, in the one list), at the statement's
    # line when the file has one
    notes_diags = [_envoy_note(unit, note.service, note.statement, note.differs) for note in notes]
    _emit(diags + notes_diags, [unit], fmt, sys.stderr)
    if fmt == "text":  # with --format json, stderr is the JSON list alone
        print(f"wrote {', '.join(str(p) for p in paths)}", file=sys.stderr)
    return 0


def _envoy_note(unit: CompiledUnit, service: str, statement: str, differs: str) -> Diagnostic:
    """A `compile --target envoy` note as a located warning[envoy]."""
    spans = unit.statement_spans.get(service, {})
    words = statement.split()
    span = next((spans[k] for k in (" ".join(words[:2]), words[0] if words else "") if k in spans), None)
    span = span or unit.service_spans.get(service) or Span(unit.path, 1, 1)
    return Diagnostic("envoy", "warning", span, f"service {service}: {statement}: {differs}")


# ---- fmt ------------------------------------------------------------------------------


def _fmt(args: argparse.Namespace) -> int:
    from dsl.fmt import format_file

    worst = 0
    files: list[str] = []
    for raw in args.files:  # a directory is its *.riprap files, as for `check` (and ruff, black)
        if os.path.isdir(raw):
            found, problems = expand_paths([raw])
            for d in problems:
                print(render_text(d), file=sys.stderr)
                worst = 2
            files += found
        else:
            files.append(raw)
    for path in files:
        result = format_file(path)
        if result.diagnostics:
            sources = {path: result.original or ""}
            for d in sorted(result.diagnostics, key=sort_key):
                print(render_text(d, sources), file=sys.stderr)
            worst = max(worst, _exit_code(result.diagnostics) or 1)
            continue
        assert result.formatted is not None
        if result.formatted == result.original:
            continue
        if args.check:
            print(f"{path}: not in canonical form (run `riprap fmt {path}`)", file=sys.stderr)
            worst = max(worst, 1)
        else:
            try:
                Path(path).write_text(result.formatted, encoding="utf-8")
            except OSError as exc:
                print(f"riprap: cannot write {path}: {exc.strerror or exc}", file=sys.stderr)
                worst = 2
                continue
            print(f"formatted {path}", file=sys.stderr)
    return worst


# ---- explain --------------------------------------------------------------------------


def _explain(args: argparse.Namespace) -> int:
    from dsl.explain import explain_unit

    rest = list(args.rest)
    mesh = bool(rest) and (len(rest) > 1 or os.path.exists(rest[0]))
    service = None if mesh or not rest else rest[0]
    paths = [args.file] + (rest if mesh else [])
    files, diags = expand_paths(paths)
    if diags:
        _emit(diags, [], "text", sys.stderr)
        return 2
    units = [load_unit(f) for f in files]
    failed = False
    for unit in units:
        errors = [d for d in unit.diagnostics if d.is_error]
        if errors or unit.plan is None:
            _emit(unit.diagnostics, [unit], "text", sys.stderr)
            failed = True
    if failed:
        return _exit_code([d for u in units for d in u.diagnostics]) or 1
    if service is not None:
        assert units[0].plan is not None
        if service not in units[0].plan.services:
            known = ", ".join(units[0].plan.services) or "none"
            raise _Usage(f"no service '{service}' in {args.file} (services: {known})")
    parts = [explain_unit(u, service, args.engine) for u in units]
    if mesh:
        from dsl.analysis import explain_mesh

        mesh_text = explain_mesh(units)
        if mesh_text:
            parts.append(mesh_text)
    sys.stdout.write("\n".join(p.rstrip("\n") + "\n" for p in parts))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
