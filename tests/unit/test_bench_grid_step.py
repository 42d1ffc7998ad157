"""The grid-step benchmark's smoke test: its batch packs Mano-sized documents whose answers are
the targets, and every variant runs."""

import pytest
import torch

from tests.unit.test_readme_commands import load_script


def test_the_batch_packs_whole_documents_whose_answer_and_eos_are_the_targets():
    bench = load_script("bench_grid_step")
    ids, positions, labels = bench.packed_batch(rows=4, seq_len=64)
    for row in range(4):
        starts = [i for i in range(64) if positions[row, i] == 0]
        ends = starts[1:] + [64]
        expected = torch.full((64,), -100)
        for start, end in zip(starts, ends, strict=True):
            assert end - start in (6, 8) or end == 64  # only the row's last is cut
            assert positions[row, start:end].tolist() == list(range(end - start))
            for target in range(max(start, end - 3), end - 1):  # answer, then EOS
                expected[target] = ids[row, target + 1]
        assert torch.equal(labels[row], expected)


def test_every_variant_steps_and_the_grids_step_is_the_baseline(capsys):
    bench = load_script("bench_grid_step")
    argv = ["--hidden", "32", "--heads", "2", "--warmup", "1", "--repeats", "2",
            "--skip-compile"]  # fmt: skip
    assert bench.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line[:16].strip(): line[16:].split() for line in lines[3:]}
    assert list(rows) == ["the grid's step", "float32", "MLP 2 x hidden", "16 x 64 tokens"]
    assert rows["the grid's step"][-1] == "1.00x"
    params = {name: int(row[0].replace(",", "")) for name, row in rows.items()}
    assert params["MLP 2 x hidden"] == params["the grid's step"] - 3 * 32 * 32  # one MLP of 32
    for row in rows.values():  # median, 10th and 90th percentiles within the measured times
        assert 0 < float(row[2]) <= float(row[1]) <= float(row[3])


def test_the_floor_times_each_family_of_manos_grid_and_adds_up_its_minutes(capsys):
    bench = load_script("bench_grid_step")
    argv = ["--floor", "--hidden", "32", "--heads", "2", "--warmup", "1", "--repeats", "2"]
    assert bench.main(argv) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line[:22].strip(): line[22:].split() for line in lines[3:7]}
    assert list(rows) == ["iso_flop 3 x 1", "looped 1 x 3", "iso_param 1 x 1", "looped_last 1 x 3"]
    steps = bench.GRID.steps_of("mano")
    total = 0.0
    for median, _, _, models, minutes in rows.values():
        assert int(models) == len(bench.GRID.seeds)
        assert float(minutes) == pytest.approx(int(models) * steps * float(median) / 60e3, abs=0.06)
        total += float(minutes)
    summary = lines[-1]
    shown = float(summary.split(": ")[1].split(" min")[0])
    assert shown == pytest.approx(total, abs=0.2)
    ratio = float(summary.split(", ")[1].split("x the")[0])
    assert ratio == pytest.approx(shown / bench.BUDGET_MIN, abs=0.006)


def test_the_floor_times_each_model_of_the_grid_with_its_own_objective(monkeypatch, capsys):
    """Each row builds its own model (shape and objective, as the grid's jobs train them); with
    ``--levers`` each takes the three levers at once. The timing itself is stubbed out: the
    compiled variant would compile."""
    bench = load_script("bench_grid_step")
    built = []
    trainer, model_class, objective_class = bench.trainer, bench.LoopLMForCausalLM, bench.Objective

    def recording_trainer(variant, args, grid_model=None):
        built.append([variant.name, grid_model.family])
        return trainer(variant, args, grid_model)

    def recording_model(config, *args):
        built[-1] += [config.num_hidden_layers, config.total_ut_steps]
        return model_class(config, *args)

    def recording_objective(**settings):
        objective = objective_class(**settings)
        built[-1] += [objective.kind, objective.beta]
        return objective

    monkeypatch.setattr(bench, "trainer", recording_trainer)
    monkeypatch.setattr(bench, "LoopLMForCausalLM", recording_model)
    monkeypatch.setattr(bench, "Objective", recording_objective)
    monkeypatch.setattr(bench, "measure", lambda step, warmup, repeats: dict.fromkeys(
        ("median", "p10", "p90", "warmup_s"), 1.0))  # fmt: skip
    for levers, variant in (([], "the grid's step"), (["--levers"], "the three levers")):
        built.clear()
        assert bench.main(["--floor", "--hidden", "32", "--heads", "2", *levers]) == 0
        beta = bench.GRID.beta
        assert built == [
            [variant, "iso_flop", 3, 1, "stage1", 0.0],
            [variant, "looped", 1, 3, "stage1", beta],
            [variant, "iso_param", 1, 1, "stage1", 0.0],
            [variant, "looped_last", 1, 3, "last_step", 0.0],
        ]
    assert "with the three levers" in capsys.readouterr().out
    assert bench.LEVERS == bench.Variant(bench.LEVERS.name, mlp=2, seq_len=64, compiled=True)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--levers"], "--levers goes with --floor"),
        (["--floor", "--levers", "--skip-compile"], "--levers compiles the layers"),
    ],
)
def test_levers_without_the_floor_or_with_skip_compile_is_refused(argv, message, capsys):
    bench = load_script("bench_grid_step")
    with pytest.raises(SystemExit):
        bench.main(argv)
    assert message in capsys.readouterr().err
