"""The README and docs/ say true things about the code.

- every ``segflow ...`` command line in a fenced code block parses with the real parser
  (``flows.cli.build_parser``);
- every dotted ``segcore.X.Y`` name resolves (module prefix imported, the rest by getattr);
- every repository path in backticks exists, and the names given next to a ``segcore/...py`` path
  are defined in that module;
- every relative Markdown link points at an existing file and, with ``#anchor``, at a heading.
"""

from __future__ import annotations

import importlib
import io
import re
import shlex
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

from flows.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
DOC_FILES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

# Named in the README ahead of the code that provides them (the three "where to look" entries):
# such a (path, name) is skipped only while its module or name is missing. Delete an entry once
# the code has it.
NOT_YET_IN_CODE: set[tuple[str, str]] = set()


def _rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


# --- command lines -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Command:
    file: str
    line: int  # 1-based line of the command's first physical line
    text: str  # the logical line as written (continuations joined, brackets not yet expanded)
    argv: tuple[str, ...]  # arguments after "segflow"
    problem: str = ""  # why the line could not be split into arguments


_FENCE = re.compile(r"^\s*(```|~~~)\s*([\w+-]*)")
# Blocks marked as another language (text diagrams and layouts, Python, SQL, ...) hold no shell
# commands: a "segflow" there is a label or a string. Unmarked blocks are read as shell.
_SHELL = {"", "sh", "bash", "shell", "console", "zsh"}
_OPTIONAL = re.compile(r"\[(\s*-[^\[\]]*)\]")  # [--opt value]: optional-option notation
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_SEGFLOW_LINE = re.compile(r"^\s*(?:[A-Za-z_][A-Za-z0-9_]*=\S*\s+)*segflow(?:\s|$)")


def _code_lines(text: str) -> list[tuple[int, str]]:
    """Logical lines inside fenced shell code blocks: (first line number, line), with lines ending
    in a backslash joined to the next."""
    out: list[tuple[int, str]] = []
    inside, shell, pending, start = False, False, "", 0
    for number, line in enumerate(text.splitlines(), start=1):
        fence = _FENCE.match(line)
        if fence:
            inside, shell, pending = not inside, fence.group(2).lower() in _SHELL, ""
            continue
        if not inside or not shell:
            continue
        if not pending:
            start = number
        piece = line.strip() if pending else line
        if line.rstrip().endswith("\\"):
            pending += piece.rstrip()[:-1].rstrip() + " "
            continue
        out.append((start, pending + piece))
        pending = ""
    return out


def _expand_optional(line: str) -> list[str]:
    """``[--a x] [--b p|q|r]`` -> one line per alternative, the brackets dropped: variant *i* takes
    the *i*-th alternative of every ``p|q|r`` (or its last), so every alternative is parsed once."""
    groups = _OPTIONAL.findall(line)
    width = max([len(tok.split("|")) for g in groups for tok in g.split()] or [1])
    variants = []
    for i in range(width):
        def pick(match: re.Match[str]) -> str:
            return " ".join(tok.split("|")[min(i, len(tok.split("|")) - 1)] for tok in match.group(1).split())
        variants.append(_OPTIONAL.sub(pick, line))
    return variants


def segflow_commands(text: str, *, file: str) -> list[Command]:
    """Every ``segflow`` command line in the fenced code blocks of ``text`` (leading ``NAME=value``
    environment assignments and ``# comments`` removed)."""
    commands = []
    for number, line in _code_lines(text):
        if not _SEGFLOW_LINE.match(line):
            continue  # another command, or Python/SQL
        for variant in _expand_optional(line):
            try:
                tokens = shlex.split(variant, comments=True)
            except ValueError as exc:  # e.g. an unclosed quote: a defect of the docs, reported by the test
                commands.append(Command(file, number, line.strip(), (), problem=str(exc)))
                continue
            while tokens and _ENV.match(tokens[0]):
                tokens.pop(0)
            if tokens and tokens[0] == "segflow":
                commands.append(Command(file, number, line.strip(), tuple(tokens[1:])))
    return commands


def _parse(argv: tuple[str, ...]) -> tuple[int | str | None, str]:
    """(SystemExit code or None, argparse's stderr) of parsing ``argv`` with the real parser."""
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        try:
            build_parser().parse_args(list(argv))
        except SystemExit as exc:
            return exc.code, err.getvalue()
    return None, err.getvalue()


def _parser_lacks(option: str) -> bool:
    """argparse itself says ``option`` is unknown (probed with an otherwise valid command line)."""
    code, err = _parse((option, "report", "--lake", "lake"))
    return code not in (None, 0) and f"unrecognized arguments: {option}" in err


SUBCOMMANDS = ("ingest", "segment", "run", "report", "train", "demo", "serve", "model", "export")


def _help_text(argv: tuple[str, ...]) -> str:
    out = io.StringIO()
    with redirect_stdout(out), pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--help"])
    return out.getvalue()


ALL_COMMANDS = [c for f in DOC_FILES for c in segflow_commands(f.read_text(), file=_rel(f))]


def command_problem(command: Command) -> str | None:
    """Why ``command`` is not a valid ``segflow`` command line, or None."""
    where = f"{command.file}:{command.line}: `{command.text}`"
    if command.problem:
        return f"{where} is not a shell command line: {command.problem}"
    code, err = _parse(command.argv)
    if code not in (None, 0):  # 0: --help / --version printed and exited
        return f"{where} does not parse (argv {list(command.argv)}):\n{err.strip()}"
    # argparse also takes a unique prefix of an option (--batch for --batch-size): the docs must
    # spell options in full, as `segflow [COMMAND] --help` lists them.
    sub = next((t for t in command.argv if t in SUBCOMMANDS), None)
    listed = _help_text(()) + (_help_text((sub,)) if sub else "")
    after = command.argv[command.argv.index(sub) + 1:] if sub else ()
    if after and not after[0].startswith("-"):  # a nested command (`segflow model import --help`); else a
        listed += _help_text((sub, after[0]))   # positional argument, and this repeats the command's help
    abbreviated = [tok for tok in (t.split("=")[0] for t in command.argv if t.startswith("-"))
                   if not re.search(rf"(?<![\w-]){re.escape(tok)}(?![\w-])", listed)]
    if abbreviated:
        return f"{where} uses options that `segflow --help` does not list in full: {abbreviated}"
    return None


@pytest.mark.parametrize("command", ALL_COMMANDS, ids=lambda c: f"{c.file}:{c.line}:{' '.join(c.argv[:1])}")
def test_documented_command_parses(command: Command) -> None:
    # `segflow --version` is documented with the option that adds it; until the parser has it,
    # argparse's own message says so and only that line is skipped.
    if "--version" in command.argv and _parser_lacks("--version"):
        pytest.skip("parser has no --version yet")
    problem = command_problem(command)
    if problem:
        pytest.fail(problem, pytrace=False)


def test_the_docs_hold_commands_of_every_subcommand() -> None:
    documented = {c.argv[0] for c in ALL_COMMANDS if c.argv and not c.argv[0].startswith("-")}
    assert documented >= set(SUBCOMMANDS)


def test_command_extraction_on_a_hand_written_block() -> None:
    text = ("segflow ingest --images a  # prose, not code\n"
            "```sh\n"
            "# a comment line\n"
            "segflow segment --store s --checkpoint c \\\n"
            "    --out o [--device cpu|cuda] [--tta]   # trailing comment\n"
            "PREFECT_API_URL=http://x/api segflow report --lake 'a b'\n"
            "pip install 'segflow[s3]'\n"
            "```\n"
            "```text\n"
            "segflow CLI   flows/cli.py\n"
            "```\n")
    found = segflow_commands(text, file="t.md")
    assert [(c.line, c.argv) for c in found] == [
        (4, ("segment", "--store", "s", "--checkpoint", "c", "--out", "o", "--device", "cpu", "--tta")),
        (4, ("segment", "--store", "s", "--checkpoint", "c", "--out", "o", "--device", "cuda", "--tta")),
        (6, ("report", "--lake", "a b")),
    ]


@pytest.mark.parametrize(("option", "complaint"), [
    ("--batch-size", None),
    ("--batchsize", "unrecognized arguments: --batchsize"),
    ("--batch", "does not list in full: ['--batch']"),  # argparse alone would take the prefix
])
def test_a_wrong_option_is_reported(option: str, complaint: str | None) -> None:
    argv = ("-v", "segment", "--store", "s", "--checkpoint", "c", "--out", "o", option, "8")
    problem = command_problem(Command("t.md", 3, "segflow " + " ".join(argv), argv))
    if complaint is None:
        assert problem is None
    else:
        assert problem is not None and problem.startswith("t.md:3: `segflow -v segment") and complaint in problem


# --- segcore names, paths, links -----------------------------------------------------------------

_DOTTED = re.compile(r"\bsegcore(?:\.[A-Za-z_]\w*)+")
_PATH = re.compile(r"`((?:segcore|flows|tasks|deployments|tests|bench)/[^`\s]*)`")
_PATH_NAMES = re.compile(r"`(segcore/[\w/]+\.py)`\s*\(((?:`\w+`(?:,\s*)?)+)\)")
_LINK = re.compile(r"\]\(([^)\s]+)\)")


def resolve(name: str) -> object:
    """Import the longest importable module prefix of dotted ``name``, then getattr the rest."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module_name.startswith(exc.name):
                continue  # this prefix is not a module: try a shorter one
            raise
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(name)


@pytest.mark.parametrize("doc", DOC_FILES, ids=_rel)
def test_segcore_names_resolve(doc: Path) -> None:
    names = sorted(set(_DOTTED.findall(doc.read_text())))
    broken = []
    for name in names:
        try:
            resolve(name)
        except (ImportError, AttributeError) as exc:
            broken.append(f"{name}: {exc}")
    assert not broken, f"{_rel(doc)} names segcore objects that do not exist:\n" + "\n".join(broken)


def test_resolve_finds_real_names_and_refuses_made_up_ones() -> None:
    from segcore.run.results import RunReader

    assert resolve("segcore.run.results.RunReader.dice") is RunReader.dice
    with pytest.raises(AttributeError):
        resolve("segcore.run.results.no_such_reader")
    with pytest.raises(AttributeError):
        resolve("segcore.no_such_module")


@pytest.mark.parametrize("doc", DOC_FILES, ids=_rel)
def test_repository_paths_exist(doc: Path) -> None:
    missing = sorted({p for p in _PATH.findall(doc.read_text()) if not (REPO / p).exists()}
                     - {path for path, _ in NOT_YET_IN_CODE})
    assert not missing, f"{_rel(doc)} names paths that do not exist: {missing}"


PATH_NAMES = [(_rel(doc), path, name) for doc in DOC_FILES for path, names in _PATH_NAMES.findall(doc.read_text())
              for name in re.findall(r"`(\w+)`", names)]


@pytest.mark.parametrize(("doc", "path", "name"), PATH_NAMES, ids=lambda v: str(v))
def test_names_next_to_a_module_path_exist_there(doc: str, path: str, name: str) -> None:
    module = path.removesuffix(".py").replace("/", ".")
    try:
        resolve(f"{module}.{name}")
    except (ImportError, AttributeError) as exc:
        if (path, name) in NOT_YET_IN_CODE:
            pytest.skip(f"{path} has no {name} yet")
        pytest.fail(f"{doc}: `{path}` (`{name}`) does not exist: {exc}", pytrace=False)


def test_the_three_places_to_look_are_named() -> None:
    assert {(p, n) for doc, p, n in PATH_NAMES if doc == "README.md"} >= {
        ("segcore/models/predict.py", "Predictor"), ("segcore/models/predict.py", "load_predictor"),
        ("segcore/run/evaluate.py", "dice_rows"), ("segcore/run/rundir.py", "mark_done")}


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    headings, inside = [], False
    for line in doc.read_text().splitlines():
        if _FENCE.match(line):
            inside = not inside
        elif not inside and line.startswith("#"):
            headings.append(line.lstrip("#"))
    return {_slug(h) for h in headings}


@pytest.mark.parametrize("doc", DOC_FILES, ids=_rel)
def test_relative_links_resolve(doc: Path) -> None:
    broken = []
    for target in _LINK.findall(doc.read_text()):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        dest = (doc.parent / path).resolve() if path else doc
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and anchor not in _anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {_rel(dest)}")
    assert not broken, f"{_rel(doc)} has broken links:\n" + "\n".join(broken)


def test_slugs_follow_github() -> None:
    assert _slug(" Dice dataset (`RUN_DIR/dice/`)") == "dice-dataset-run_dirdice"
    assert _slug(" Outputs on S3 and other filesystems") == "outputs-on-s3-and-other-filesystems"


# --- segcore.open_run ----------------------------------------------------------------------------

def test_open_run_is_exported_from_segcore() -> None:
    import segcore
    import segcore.run.results

    assert segcore.open_run is segcore.run.results.open_run
    assert "open_run" in segcore.__all__
    with pytest.raises(AttributeError, match="no_such_name"):
        segcore.no_such_name  # noqa: B018


def test_import_segcore_stays_light(tmp_path: Path) -> None:
    probe = "import sys, segcore; print(sorted(m for m in ('zarr', 'torch', 'pyarrow') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                            env={"PYTHONPATH": str(REPO), "PATH": ""}, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
