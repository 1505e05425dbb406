"""The docs run as written: Python blocks execute, command lines parse, paths, links and names exist.

Python blocks of README.md and docs/*.md run for real, each with fresh globals in its own empty directory, in one
subprocess (offline; the imports are paid once). Command lines are checked, not run: training options through
`parse_config`, `vla-energy evaluate` through its argparse parser, accelerate's options through accelerate's
parser, and every referenced file must exist. A block preceded by `<!-- docs-test: skip (reason) -->` is reported
as skipped with that reason; `<!-- docs-test: trained run at runs/demo -->` gives the block a tiny trained run there.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

from vla_energy.training.arguments import RENAMED_OPTIONS, parse_config

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(
    r"(?:<!--\s*docs-test:\s*(?P<directive>[^>]*?)\s*-->[ \t]*\n(?:[ \t]*\n)*)?"
    r"^(?P<indent>[ \t]*)```(?P<lang>[a-z]*)[ \t]*\n(?P<code>.*?)^(?P=indent)```",
    re.M | re.S,
)
SKIP = re.compile(r"skip \((?P<reason>[^)]+)\)")
TRAINED_RUN = re.compile(r"trained run at (?P<path>\S+)")


@dataclass
class Block:
    """One fenced code block of a markdown file."""

    path: Path
    line: int
    lang: str
    code: str
    directive: Optional[str]

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def skip_reason(self) -> Optional[str]:
        m = SKIP.fullmatch(self.directive or "")
        return m["reason"] if m else None


def read_blocks(path: Path) -> list[Block]:
    """The ```python and ```bash blocks of one markdown file, with their docs-test directives."""
    text = path.read_text()
    blocks = []
    for m in FENCE.finditer(text):
        directive = m["directive"]
        if directive is not None and not (SKIP.fullmatch(directive) or TRAINED_RUN.fullmatch(directive)):
            raise ValueError(f"{path}: unknown docs-test directive {directive!r}")
        if m["lang"] in ("python", "bash"):
            line = text.count("\n", 0, m.start("code")) + 1
            blocks.append(Block(path, line, m["lang"], textwrap.dedent(m["code"]), directive))
    return blocks


BLOCKS = [b for path in DOC_FILES for b in read_blocks(path)]
PYTHON = [b for b in BLOCKS if b.lang == "python"]
BASH = [b for b in BLOCKS if b.lang == "bash"]

# Settings of the tiny run given to blocks marked `trained run at ...` (a 1-process run of the real recipe).
TINY_RUN = ["--backbone", "tiny-llava", "--dataset", "synthetic", "--num_episodes", "12", "--horizon", "8",
            "--per_device_train_batch_size", "4", "--max_steps", "2", "--eval_steps", "0", "--eval_max_samples", "8",
            "--eval_num_negatives", "3", "--val_fraction", "0.25", "--lora_r", "4", "--energy_hidden_dim", "16",
            "--action_head_dim", "16", "--report_to", "none", "--disable_tqdm"]

RUNNER = r'''
import json, os, shutil, sys, time, traceback
blocks, work, tiny_run = json.load(open(sys.argv[1])), sys.argv[2], json.loads(sys.argv[3])
results, trained = {}, None
for i, block in enumerate(blocks):
    cwd = os.path.join(work, f"block{i}")
    os.makedirs(cwd)
    os.chdir(cwd)
    start = time.time()
    try:
        if block["run"]:
            if trained is None:
                from vla_energy.training.train import main as train_main
                train_main(tiny_run + ["--output_dir", os.path.join(work, "trained"), "--run_name", "run"])
                trained = os.path.join(work, "trained", "run")
            shutil.copytree(trained, block["run"])
        exec(compile(block["code"], block["name"], "exec"), {"__name__": "__main__"})
        results[block["name"]] = {"ok": True}
    except BaseException:
        results[block["name"]] = {"ok": False, "error": traceback.format_exc()[-4000:]}
    results[block["name"]]["seconds"] = round(time.time() - start, 2)
    if "accelerate.state" in sys.modules:  # each block starts without an Accelerator, as a fresh script would
        from accelerate.state import AcceleratorState
        AcceleratorState._reset_state(reset_partial_state=True)
json.dump(results, open(sys.argv[4], "w"))
'''


@pytest.fixture(scope="module")
def python_results(tmp_path_factory) -> dict:
    """Run every non-skipped Python block once, in one subprocess; {block name: {ok, error, seconds}}."""
    work = tmp_path_factory.mktemp("docs")
    todo = []
    for b in PYTHON:
        if b.skip_reason is None:
            run = TRAINED_RUN.fullmatch(b.directive or "")
            todo.append({"name": b.name, "code": b.code, "run": run["path"] if run else None})
    (work / "blocks.json").write_text(json.dumps(todo))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "VLA_ENERGY_CACHE": str(work / "cache"),
           "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(work / "blocks.json"), str(work / "blocks"),
                           json.dumps(TINY_RUN), str(work / "results.json")],
                          env=env, cwd=work, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (work / "blocks").mkdir(exist_ok=True)
    return json.loads((work / "results.json").read_text())


@pytest.mark.parametrize("block", PYTHON, ids=[b.name for b in PYTHON])
def test_python_block_runs(block: Block, python_results: dict) -> None:
    if block.skip_reason is not None:
        pytest.skip(block.skip_reason)
    result = python_results[block.name]
    assert result["ok"], f"{block.name} failed:\n{result['error']}"


# ---------------------------------------------------------------------------------------------- command lines


def logical_lines(code: str) -> list[list[str]]:
    """Commands of a bash block as token lists: continuations joined, comments and redirections dropped."""
    commands = []
    for line in code.replace("\\\n", " ").splitlines():
        tokens = shlex.split(line, comments=True)
        if ">" in tokens:
            tokens = tokens[: tokens.index(">")]
        while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", tokens[0]):  # VAR=value prefixes
            tokens = tokens[1:]
        if tokens[:2] == ["/usr/bin/time", "-v"]:
            tokens = tokens[2:]
        if tokens:
            commands.append(tokens)
    return commands


def check_path(path: str, where: str) -> None:
    assert (ROOT / path).exists(), f"{where}: {path} does not exist"


def check_evaluate(argv: list[str], where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`vla-energy evaluate` options through its own argparse parser (the evaluation itself is not run)."""
    from vla_energy import cli
    from vla_energy.evaluation import evaluate

    seen = {}
    monkeypatch.setattr(evaluate, "evaluate_run", lambda *a, **k: seen.setdefault("args", a) and {})
    monkeypatch.setattr(evaluate, "evaluation_tables", lambda metrics: "")  # nothing was evaluated to print
    try:
        cli.main(["evaluate", *argv])
    except SystemExit as e:  # argparse's way of saying "bad option"
        pytest.fail(f"{where}: vla-energy evaluate {' '.join(argv)} does not parse (exit {e.code})")
    assert seen, f"{where}: vla-energy evaluate {' '.join(argv)} did not reach the evaluation"


SIM_COMMANDS = {"sim-demos": "vla_energy.sim.demos", "rollout": "vla_energy.sim.rollout"}


def check_sim(module: str, argv: list[str], where: str) -> None:
    """`vla-energy sim-demos` / `rollout` options through their argparse parsers (needs no simulator)."""
    import importlib

    try:
        importlib.import_module(module).build_parser().parse_args(argv)
    except SystemExit as e:
        pytest.fail(f"{where}: {module} {' '.join(argv)} does not parse (exit {e.code})")


def check_target(target: str, argv: list[str], where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A script or module with its options: the training recipe, the evaluation, or a script with known flags."""
    if target in ("vla_energy.training.train", "recipes/train_energy.py"):
        parse_config(argv)
    elif target == "recipes/evaluate.py":
        check_evaluate(argv, where, monkeypatch)
    elif target == "recipes/trainer_example.py":
        assert not argv, f"{where}: recipes/trainer_example.py takes no options, got {argv}"
    elif target in SIM_COMMANDS.values():
        check_sim(target, argv, where)
    elif target == "vla_energy.training.arguments":
        assert not argv, f"{where}: python -m vla_energy.training.arguments takes no options"
    elif target == "pytest":
        for arg in argv:
            if not arg.startswith("-"):
                check_path(arg.split("::")[0], where)
    elif target.endswith(".py"):
        check_path(target, where)
        source = (ROOT / target).read_text()
        for opt in argv:
            if opt.startswith("--"):
                assert f'"{opt.split("=")[0]}"' in source, f"{where}: {target} has no option {opt}"
    else:
        pytest.fail(f"{where}: no check for {target}")


def check_command(tokens: list[str], where: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One command line of the docs, checked without running it."""
    cmd, args = tokens[0], tokens[1:]
    if cmd == "make":
        makefile = (ROOT / "Makefile").read_text()
        for target in args:
            assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"{where}: no make target {target}"
    elif cmd.endswith("pip") or args[:2] in (["-m", "pip"], ["-m", "venv"]):
        pass  # installing is not checked here
    elif cmd == "accelerate":
        assert args[:1] == ["launch"], f"{where}: only `accelerate launch` is checked"
        from accelerate.commands.launch import launch_command_parser

        try:
            launch = launch_command_parser().parse_args(args[1:])
        except SystemExit:
            pytest.fail(f"{where}: accelerate launch options do not parse: {args[1:]}")
        if launch.config_file:
            check_path(launch.config_file, where)
        if not launch.module:
            check_path(launch.training_script, where)
        check_target(launch.training_script, launch.training_script_args, where, monkeypatch)
    elif cmd == "vla-energy" and args[:1] == ["train"]:
        rest, i = [], 1
        while i < len(args):
            if args[i] in ("--num_processes", "--main_process_port"):
                int(args[i + 1])
                i += 2
            elif args[i] == "--accelerate_config":
                check_path(args[i + 1], where)
                i += 2
            else:
                rest.append(args[i])
                i += 1
        parse_config(rest)
    elif cmd == "vla-energy" and args[:1] == ["evaluate"]:
        check_evaluate(args[1:], where, monkeypatch)
    elif cmd == "vla-energy" and args[:1] and args[0] in SIM_COMMANDS:
        check_sim(SIM_COMMANDS[args[0]], args[1:], where)
    elif cmd in ("python", "python3"):
        if args[:1] == ["-m"]:
            check_target(args[1], args[2:], where, monkeypatch)
        else:
            check_path(args[0], where)
            check_target(args[0], args[1:], where, monkeypatch)
    else:
        pytest.fail(f"{where}: no check for the command {cmd!r}; add one in tests/test_docs.py")


@pytest.mark.parametrize("block", BASH, ids=[b.name for b in BASH])
def test_command_lines_parse(block: Block, monkeypatch: pytest.MonkeyPatch) -> None:
    if block.skip_reason is not None:
        pytest.skip(block.skip_reason)
    monkeypatch.chdir(ROOT)  # relative config paths are relative to the repository, as in the docs
    commands = logical_lines(block.code)
    assert commands, f"{block.name}: an empty bash block"
    for tokens in commands:
        check_command(tokens, block.name, monkeypatch)


def test_block_extraction_sees_directives_and_indented_blocks(tmp_path: Path) -> None:
    md = tmp_path / "x.md"
    md.write_text("text\n<!-- docs-test: skip (needs a GPU) -->\n```python\nimport cuda\n```\n\n"
                  "- item\n\n  ```bash\n  make demo\n  ```\n```text\nnot code\n```\n")
    blocks = read_blocks(md)
    assert [(b.lang, b.line, b.skip_reason, b.code) for b in blocks] == [
        ("python", 4, "needs a GPU", "import cuda\n"), ("bash", 10, None, "make demo\n")]
    assert logical_lines("A=1 /usr/bin/time -v make demo  # c\naccelerate launch \\\n  -m x --y 1 > f\n") == [
        ["make", "demo"], ["accelerate", "launch", "-m", "x", "--y", "1"]]


# ------------------------------------------------------------------------------------- pages, names and paths


def doc_texts() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text() for p in DOC_FILES}


def test_api_page_lists_every_top_level_name() -> None:
    import vla_energy

    api = (ROOT / "docs" / "api.md").read_text()
    missing = [name for name in vla_energy.__all__ if f"`{name}`" not in api]
    assert not missing, f"docs/api.md does not list {missing}"


def test_index_lists_every_page_and_readme_links_the_api() -> None:
    index = (ROOT / "docs" / "index.md").read_text()
    for page in sorted((ROOT / "docs").glob("*.md")):
        if page.name != "index.md":
            assert f"({page.name})" in index, f"docs/index.md does not link {page.name}"
    assert "(docs/api.md)" in (ROOT / "README.md").read_text()


def test_relative_links_exist() -> None:
    for name, text in doc_texts().items():
        base = (ROOT / name).parent
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if not re.match(r"[a-z]+://", target):
                assert (base / target).exists(), f"{name}: link to {target} does not exist"


def test_seed_notes_are_named_only_in_background() -> None:
    pattern = re.compile(r"seed (?:000|002)|seeds?'s?\s|seeds'", re.I)
    for name, text in doc_texts().items():
        if name != "docs/background.md":
            assert not pattern.search(text), f"{name}: {pattern.search(text)[0]!r} belongs in docs/background.md"


def test_no_old_option_names() -> None:
    for name, text in doc_texts().items():
        for old in RENAMED_OPTIONS:
            hit = re.search(rf"--{old}\b|`{old}`|^\s*{old}:", text, re.M)
            assert not hit, f"{name}: old option name {hit[0]!r}, now {RENAMED_OPTIONS[old]!r}"


def test_files_and_tests_named_in_docs_exist() -> None:
    for name, text in doc_texts().items():
        for path in set(re.findall(r"\b(?:vla_energy|recipes|benchmarks|tests)/[\w/.*-]*\w", text)):
            assert list(ROOT.glob(path)), f"{name}: {path} does not exist"
        for path, test in set(re.findall(r"\b((?:tests/)?test_\w+\.py)::(\w+)", text)):
            file = ROOT / (path if path.startswith("tests/") else f"tests/{path}")
            assert f"def {test}(" in file.read_text(), f"{name}: {path}::{test} does not exist"


def resolve_dotted(dotted: str) -> object:
    """Import the longest module prefix of a dotted name, then follow attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ModuleNotFoundError(dotted)


def test_dotted_names_in_docs_resolve() -> None:
    for name, text in doc_texts().items():
        for dotted in sorted(set(re.findall(r"\bvla_energy(?:\.\w+)+", text))):
            try:
                resolve_dotted(dotted)
            except (ImportError, AttributeError) as e:
                pytest.fail(f"{name}: {dotted} does not resolve ({e})")
