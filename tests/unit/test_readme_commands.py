"""Every command of the README (and of the reproduction's record, scripts/REPRODUCTION.md),
held to the code it runs.

The README's commands are read from its bash blocks and walked in order, as a new user pastes
them. Each one's arguments must parse with its own parser; a job's config must compose and
pass the job's own checks at the README's number of ranks; every path under `runs/` that a
command reads must have been written by a command before it (and the checkpoint step it
names must be one that run writes). The scripts that need only a model directory run for
real (chat, upcycle, the lm-eval model, the reproduction's dry run) on stand-ins for the
training jobs' outputs: a model of the job's composed architecture, random weights, and the
job's tokenizer files. What the training jobs themselves do is tested by tests/distributed.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
import shlex
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from data_pipelines.tokenizer import ENDOFTEXT, IM_END, load_tokenizer, write_tokenizer_files
from launch.job_check import CONFIG_DIR, JOBS, job_problems
from looplm import LoopLMConfig, LoopLMForCausalLM
from tests.unit.test_launch import USER_FILES

REPO = Path(__file__).resolve().parents[2]
RUNS = "runs/"
USER_DATA = re.compile(r"^data\.sources\[\d+\] \(\w+\): /?data/")
"""A data source in the README's placeholder for the user's own files (`/data/web/...`)."""
EARLIER_RUN = re.compile(r"(^|[\s'])runs/")
"""A problem about a `runs/` path: a documented command's input written by the job before it."""


DOCUMENTS = ("README.md", "scripts/REPRODUCTION.md")
"""The documents whose commands are walked, in this order."""


def readme_commands() -> list[list[str]]:
    """The commands of the documents' bash blocks in order: continuation lines joined,
    comments dropped, `a && b` split in two."""
    text = "\n".join((REPO / document).read_text() for document in DOCUMENTS)
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                commands.append(words[:cut])
                words = words[cut + 1 :]
    return commands


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def composed(module: str, args: list[str]):
    """The job's config object, composed as the job composes it."""
    config_name = JOBS[module][0]
    with contextlib.redirect_stdout(sys.stderr):
        importlib.import_module(module)  # registers the job's schemas
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return OmegaConf.to_object(compose(config_name=config_name, overrides=args))


def overrides(args: list[str]) -> dict[str, str]:
    return dict(arg.split("=", 1) for arg in args if "=" in arg and not arg.startswith("-"))


@dataclass
class Walk:
    """The README walked in a scratch folder standing in for the user's working directory."""

    root: Path
    written: dict[str, Callable[[], None]] = field(default_factory=dict)
    """runs/ path -> what makes its stand-in, in the order the README writes them."""
    jobs: dict[str, object] = field(default_factory=dict)
    """run_dir -> the composed config of the job writing it."""
    checked: list[str] = field(default_factory=list)

    def local(self, value: str) -> str:
        """A command's word with every runs/ path moved under the scratch folder."""
        return re.sub(r"(?<![\w/])runs/", f"{self.root}/runs/", value)

    def read(self, path: str) -> Path:
        """A runs/ path a command reads: written before (it or a folder above it, such as a
        run directory above its checkpoint). Returns the stand-in of what wrote it."""
        if not path.startswith(RUNS):
            return Path(path)
        writers = [w for w in self.written if path == w or path.startswith(w + "/")]
        assert writers, f"the README reads {path} before any command writes it"
        self.written[writers[-1]]()
        return Path(self.local(writers[-1]))

    def write(self, path: str | None, make: Callable[[Path], None]) -> None:
        if path is None or not path.startswith(RUNS):
            return
        target = Path(self.local(path))

        def once() -> None:
            if not target.exists():
                make(target)

        self.written[path] = once


def stand_in(config: LoopLMConfig, tokenizer: str, chat: bool) -> Callable[[Path], None]:
    """What a job writes as a model, for the commands that read it: the architecture and the
    tokenizer files are the job's, the weights random."""

    def make(path: Path) -> None:
        torch.manual_seed(0)
        LoopLMForCausalLM(config).save_pretrained(path)
        files = load_tokenizer(tokenizer)
        write_tokenizer_files(
            files, path, config.max_position_embeddings, IM_END if chat else ENDOFTEXT
        )

    return make


def copy_of(walk: Walk, source: str) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        shutil.copytree(walk.read(source), path)

    return make


def checkpoint_steps(cfg, world_size: int) -> set[int]:
    """The steps a pre-training run writes checkpoints at: every `every_steps`, each stage's
    end and the last step."""
    from train.config import _model_config, build_curriculum

    model_cfg, problems = _model_config(cfg)
    assert not problems, problems
    curriculum = build_curriculum(cfg, model_cfg, world_size)
    assert curriculum is not None, "a checkpoint step is named only for curriculum runs here"
    ends, tokens, step = set(), 0, 0
    for stage in curriculum.stages:
        while tokens < stage.end:
            tokens += curriculum.plan(tokens).tokens
            step += 1
        ends.add(step)
    every = cfg.checkpoint.every_steps
    return ends | set(range(every, step + 1, every))


# ---- one check per kind of command -----------------------------------------------------------


def check_job(walk: Walk, words: list[str]) -> None:
    """torchrun ... -m train.JOB overrides: composes and passes the job's checks."""
    module = words[words.index("-m") + 1]
    world_size = _world_size(words)
    given = overrides(words[words.index("-m") + 2 :])
    for key in ("init_from",):
        if key in given:
            walk.read(given[key])
    args = [walk.local(arg) for arg in words[words.index("-m") + 2 :]]
    problems = job_problems(module, args, world_size)
    assert [p for p in problems if not USER_DATA.search(p)] == [], " ".join(words)
    cfg = composed(module, args)
    if module == "train.pretrain":
        from train.config import _model_config

        model_cfg, _ = _model_config(cfg)
        make = stand_in(model_cfg, cfg.data.tokenizer, chat=False)
        walk.jobs[given["run_dir"]] = (cfg, world_size)
        walk.write(given["run_dir"], make)
    else:  # the model comes from init_from
        walk.write(given.get("run_dir"), copy_of(walk, given["init_from"]))
        export = given.get("export_dir")
        if export is not None:
            source = LoopLMConfig.load(walk.read(given["init_from"]) / "config.json")
            walk.write(export, stand_in(source, cfg.data.tokenizer, chat=module == "train.sft"))


def _world_size(words: list[str]) -> int:
    """The ranks a torchrun command starts: workers per node times nodes."""
    return int(_flag(words, "--nproc_per_node", "1")) * int(_flag(words, "--nnodes", "1"))


def _flag(words: list[str], name: str, default: str) -> str:
    for word in words:
        if word.startswith(name + "="):
            return word.split("=", 1)[1]
    return words[words.index(name) + 1] if name in words else default


def check_export(walk: Walk, args: list[str]) -> None:
    parsed = load_script("export_hf").parse_args(args)
    source = parsed.checkpoint
    step = re.search(r"^(.*)/checkpoints/step_(\d+)$", source)
    if step is not None:  # a named checkpoint must be one the run writes
        cfg, world_size = walk.jobs[step.group(1)]
        assert int(step.group(2)) in checkpoint_steps(cfg, world_size), source
    walk.read(source)
    walk.write(parsed.out_dir, copy_of(walk, source))


def check_upcycle(walk: Walk, args: list[str]) -> None:
    parsed = load_script("upcycle").parse_args(args)
    walk.read(parsed.in_dir)
    load_script("upcycle").main([walk.local(arg) for arg in args])
    assert Path(walk.local(parsed.out_dir), "config.json").is_file()
    walk.write(parsed.out_dir, lambda path: None)


def check_chat(walk: Walk, args: list[str], capsys) -> None:
    chat = load_script("chat")
    parsed = chat.parse_args(args)
    walk.read(parsed.model)
    capsys.readouterr()
    local = [walk.local(arg) for arg in args]
    if "--max-new-tokens" not in args:  # random weights rarely stop: bound the reply
        local += ["--max-new-tokens", "16"]
    assert chat.main(local) == 0
    assert capsys.readouterr().out.strip(), "chat printed no answer"


def check_evaluate(walk: Walk, args: list[str]) -> None:
    from train.evaluate import config_problems, register_configs

    register_configs()
    given = overrides(args)
    for key in ("model_path", "compare_path"):
        if key in given:
            walk.read(given[key])
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        cfg = OmegaConf.to_object(compose("evaluate", overrides=[walk.local(a) for a in args]))
    assert config_problems(cfg) == []


def check_lm_eval(walk: Walk, args: list[str], monkeypatch) -> None:
    """lm-eval's own parser reads the arguments; the model_args build the model (the tasks
    come from the Hugging Face hub, out of reach here)."""
    from lm_eval._cli import HarnessCLI

    from train.harness import MODEL_NAME, LoopLMEval

    monkeypatch.setattr(sys, "argv", ["looplm-lm-eval", *args])
    parsed = HarnessCLI().parse_args()
    assert parsed.model == MODEL_NAME
    model_args = dict(parsed.model_args)  # lm-eval has parsed `a=1,b=2` into a dict
    model_args["pretrained"] = str(walk.read(model_args["pretrained"]))
    LoopLMEval.create_from_arg_obj(model_args)


def check_reproduce(args: list[str], capsys) -> None:
    reproduce = load_script("reproduce")
    reproduce.main([*args, "--dry-run"])
    out = capsys.readouterr().out
    count = int(out.split(" models")[0].split()[-1])
    commands = [line for line in out.strip().splitlines()[1:] if not line.startswith("#")]
    assert count > 0 and len(commands) == count, out


def check_train_tokenizer(args: list[str]) -> None:
    script = load_script("train_tokenizer")
    sources, _ = script.sources_of(script.parse_args(args))
    assert sources


def check_pretokenize(args: list[str]) -> None:
    script = load_script("pretokenize")
    source, _ = script.source_and_config(script.parse_args(args))
    assert source.paths


def check_probe_task(args: list[str]) -> None:
    """The arguments parse and name a valid task setting (the probe itself is a long run)."""
    script = load_script("probe_task")
    parsed = script.parse_args(args)
    assert script.task_params(parsed.task, parsed.params)


def check_script(walk: Walk, script: str, args: list[str], capsys) -> bool:
    """Checks `python scripts/SCRIPT.py ARGS`; False for a script no check knows."""
    if script == "export_hf":
        check_export(walk, args)
    elif script == "upcycle":
        check_upcycle(walk, args)
    elif script == "chat":
        check_chat(walk, args, capsys)
    elif script == "reproduce":
        check_reproduce(args, capsys)
    elif script == "train_tokenizer":
        check_train_tokenizer(args)
    elif script == "pretokenize":
        check_pretokenize(args)
    elif script == "probe_task":
        check_probe_task(args)
    else:
        return False
    return True


def test_the_readme_commands_run_in_order_on_what_the_commands_before_them_wrote(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(REPO)  # the README's commands run in the repository's root
    walk = Walk(tmp_path)
    unknown = []
    for words in readme_commands():
        program, rest = words[0], words[1:]
        line = " ".join(words)
        if program == "torchrun":
            check_job(walk, words)
        elif program in ("python", "python3") and rest[0] == "-m":
            module, args = rest[1], rest[2:]
            if module == "launch":
                continue  # test_launch.py::test_every_readme_launch_command_runs_as_a_dry_run
            elif module == "pytest":
                assert line.startswith("python3 -m pytest -q")
            elif module == "train.evaluate":
                check_evaluate(walk, args)
            else:
                unknown.append(line)
                continue
        elif program == "python" and rest[0].startswith("scripts/"):
            script, args = Path(rest[0]).stem, rest[1:]
            if not check_script(walk, script, args, capsys):
                unknown.append(line)
                continue
        elif program == "looplm-lm-eval":
            check_lm_eval(walk, rest, monkeypatch)
        elif program == "bash" and rest[0] == "scripts/install.sh":
            pass  # run by .ci/run on a fresh machine
        else:
            unknown.append(line)
            continue
        walk.checked.append(line)
    assert unknown == [], f"README commands no check knows: {unknown}"
    assert len(walk.checked) >= 20


def test_ci_runs_the_readme_test_command():
    tests = [c for c in readme_commands() if c[:2] == ["bash", "scripts/install.sh"]]
    assert ["bash", "scripts/install.sh", "dev"] in tests
    readme = (REPO / "README.md").read_text().splitlines()
    (line,) = [line for line in readme if line.startswith("bash scripts/install.sh dev && ")]
    assert line.startswith("bash scripts/install.sh dev && python3 -m pytest -q")
    ci = (REPO / ".ci" / "run").read_text().rstrip().splitlines()
    assert ci[-1] == line  # exactly the README's command


def test_a_readme_path_read_before_it_is_written_is_found(tmp_path):
    walk = Walk(tmp_path)
    walk.write("runs/tiny", lambda path: path.mkdir(parents=True))
    assert walk.read("runs/tiny/checkpoints/step_00000010") == tmp_path / "runs/tiny"
    with pytest.raises(AssertionError, match="reads runs/tiny-hf before any command writes it"):
        walk.read("runs/tiny-hf")


def documented_job_commands() -> list[tuple[str, list[str]]]:
    """(where, words) of every `torchrun ... -m train.JOB ...` written in the configs' comments
    and the modules' docstrings (the README's are walked above), continuation lines joined."""
    files = sorted((REPO / "configs").rglob("*.yaml"))
    files += [p for d in ("launch", "train", "scripts") for p in sorted((REPO / d).glob("*.py"))]
    found = []
    for path in files:
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines):
            if not line.lstrip("# ").startswith("torchrun ") or " -m train." not in line:
                continue  # prose that names a command is not one
            text, more = line[line.index("torchrun ") :], number
            while text.rstrip().endswith("\\") and more + 1 < len(lines):
                more += 1
                text = text.rstrip().rstrip("\\") + " " + lines[more].lstrip("#").strip()
            found.append((f"{path.relative_to(REPO)}:{number + 1}", shlex.split(text)))
    return found


def test_every_documented_job_command_passes_its_jobs_checks():
    """At its number of ranks; only problems about placeholders for the user's files, or about
    the output of the earlier job it continues (a `runs/` path), may remain."""
    commands = documented_job_commands()
    assert len(commands) >= 6
    wrong = {}
    for where, words in commands:
        module = words[words.index("-m") + 1]
        args = [w for w in words[words.index("-m") + 2 :] if "=" in w]
        problems = job_problems(module, args, _world_size(words))
        if real := [p for p in problems if not (USER_FILES.search(p) or EARLIER_RUN.search(p))]:
            wrong[where] = real
    assert wrong == {}
