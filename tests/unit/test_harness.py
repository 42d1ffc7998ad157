"""The lm-eval model ``looplm`` (train.harness): end to end through lm-eval's own command line on
local tasks, and its scores and generations against a direct float64 forward pass of the model.

The references here tokenize as lm-eval's HFLM does (encode the whole string, split after the
context's tokens), run one unpadded forward per request and take their own log_softmax.
"""

import json
import os
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model

from data_pipelines.tokenizer import embedded_tokenizer_path, load_tokenizer
from looplm import LoopLMConfig, LoopLMForCausalLM
from looplm.generation import generate as looplm_generate
from train import harness
from train.harness import LoopLMEval, find_tokenizer, main

REPO = Path(__file__).resolve().parents[2]
TASKS = REPO / "tests" / "assets" / "harness_tasks"
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
PREFIX_ID = 0  # the tiny config's bos_token_id (and eos_token_id)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny Ouro-format model (T = 4) with the embedded tokenizer beside it. Weights with
    std 0.3 make its distributions peaked, so greedy choices are far from ties."""
    torch.manual_seed(0)
    config = LoopLMConfig.from_preset(
        "tiny",
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=load_tokenizer("embedded").get_vocab_size(),
    )
    model = LoopLMForCausalLM(config)
    model.reset_parameters(std=0.3)
    directory = tmp_path_factory.mktemp("harness") / "model"
    model.save_pretrained(directory)
    shutil.copy(embedded_tokenizer_path(), directory / "tokenizer.json")
    return directory


@pytest.fixture(scope="module")
def reference(model_dir):
    """The same weights in float64, loaded apart from the harness, and the tokenizer."""
    model = LoopLMForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    return model, load_tokenizer(str(model_dir / "tokenizer.json"))


def make_lm(model_dir, **model_args) -> LoopLMEval:
    return LoopLMEval(pretrained=str(model_dir), dtype="float64", device="cpu", **model_args)


def requests(kind: str, *arguments) -> list[Instance]:
    return [Instance(kind, {}, args, i) for i, args in enumerate(arguments)]


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def split_tokens(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids as HFLM splits them."""
    if not context:
        return [PREFIX_ID], encode(tokenizer, continuation)
    stripped = context.rstrip()  # trailing spaces belong to the continuation
    whole = encode(tokenizer, context + continuation)
    split = len(encode(tokenizer, stripped))
    return whole[:split], whole[split:]


@torch.no_grad()
def direct_scores(model, tokens: list[int], num_scored: int, max_length: int = 10**9, **exit_):
    """Log-probs [num_scored] of the last tokens of ``tokens`` and whether each is the argmax,
    from one unpadded forward over at most ``max_length`` inputs."""
    window = tokens[-(max_length + 1) :]
    logits = model(torch.tensor([window[:-1]]), **exit_).logits[0].double()
    log_probs = torch.log_softmax(logits, dim=-1)[-num_scored:]
    targets = torch.tensor(window[-num_scored:])
    return log_probs.gather(1, targets[:, None])[:, 0], log_probs.argmax(-1) == targets


def direct_loglikelihood(reference, context, continuation, max_length=10**9, **exit_):
    model, tokenizer = reference
    context_ids, continuation_ids = split_tokens(tokenizer, context, continuation)
    log_probs, hits = direct_scores(
        model, context_ids + continuation_ids, len(continuation_ids), max_length, **exit_
    )
    return float(log_probs.sum()), bool(hits.all())


@torch.no_grad()
def direct_greedy(reference, prompt: str, max_new: int, stops: list[str], **exit_) -> str:
    """Greedy decoding without a cache (a full forward per token) until EOS or ``max_new``
    tokens, the text cut at the first stop sequence."""
    model, tokenizer = reference
    tokens, new = encode(tokenizer, prompt), []
    for _ in range(max_new):
        token = int(model(torch.tensor([tokens + new]), **exit_).logits[0, -1].argmax())
        if token in model.config.eos_token_ids:
            break
        new.append(token)
    text = tokenizer.decode(new, skip_special_tokens=True)
    for stop in stops:
        text = text.split(stop)[0]
    return text


# ---- end to end through lm-eval's command line ------------------------------------------------


@pytest.fixture(scope="module")
def cli_run(model_dir, tmp_path_factory) -> Path:
    """One ``python -m train.harness`` run of both local tasks; returns its output folder.
    data_files in the task YAMLs are relative, so it runs from the task folder."""
    out = tmp_path_factory.mktemp("harness_out")
    model_args = f"pretrained={model_dir},num_steps=2,dtype=float64,batch_size=3"
    command = [
        *(sys.executable, "-m", "train.harness", "--model", "looplm"),
        *("--model_args", model_args, "--tasks", "looplm_tiny_mc,looplm_tiny_gen"),
        *("--include_path", str(TASKS), "--output_path", str(out / "results")),
        *("--device", "cpu", "--log_samples"),
    ]
    env = {
        **os.environ,
        **OFFLINE,
        "HF_DATASETS_CACHE": str(out / "datasets"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(command, cwd=TASKS, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out / "results"


def logged_samples(results_dir: Path, task: str) -> list[dict]:
    (path,) = results_dir.glob(f"*/samples_{task}_*.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_cli_writes_the_metrics_of_both_tasks(cli_run):
    (path,) = cli_run.glob("*/results_*.json")
    results = json.loads(path.read_text())
    assert 0.0 <= results["results"]["looplm_tiny_mc"]["acc,none"] <= 1.0
    assert 0.0 <= results["results"]["looplm_tiny_mc"]["acc_norm,none"] <= 1.0
    assert 0.0 <= results["results"]["looplm_tiny_gen"]["exact_match,none"] <= 1.0
    assert results["config"]["model"] == "looplm"
    assert results["config"]["looplm"]["num_steps"] == 2
    assert results["config"]["model_dtype"] == "torch.float64"
    assert len(logged_samples(cli_run, "looplm_tiny_mc")) == 4
    assert len(logged_samples(cli_run, "looplm_tiny_gen")) == 3


def test_cli_logged_loglikelihoods_equal_a_direct_forward(cli_run, reference):
    samples = logged_samples(cli_run, "looplm_tiny_mc")
    scored = 0
    for sample in samples:
        for ((log_prob, greedy),), args in zip(
            sample["resps"], sample["arguments"].values(), strict=True
        ):
            expected = direct_loglikelihood(reference, args["arg_0"], args["arg_1"], num_steps=2)
            assert float(log_prob) == pytest.approx(expected[0], abs=1e-5, rel=0)
            assert greedy == str(expected[1])
            scored += 1
    assert scored == 14  # every choice of every question


def test_cli_logged_generations_equal_direct_greedy_decoding(cli_run, reference):
    for sample in logged_samples(cli_run, "looplm_tiny_gen"):
        args = sample["arguments"]["gen_args_0"]
        expected = direct_greedy(reference, args["arg_0"], 12, ["\n", "."], num_steps=2)
        assert sample["resps"] == [[expected]]


def test_console_script_runs_main():
    (script,) = entry_points(group="console_scripts", name="looplm-lm-eval")
    assert script.value == "train.harness:main"
    assert script.load() is main


def test_model_is_registered_with_lm_eval():
    assert get_model("looplm") is LoopLMEval


# ---- log-likelihoods against a direct forward ---------------------------------------------


PAIRS = [
    ("Question: What do bees make?\nAnswer:", " honey"),
    ("The cat sat on the", " mat and looked at the dog"),
    ("", "Hello world"),  # empty context: the prefix token conditions
    ("Trailing space ", "moves to the continuation"),
    ("A", " b"),
]


@pytest.mark.parametrize("batch_size", [1, 3])
def test_loglikelihood_equals_a_direct_forward(model_dir, reference, batch_size):
    lm = make_lm(model_dir, num_steps=2, batch_size=batch_size)
    got = lm.loglikelihood(requests("loglikelihood", *PAIRS), disable_tqdm=True)
    for (context, continuation), (log_prob, greedy) in zip(PAIRS, got, strict=True):
        expected = direct_loglikelihood(reference, context, continuation, num_steps=2)
        assert log_prob == pytest.approx(expected[0], abs=1e-5, rel=0)
        assert greedy is expected[1]


def test_is_greedy_holds_for_the_models_own_continuation(model_dir, reference):
    model, tokenizer = reference
    context = "The cat sat on the"
    greedy_text = direct_greedy(reference, context, 3, [], num_steps=2)
    assert direct_loglikelihood(reference, context, greedy_text, num_steps=2)[1]
    lm = make_lm(model_dir, num_steps=2)
    ((_, greedy),) = lm.loglikelihood(requests("loglikelihood", (context, greedy_text)), True)
    assert greedy is True


def test_contexts_longer_than_max_length_lose_tokens_from_the_left(model_dir, reference):
    context, continuation = "one two three four five six seven eight nine ten", " eleven"
    lm = make_lm(model_dir, num_steps=2, max_length=6)
    ((log_prob, _),) = lm.loglikelihood(requests("loglikelihood", (context, continuation)), True)
    truncated = direct_loglikelihood(reference, context, continuation, 6, num_steps=2)[0]
    whole = direct_loglikelihood(reference, context, continuation, num_steps=2)[0]
    assert log_prob == pytest.approx(truncated, abs=1e-5, rel=0)
    assert abs(truncated - whole) > 1e-3


def test_exit_at_step_picks_the_scores_of_that_step(model_dir, reference):
    scores = {}
    for step in (1, 2):
        lm = make_lm(model_dir, num_steps=2, exit_at_step=step, batch_size=2)
        got = lm.loglikelihood(requests("loglikelihood", *PAIRS), disable_tqdm=True)
        for (context, continuation), (log_prob, _) in zip(PAIRS, got, strict=True):
            expected = direct_loglikelihood(
                reference, context, continuation, num_steps=2, exit_at_step=step
            )[0]
            assert log_prob == pytest.approx(expected, abs=1e-5, rel=0)
        scores[step] = [log_prob for log_prob, _ in got]
    assert all(abs(a - b) > 1e-3 for a, b in zip(scores[1], scores[2], strict=True))


def test_q_exit_with_early_exit_equals_the_direct_q_exit(model_dir, reference):
    lm = make_lm(model_dir, exit_threshold=0.5, early_exit=True, batch_size=2)
    got = lm.loglikelihood(requests("loglikelihood", *PAIRS), disable_tqdm=True)
    last_step = direct_loglikelihood(reference, *PAIRS[1])[0]
    for (context, continuation), (log_prob, _) in zip(PAIRS, got, strict=True):
        expected = direct_loglikelihood(reference, context, continuation, exit_threshold=0.5)[0]
        assert log_prob == pytest.approx(expected, abs=1e-5, rel=0)
    assert abs(got[1][0] - last_step) > 1e-3  # q = 0.5 exits some tokens before step 4


@pytest.mark.parametrize("max_length", [6, 2048])
def test_loglikelihood_rolling_scores_every_token_once(model_dir, reference, max_length):
    model, tokenizer = reference
    text = "It was the best of times, it was the worst of times, it was the age of wisdom."
    lm = make_lm(model_dir, num_steps=2, max_length=max_length, batch_size=2)
    (got,) = lm.loglikelihood_rolling(requests("loglikelihood_rolling", (text,)), True)
    # Disjoint chunks of max_length tokens, each read with the max_length tokens before its end.
    sequence = [PREFIX_ID, *encode(tokenizer, text)]
    expected, chunks = 0.0, range(1, len(sequence), max_length)
    for start in chunks:
        end = min(start + max_length, len(sequence))
        context = sequence[max(0, end - 1 - max_length) : end]
        log_probs, _ = direct_scores(model, context, end - start, num_steps=2)
        expected += float(log_probs.sum())
    assert len(chunks) == (1 if max_length == 2048 else 5)
    assert got == pytest.approx(expected, abs=1e-5, rel=0)


# ---- generation -----------------------------------------------------------------------------

PROMPTS = ["The capital of France is", "Hi", "Once upon a time, in a small village by the sea"]


def gen_requests(until: list[str], max_gen_toks: int = 8) -> list[Instance]:
    kwargs = {"until": until, "max_gen_toks": max_gen_toks, "do_sample": False}
    return requests("generate_until", *[(prompt, dict(kwargs)) for prompt in PROMPTS])


def test_generate_until_equals_a_direct_greedy_loop(model_dir, reference):
    lm = make_lm(model_dir, num_steps=2, batch_size=2)
    got = lm.generate_until(gen_requests([]), disable_tqdm=True)
    expected = [direct_greedy(reference, prompt, 8, [], num_steps=2) for prompt in PROMPTS]
    assert got == expected
    assert all(len(encode(reference[1], text)) >= 4 for text in got)


def test_generate_until_cuts_at_stop_sequences(model_dir, reference):
    lm = make_lm(model_dir, num_steps=2, batch_size=3)
    full = lm.generate_until(gen_requests([]), disable_tqdm=True)[0]
    multi_char, one_token = full[4:7], reference[1].decode(encode(reference[1], full)[2:3])
    assert len(encode(reference[1], one_token)) == 1 and full.index(one_token) > 0
    for stop in (multi_char, one_token):
        got = lm.generate_until(gen_requests(["never seen", stop]), disable_tqdm=True)
        assert got[0] == full.split(stop)[0]
        expected = direct_greedy(reference, PROMPTS[0], 8, ["never seen", stop], num_steps=2)
        assert got[0] == expected


def test_generation_passes_the_exit_and_kv_options_on(model_dir, reference, monkeypatch):
    calls = []

    def spy(model, input_ids, max_new_tokens, **kwargs):
        calls.append(dict(kwargs, input_ids=input_ids, max_new_tokens=max_new_tokens))
        return looplm_generate(model, input_ids, max_new_tokens, **kwargs)

    monkeypatch.setattr(harness, "generate", spy)
    options = dict(num_steps=3, exit_threshold=0.5, early_exit=True, kv_sharing="last")
    lm = make_lm(model_dir, batch_size=3, **options)
    got = lm.generate_until(gen_requests(["."], max_gen_toks=6), disable_tqdm=True)
    (call,) = calls
    assert {k: call[k] for k in options} == options
    assert call["exit_at_step"] is None and call["max_new_tokens"] == 6
    assert encode(reference[1], ".")[0] in call["eos_token_id"]
    lengths = call["attention_mask"].sum(1).tolist()
    assert call["attention_mask"][:, -1].all() and len(set(lengths)) == 3  # left padding
    model, tokenizer = reference
    for prompt, text in zip(PROMPTS, got, strict=True):
        alone = looplm_generate(model, torch.tensor([encode(tokenizer, prompt)]), 6, **options)
        new = alone[0, len(encode(tokenizer, prompt)) :].tolist()
        new = new[: new.index(PREFIX_ID)] if PREFIX_ID in new else new
        assert text == tokenizer.decode(new).split(".")[0]


# ---- model_args ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, named",
    [
        ({"colour": "blue"}, "colour"),
        ({"num_steps": 0}, "num_steps"),
        ({"num_steps": "two"}, "num_steps"),
        ({"num_steps": 2, "exit_at_step": 3}, "exit_at_step"),
        ({"exit_at_step": 5}, "exit_at_step"),  # beyond the model's 4 steps
        ({"exit_threshold": 1.5}, "exit_threshold"),
        ({"exit_threshold": 0.5, "exit_at_step": 1}, "exit_at_step or exit_threshold"),
        ({"kv_sharing": "sometimes"}, "kv_sharing"),
        ({"early_exit": "maybe"}, "early_exit"),
        ({"dtype": "int8"}, "dtype"),
        ({"batch_size": "auto"}, "batch_size"),
        ({"max_length": 4096}, "max_length"),  # beyond max_position_embeddings
        ({"pretrained": "/no/such/model"}, "pretrained"),
        ({"pretrained": None}, "pretrained is required"),
    ],
)
def test_bad_model_args_name_the_argument(model_dir, bad, named):
    with pytest.raises(ValueError, match=named):
        LoopLMEval(**{"pretrained": str(model_dir), **bad})


def test_every_problem_is_reported_at_once(model_dir):
    with pytest.raises(ValueError) as error:
        LoopLMEval(pretrained=str(model_dir), num_steps=0, kv_sharing="x", dtype="int8")
    assert all(name in str(error.value) for name in ("num_steps", "kv_sharing", "dtype"))


def test_model_args_win_over_lm_evals_own_flags(model_dir):
    lm = LoopLMEval.create_from_arg_string(
        f"pretrained={model_dir},batch_size=4",
        {"batch_size": 1, "max_batch_size": None, "device": "cuda:0"},
    )
    assert lm.batch_size == 4
    assert lm.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert lm.num_steps == 4 and lm.max_length == 2048


def test_a_missing_tokenizer_says_what_was_looked_for(model_dir, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare, ignore=shutil.ignore_patterns("tokenizer.json"))
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json.*tokenizer="):
        LoopLMEval(pretrained=str(bare))
    assert LoopLMEval(pretrained=str(bare), tokenizer="embedded").tokenizer_name == "embedded"


def test_a_runs_tokenizer_comes_from_its_config(tmp_path):
    run = tmp_path / "run"
    checkpoint = run / "checkpoints" / "step_10"
    checkpoint.mkdir(parents=True)
    (run / "config.yaml").write_text("data:\n  tokenizer: embedded\n")
    for path in (run, checkpoint):
        tokenizer, name = find_tokenizer(str(path))
        assert name == "embedded" and tokenizer.get_vocab_size() == 8192
    (run / "config.yaml").write_text("data:\n  tokenizer: /no/such/tokenizer.json\n")
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        find_tokenizer(str(run))
