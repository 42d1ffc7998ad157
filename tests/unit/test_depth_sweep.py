"""The depth sweep of train.evaluate: held-out and harness tasks by exit step, two models."""

import json
import os
import shutil
from pathlib import Path

import matplotlib.image
import torch

from data_pipelines.config import DataConfig, SourceConfig
from data_pipelines.tokenizer import embedded_tokenizer_path, load_tokenizer
from looplm import LoopLMConfig, LoopLMForCausalLM
from train.depth_sweep import SweepSettings, compare, sweep_model, sweep_problems, write
from train.validation import EvalSettings, EvalTaskSettings, Validator

TASKS = Path(__file__).resolve().parents[1] / "assets" / "harness_tasks"
MANO = "synthetic://mano?num_docs=2000&shards=2"


def _model(seed: int, path: Path) -> LoopLMForCausalLM:
    torch.manual_seed(seed)
    config = LoopLMConfig.from_preset(
        "tiny", hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=load_tokenizer("embedded").get_vocab_size(),
    )  # fmt: skip
    model = LoopLMForCausalLM(config)
    model.reset_parameters(std=0.3)
    model.save_pretrained(path)
    shutil.copy(embedded_tokenizer_path(), path / "tokenizer.json")
    return model.eval()


def _data(tmp_path) -> DataConfig:
    return DataConfig(
        sources=[SourceConfig(name="mano", paths=[MANO], format="jsonl")],
        cache_dir=str(tmp_path / "cache"),
    )


def _task_file(tmp_path, model) -> str:
    """Prompts whose answers are the model's own greedy continuation at step 2 (right at some
    steps), and one wrong answer."""
    tokenizer = load_tokenizer("embedded")
    records = []
    for prompt in ("def main():", "import os\nimport", "The answer is", "for i in range("):
        ids = torch.tensor([tokenizer.encode(prompt, add_special_tokens=False).ids])
        out = model.generate(ids, 2, exit_at_step=2, eos_token_id=[])
        records.append(
            {"prompt": prompt, "answer": tokenizer.decode(out[0, ids.shape[1] :].tolist())}
        )
    records.append({"prompt": "x =", "answer": " never this"})
    path = tmp_path / "own.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_held_out_tasks_by_exit_step_for_two_models(tmp_path):
    first, second = _model(0, tmp_path / "a"), _model(1, tmp_path / "b")
    tasks = [
        EvalTaskSettings(name="mano", source="mano"),
        EvalTaskSettings(name="own", path=_task_file(tmp_path, first)),
    ]
    settings = SweepSettings(tasks=tasks, num_items=8, max_steps=6, thresholds=[0.5, 0.9])
    data = _data(tmp_path)
    assert sweep_problems(settings, data) == []
    sweeps = {
        "model": sweep_model(first, str(tmp_path / "a"), settings, data, tmp_path),
        "compare": sweep_model(second, str(tmp_path / "b"), settings, data, tmp_path),
    }
    own = sweeps["model"]["own"]
    assert len(own["per_step"]) == 6 and own["per_step"][1] >= 0.5  # its own step-2 answers
    # The same figures as the training jobs' evaluation of these tasks.
    eval_settings = EvalSettings(
        enabled=True, tasks=tasks, num_items=8, extra_steps=2, thresholds=[0.5, 0.9]
    )
    record = Validator.build(eval_settings, data, tmp_path, 0, 1, False).evaluate(first, 4)
    assert own["per_step"] == record["tasks"]["own"]["accuracy_per_step"]
    assert own["q_exit"] == record["tasks"]["own"]["accuracy_q_exit"]

    out = tmp_path / "out"
    out.mkdir()
    report = write(sweeps, out)
    assert report["comparison"] == compare(sweeps["model"], sweeps["compare"])
    difference = report["comparison"]["own"]["per_step"]
    assert difference == [
        b - a for a, b in zip(own["per_step"], sweeps["compare"]["own"]["per_step"], strict=True)
    ]
    table = (out / "depth_sweep.md").read_text().splitlines()
    assert table[0].startswith("| model | task | metric | step 1 |") and "q=0.9" in table[0]
    assert [line.split(" | ")[0] for line in table[2:]] == ["| model"] * 2 + ["| compare"] * 2 + [
        "| compare - model"
    ] * 2
    assert json.loads((out / "depth_sweep.json").read_text()) == report
    assert matplotlib.image.imread(out / "depth_sweep.png").std() > 0.01


def test_bad_sweep_settings_are_reported(tmp_path):
    settings = SweepSettings(
        tasks=[EvalTaskSettings(name="x", source="nope")],
        max_steps=0,
        harness_include_path=str(tmp_path / "no"),
    )
    problems = sweep_problems(settings, _data(tmp_path))
    assert any("max_steps must be >= 1" in p for p in problems)
    assert any("data source 'nope' not found" in p for p in problems)
    assert any("harness_include_path" in p for p in problems)


def test_harness_tasks_by_exit_step_equal_single_harness_runs(tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from train.harness import LoopLMEval

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(TASKS)  # the task YAMLs name their data files relative to it
    _model(0, tmp_path / "a")
    settings = SweepSettings(
        harness_tasks=["looplm_tiny_mc"],
        harness_include_path=str(TASKS),
        max_steps=2,
        thresholds=[0.5],
    )
    model = LoopLMForCausalLM.from_pretrained(tmp_path / "a")
    sweep = sweep_model(model, str(tmp_path / "a"), settings, _data(tmp_path), tmp_path)
    entry = sweep["looplm_tiny_mc"]
    assert (
        entry["metric"] == "acc,none" and len(entry["per_step"]) == 2 and "0.5" in entry["q_exit"]
    )
    manager = TaskManager(include_path=str(TASKS))
    for step in (1, 2):
        lm = LoopLMEval(
            pretrained=str(tmp_path / "a"), exit_at_step=step, device="cpu", batch_size=16
        )
        out = lm_eval.simple_evaluate(
            model=lm, tasks=["looplm_tiny_mc"], task_manager=manager, bootstrap_iters=0
        )
        assert entry["per_step"][step - 1] == out["results"]["looplm_tiny_mc"]["acc,none"]
    assert os.getcwd() == str(TASKS)
