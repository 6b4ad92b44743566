"""README.md and docs/: every command they show names something that exists. A `make` target is
one of the Makefile's, with variables it reads; a `python FILE` is a file whose own --help (or,
for train.py and sft.py, the config's parser) accepts every option shown; `python -m MODULE` is a
module; `rodin COMMAND` is one of rodin's commands and its --help lists the options shown."""

import contextlib
import glob
import importlib.util
import io
import os
import re
import runpy
import shlex
import sys

import pytest
from conftest import ROOT

from rodin.__main__ import COMMANDS
from rodin.config import PRESETS, SFT_PRESETS, parse_args

PAGES = ["README.md", *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))), "data/README.md"]
LEADS = ("python ", "python3 ", "rodin ", "make ", "torchrun ")


def commands(path):
    """(line, command) of each command in a page's bash blocks and in its inline code."""
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        text = f.read()
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            found += [part for part in re.split(r"&&|;", line.split(" #")[0]) if part.strip()]
    for span in re.findall(r"`((?:python3? |rodin |make |torchrun )[^`]+)`", text):
        found += re.split(r"&&|;", span)
    return [c.strip() for c in found if c.strip().startswith(LEADS)]


def help_text(target):
    """What `target --help` prints: a script path, or ('rodin', COMMAND)."""
    out = io.StringIO()
    argv = sys.argv
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out), pytest.raises(SystemExit):
            if isinstance(target, tuple):
                sys.argv = ["rodin", target[1], "--help"]
                importlib.import_module(COMMANDS[target[1]][0]).main(["--help"])
            else:
                sys.argv = [target, "--help"]
                runpy.run_path(os.path.join(ROOT, target), run_name="__main__")
    finally:
        sys.argv = argv
    return out.getvalue()


def options(words):
    return [w for w in words if w.startswith("--")]


def listed(option, help_output):
    """Whether --help lists the option itself (--out is not --out_dir)."""
    return re.search(re.escape(option.split("=")[0]) + r"(?![\w-])", help_output) is not None


def check(command, helps):
    words = shlex.split(command)
    while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # VAR=value before a command
        words = words[1:]
    lead, rest = words[0], words[1:]
    if lead == "make":
        with open(os.path.join(ROOT, "Makefile"), encoding="utf-8") as f:
            makefile = f.read()
        targets = set(re.findall(r"^([a-z][\w-]*):", makefile, re.M))
        for word in rest:
            if "=" in word:
                variable = word.split("=")[0]
                assert f"$({variable})" in makefile or f"{variable} ?=" in makefile, f"{command}: Makefile reads no {variable}"
            else:
                assert word in targets, f"{command}: no make target {word!r}"
        return
    if lead == "rodin":
        assert rest and rest[0] in COMMANDS, f"{command}: no rodin command {rest[:1]}"
        key = ("rodin", rest[0])
        text = helps.setdefault(key, help_text(key))
        for option in options(rest[1:]):
            if rest[0] == "supervise" and "--" in rest and rest.index("--") < rest.index(option):
                return check(" ".join(rest[rest.index("--") + 1:]), helps)
            assert listed(option, text), f"{command}: `rodin {rest[0]} --help` has no {option.split('=')[0]}"
        return
    if lead == "torchrun":
        rest = rest[next(i for i, w in enumerate(rest) if w.endswith(".py")):]
    if rest[:1] == ["-m"]:
        assert importlib.util.find_spec(rest[1]) is not None, f"{command}: no module {rest[1]}"
        return
    script = rest[0]
    assert os.path.exists(os.path.join(ROOT, script)), f"{command}: no file {script}"
    if script in ("train.py", "sft.py"):
        given = [w for w in options(rest[1:]) if "=" in w]
        parse_args(given, presets=SFT_PRESETS if script == "sft.py" else PRESETS)  # raises on an unknown option
        return
    text = helps.setdefault(script, help_text(script))
    for option in options(rest[1:]):
        assert listed(option, text), f"{command}: `{script} --help` has no {option.split('=')[0]}"


@pytest.mark.parametrize("page", PAGES)
def test_every_command_a_page_shows_exists_with_its_options(page):
    helps = {}
    shown = commands(page)
    for command in shown:
        check(command, helps)


def test_the_readme_fits_on_a_few_screens_and_links_pages_that_exist():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    assert readme.count("\n") <= 220
    assert len(commands("README.md")) >= 15
    for link in re.findall(r"\]\(([^)#]+)\)", readme):
        assert os.path.exists(os.path.join(ROOT, link)), link
