"""The README's own commands, run in order in a temporary directory, so that the README cannot drift from the code.

What runs: every line of the README's ```sh blocks, in the README's order, then its complete ```python examples (the
blocks that begin with an import; a fragment such as a class to add to the likelihood table is for reading, and its own
test covers it), all in one temporary directory, except (the rule the README states):
- the set-up, `make ...` and `pip ...`: the test suite itself and installs (CI runs `make test`; the clean-clone
  check runs `make demo`);
- the activation line `. .venv/bin/activate`: the commands run with this test's own interpreter instead;
- what needs CelebA (a line or example naming a `celeba:` source or a CelebA run, `runs/celeba...`) or several
  processes (`torchrun`);
- `facevae serve`: a server that runs until Ctrl-C (tests/test_web*.py start it and stop it).
A `facevae ...` line runs through facevae.cli.main in this process (the console script's own entry point, without
starting an interpreter per line) and must exit 0; any other line runs in bash. The one addition to the README's
text: `facevae train` lines get `--set epochs=1` (the same recipes on a tiny budget). The repository's configs/ are
linked into the directory, and caches go to a temporary FACEVAE_CACHE.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from facevae.cli import main

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
EPOCHS = 1


def blocks(language: str, text: str | None = None) -> list[str]:
    """The bodies of the README's fenced blocks of one language, in order."""
    text = README.read_text() if text is None else text
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def examples() -> list[str]:
    """The README's complete Python examples: the python blocks that begin with an import."""
    return [code for code in blocks("python") if code.startswith(("import ", "from ")) and not needs_celeba(code)]


def needs_celeba(text: str) -> bool:
    """Whether a command or example needs CelebA: it names a celeba: source or a CelebA run (runs/celeba...)."""
    return "celeba:" in text or "runs/celeba" in text


def skipped(words: list[str]) -> str | None:
    """Why a command line is not run here, or None when it is."""
    if words[0] in ("make", "pip"):
        return "the set-up: the tests themselves, installs"
    if words[:2] == [".", ".venv/bin/activate"] or words[0] == "source":
        return "the activation line: this test runs the commands with its own interpreter"
    if needs_celeba(" ".join(words)):
        return "needs CelebA"
    if words[0] == "torchrun":
        return "needs several processes"
    if words[:2] == ["facevae", "serve"]:
        return "a server that runs until stopped"
    return None


def commands(text: str | None = None) -> list[list[str]]:
    """Every command line of the README's sh blocks, in order, as words (comments and blank lines dropped)."""
    out = []
    for body in blocks("sh", text):
        for line in body.splitlines():
            words = shlex.split(line, comments=True)
            if words:
                out.append(words)
    return out


def test_the_skip_rule_keeps_the_local_commands():
    sample = "```sh\nmake demo    # set up\n. .venv/bin/activate\nfacevae train --data lfw  # x\n" \
             "facevae prepare --data celeba:/data/celeba\ntorchrun -m facevae train\n```\n"
    ran = [words for words in commands(sample) if not skipped(words)]
    assert ran == [["facevae", "train", "--data", "lfw"]]
    readme = [words for words in commands() if not skipped(words)]
    assert len(readme) >= 6 and all(words[0] == "facevae" for words in readme)  # the README's walk-through
    assert any(words[:2] == ["facevae", "train"] for words in readme) and examples()


def test_readme_commands_run_in_order(tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    (work / "configs").symlink_to(ROOT / "configs")
    monkeypatch.chdir(work)
    monkeypatch.setenv("FACEVAE_CACHE", str(tmp_path / "cache"))
    for words in commands():
        if skipped(words):
            continue
        if words[0] == "facevae":
            extra = ["--set", f"epochs={EPOCHS}"] if words[1] == "train" else []
            status = main(words[1:] + extra)
            out, err = capsys.readouterr()
            assert status == 0, f"{shlex.join(words)} exited {status}:\n{err[-2000:]}"
        else:
            proc = subprocess.run(["bash", "-c", shlex.join(words)], capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, f"{shlex.join(words)} exited {proc.returncode}:\n{proc.stderr[-2000:]}"
    for code in examples():
        exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})  # noqa: S102 - the README's own code
    out = capsys.readouterr().out
    assert "ELBO of 8 test faces" in out
    for name in ("faces.png", "recon.png", "compare.png", "runs/lfw-faces/eval.json", "runs/first/eval.json"):
        assert (work / name).is_file(), name
