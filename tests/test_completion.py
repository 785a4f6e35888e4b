"""``consulate completion bash`` (generated from the parser: checked by bash itself,
then exercised the way bash calls it) and the example in every command's --help."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from consulate.control.cli import build_parser
from consulate.control.completion import command_specs

CLI = [sys.executable, "-m", "consulate.control.cli"]


@pytest.fixture(scope="module")
def script(tmp_path_factory: pytest.TempPathFactory) -> Path:
    done = subprocess.run([*CLI, "completion", "bash"], capture_output=True, text=True,
                          timeout=30)
    assert (done.returncode, done.stderr) == (0, "")
    path = tmp_path_factory.mktemp("completion") / "consulate.bash"
    path.write_text(done.stdout)
    return path


def complete(script: Path, *words: str) -> list[str]:
    """What bash offers for the command line ``consulate <words>`` (the last word being
    the one under the cursor), by calling the function as ``complete -F`` does."""
    line = " ".join(["consulate", *(f"'{w}'" for w in words)])
    program = (f"source {script}\n"
               f"COMP_WORDS=({line}); COMP_CWORD={len(words)}\n"
               "_consulate; printf '%s\\n' \"${COMPREPLY[@]}\"\n")
    done = subprocess.run(["bash", "--norc", "-c", program], capture_output=True, text=True,
                          timeout=30)
    assert (done.returncode, done.stderr) == (0, "")
    return [word for word in done.stdout.splitlines() if word]


def test_bash_accepts_the_script(script: Path) -> None:
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert (done.returncode, done.stderr) == (0, "")
    assert script.read_text().endswith("complete -o default -F _consulate consulate\n")


def test_every_subcommand_completes(script: Path) -> None:
    top = command_specs(build_parser())[0]
    assert {"agent", "status", "services", "routes", "completion", "lab"} <= set(
        top.subcommands)
    assert complete(script, "") == list(top.subcommands)
    assert complete(script, "st") == ["status"]
    assert complete(script, "lab", "") == ["up", "down", "exec", "status"]


def test_flags_of_the_command_typed(script: Path) -> None:
    assert complete(script, "status", "--") == ["--help", "--http-addr", "--token",
                                                "--ca-file", "--client-cert",
                                                "--client-key", "--json"]
    assert complete(script, "lab", "up", "--h") == ["--help", "--hosts"]
    assert complete(script, "--") == ["--help", "--version", "--log-level"]


def test_values_of_flags_are_skipped_and_choices_offered(script: Path) -> None:
    assert complete(script, "--log-level", "") == ["debug", "info", "warning", "error"]
    # "info" is --log-level's value, not a command: the path is still the top level.
    assert complete(script, "--log-level", "info", "ro") == ["routes"]
    assert complete(script, "services", "--http-addr", "") == []  # bash offers files
    assert complete(script, "completion", "") == ["bash"]  # a positional's choices
    assert complete(script, "register", "") == []  # a free positional: bash offers files


def subcommand_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
                       ) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    found = [(path, parser)]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, subparser in action.choices.items():
                found += subcommand_parsers(subparser, (*path, name))
    return found


# registrator's -h is gliderlabs/registrator's Go-style usage (registrator/flags.py).
HELPS = {path: parser.format_help() for path, parser in subcommand_parsers(build_parser())
         if path != ("registrator",)}


@pytest.mark.parametrize("path", list(HELPS), ids=" ".join)
def test_every_help_ends_with_an_example(path: tuple[str, ...]) -> None:
    before, _, example = HELPS[path].partition("\nexample:\n")
    lines = example.splitlines()
    assert before and lines and all(line.startswith("  ") and line.strip()
                                    for line in lines), HELPS[path]
    assert f"consulate {' '.join(path)}".rstrip() in example or path == ("completion",)


def test_help_is_printed_with_its_example() -> None:
    done = subprocess.run([*CLI, "routes", "--help"], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0
    assert done.stdout.endswith("\nexample:\n  consulate routes\n"
                                "  consulate routes --json | jq -r '.[] | .service + \" \" + "
                                ".vip'\n")
