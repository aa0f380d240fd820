"""Every command in the README parses and composes as a shell user types it: shell quoting first (shlex), then
diffusers' flags, then Hydra's override grammar and the composition of the app's config."""
from __future__ import annotations

import re
import shlex

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from memfilter.launch.diffusers_flags import translate
from tests.conftest import REPO, compose

APPS = {"train": "train", "train.sbatch": "train", "demo": "demo", "prepare": "prepare", "evaluate": "evaluate",
        "detect": "detect", "build_world_base": "build_world_base", "curate": "curate", "calibrate": "calibrate",
        "explain": "explain", "mitigate": "mitigate"}


def readme_commands() -> list[str]:
    """Shell commands of the README's bash blocks (continuations joined) and of its inline code spans."""
    text = (REPO / "README.md").read_text()
    out = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        out += [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip() and not c.startswith("#")]
    out += re.findall(r"`((?:python|accelerate launch) launch/[^`]+)`", text)
    return [c for c in out if re.search(r"launch/(\w+)\.py|launch/slurm/train\.sbatch|^memfilter-\w+", c)]


def _app_and_args(command: str) -> list[tuple[str, list[str]]]:
    found = []
    for part in command.split("&&"):
        words = shlex.split(part, comments=True)
        for i, w in enumerate(words):
            m = re.search(r"(?:launch/(?:slurm/)?|^memfilter-)(\w+(?:\.sbatch)?)(?:\.py)?$", w)
            if m and m.group(1) in APPS:
                found.append((APPS[m.group(1)], words[i + 1:]))
                break
    return found


COMMANDS = readme_commands()


def test_the_readme_has_commands_to_check():
    assert len(COMMANDS) >= 20


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses_and_composes(command):
    for app, args in _app_and_args(command):
        if app == "train":
            args = translate(args)
        flags = [a for a in args if a.startswith("-")]
        overrides = [a for a in args if not a.startswith("-")]
        if "--cfg" in flags:                                 # `--cfg job` prints the config: nothing to override
            overrides = [o for o in overrides if o not in ("job", "hydra", "all")]
        parsed = OverridesParser.create().parse_overrides(overrides)       # Hydra's grammar, as the CLI reads it
        if "-m" in flags or "--multirun" in flags or any(p.is_sweep_override() for p in parsed):
            continue                                         # a sweep: its grammar is what can fail here
        compose(overrides, config_name=app)
