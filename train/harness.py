"""The LoopLM as an lm-evaluation-harness model, ``looplm``: ``looplm-lm-eval`` (or
``python -m train.harness``) is lm-eval's own command line with the model registered.

    looplm-lm-eval --model looplm \
        --model_args pretrained=runs/tiny,num_steps=2,exit_threshold=0.9,early_exit=true \
        --tasks hellaswag,gsm8k --device cuda --batch_size 8 --output_path evals/tiny \
        --log_samples

    looplm-lm-eval --model looplm --model_args pretrained=DIR,num_steps=2 \
        --tasks NAME --include_path TASKDIR --output_path OUT

``model_args`` (lm-eval's ``--batch_size`` and ``--device`` are read too; a ``batch_size`` in
``model_args`` takes precedence over ``--batch_size``):

- ``pretrained``: an Ouro-format directory, a looplm run directory (its latest complete
  checkpoint) or one checkpoint step directory of a run;
- ``num_steps``: recurrent steps T (default: the model's ``total_ut_steps``);
- ``exit_at_step``: read every token out at this 1-based step, or
- ``exit_threshold``: Q-exit threshold q in [0, 1] (default: the model's, 1.0 = the last step);
- ``early_exit``: stop the loop once every token has exited, skipping the remaining steps (the
  scores do not change; a generated token skips its later steps, see ``looplm.generation``);
- ``kv_sharing``: decode-time KV cache mode, one of ``looplm.generation.KV_SHARING_MODES``;
- ``dtype``: float32 (default), bfloat16, float16, float64 or auto (the checkpoint's);
- ``batch_size``: requests per forward (default 1);
- ``tokenizer``: a tokenizer.json, ``embedded`` or a hub name (default: ``tokenizer.json``
  beside an Ouro-format model, the ``data.tokenizer`` of a run's ``config.yaml``);
- ``max_length``: tokens per forward (default: the model's ``max_position_embeddings``);
- ``max_gen_toks``: new tokens when a task does not say (default 256).

Tokenization follows lm-eval's ``HFLM``: no special tokens are added; a (context, continuation)
pair is encoded whole and split after the tokens of the context alone (trailing spaces of the
context move to the continuation), and an empty context is the BOS token (the EOS token when
the model has no BOS). Inputs longer than ``max_length`` lose tokens from the left.
``loglikelihood`` batches requests longest first, right-padded (causal attention keeps padding
out of every scored position); ``generate_until`` decodes left-padded prompts with a KV cache
and cuts the text at the first stop sequence (stop sequences of one token also end decoding).

Shape legend: B batch, S sequence, V vocab, C continuation tokens.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    Collator,
    handle_stop_sequences,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import (
    get_rolling_token_windows,
    make_disjoint_window,
    simple_parse_args_string,
)
from tokenizers import Tokenizer
from tqdm import tqdm

from data_pipelines.tokenizer import ENDOFTEXT, load_tokenizer, tokenizer_problem
from looplm import LoopLMForCausalLM
from looplm.generation import KV_SHARING_MODES, generate
from train.export import load_model, run_tokenizer

logger = logging.getLogger("looplm.harness")
MODEL_NAME = "looplm"
DTYPES = ("float32", "bfloat16", "float16", "float64", "auto")
SAMPLING_KWARGS = ("do_sample", "temperature", "top_k", "top_p")
"""The generation kwargs of a task that decoding honours; others are ignored with a warning."""

TokenRequest = tuple[tuple[str, str] | None, list[int], list[int]]
"""lm-eval's tokenized loglikelihood request: (the strings or None, context ids, continuation
ids)."""


@dataclass
class HarnessArgs:
    """The model's settings, from ``model_args`` (see the module docstring)."""

    pretrained: str
    num_steps: int | None = None
    exit_at_step: int | None = None
    exit_threshold: float | None = None
    early_exit: bool = False
    kv_sharing: str = "full"
    dtype: str = "float32"
    batch_size: int = 1
    tokenizer: str | None = None
    max_length: int | None = None
    max_gen_toks: int = 256
    device: str | None = None
    """cpu, cuda, cuda:N; None or auto: cuda when available (lm-eval's ``--device``)."""


def _as_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError
    return int(value)


def _as_float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError
    return float(value)


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError


_CONVERTERS = {
    "num_steps": (_as_int, "an integer"),
    "exit_at_step": (_as_int, "an integer"),
    "exit_threshold": (_as_float, "a number"),
    "early_exit": (_as_bool, "true or false"),
    "batch_size": (_as_int, "an integer ('auto' is not supported)"),
    "max_length": (_as_int, "an integer"),
    "max_gen_toks": (_as_int, "an integer"),
}
"""How the model_args that are not strings are read, and what they must be."""


def _range_problems(args: HarnessArgs) -> list[str]:
    """Every out-of-range setting (the types are already right)."""
    p = []
    for name in ("num_steps", "exit_at_step", "batch_size", "max_length", "max_gen_toks"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.append(f"{name} must be >= 1, got {value}")
    if args.num_steps and args.exit_at_step and args.exit_at_step > args.num_steps:
        p.append(f"exit_at_step ({args.exit_at_step}) exceeds num_steps ({args.num_steps})")
    if args.exit_threshold is not None and not 0.0 <= args.exit_threshold <= 1.0:
        p.append(f"exit_threshold must lie in [0, 1], got {args.exit_threshold}")
    if args.exit_threshold is not None and args.exit_at_step is not None:
        p.append("give exit_at_step or exit_threshold, not both")
    if args.kv_sharing not in KV_SHARING_MODES:
        p.append(f"kv_sharing must be one of {KV_SHARING_MODES}, got {args.kv_sharing!r}")
    if args.dtype not in DTYPES:
        p.append(f"dtype must be one of {DTYPES}, got {args.dtype!r}")
    if not args.pretrained:
        p.append("pretrained is required: an Ouro-format directory, a run or a checkpoint")
    elif not Path(args.pretrained).exists():
        p.append(f"pretrained: no model directory at {args.pretrained}")
    return p


def parse_model_args(model_args: dict[str, Any]) -> HarnessArgs:
    """The checked settings; one ValueError names every unknown or bad argument."""
    known = {f.name for f in fields(HarnessArgs)}
    problems = [f"unknown model_args {name!r}" for name in sorted(model_args.keys() - known)]
    values = {"pretrained": ""}
    for name, value in model_args.items():
        if name not in known or value is None:
            continue
        convert, expected = _CONVERTERS.get(name, (str, "a string"))
        try:
            values[name] = convert(value)
        except ValueError:
            problems.append(f"{name} must be {expected}, got {value!r}")
    args = HarnessArgs(**values)
    if not problems:
        problems = _range_problems(args)
    if problems:
        raise ValueError("bad looplm model_args:\n  - " + "\n  - ".join(problems))
    return args


def _resolve_device(name: str | None) -> torch.device:
    """The device asked for; without CUDA, a CUDA request (lm-eval's default) falls back to
    the CPU with a warning."""
    cuda = torch.cuda.is_available()
    if name in (None, "auto"):
        return torch.device("cuda" if cuda else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device: {e}") from e
    if device.type == "cuda" and not cuda:
        logger.warning("device %s: CUDA is not available, running on the CPU", name)
        return torch.device("cpu")
    return device


def find_tokenizer(pretrained: str, tokenizer: str | None = None) -> tuple[Tokenizer, str]:
    """The tokenizer and its name: ``tokenizer`` when given, else ``tokenizer.json`` beside an
    Ouro-format model, else the ``data.tokenizer`` of the run's ``config.yaml``."""
    path = Path(pretrained)
    beside = path / "tokenizer.json"
    name = tokenizer or (str(beside) if beside.is_file() else run_tokenizer(path))
    if name is None:
        raise FileNotFoundError(
            f"no tokenizer for {pretrained}: looked for {beside} and for the data.tokenizer of "
            f"a config.yaml in {path} or {path.parent.parent}; pass tokenizer=PATH "
            "(a tokenizer.json, or 'embedded')"
        )
    problem = tokenizer_problem(name)
    if problem is not None:
        raise FileNotFoundError(f"tokenizer: {problem}; pass tokenizer=PATH")
    return load_tokenizer(name), name


def _left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask [B, S] of token lists aligned to the right."""
    width = max(len(row) for row in rows)
    ids_BS = torch.full((len(rows), width), pad, dtype=torch.long)
    mask_BS = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids_BS[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask_BS[i, width - len(row) :] = 1
    return ids_BS, mask_BS


def _until_first(tokens: list[int], stop_ids: set[int]) -> list[int]:
    """The tokens before the first of ``stop_ids``."""
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:i]
    return tokens


@register_model(MODEL_NAME)
class LoopLMEval(TemplateLM):
    """A LoopLM read out by the exit rule of its ``model_args`` (see the module docstring)."""

    def __init__(self, **model_args: Any):
        super().__init__()
        self.args = parse_model_args(model_args)
        self._device = _resolve_device(self.args.device)
        self.tokenizer, self._tokenizer_name = find_tokenizer(
            self.args.pretrained, self.args.tokenizer
        )
        self.model: LoopLMForCausalLM = (
            load_model(self.args.pretrained, self.args.dtype).to(self._device).eval()
        )
        self._check_against_model()

    def _check_against_model(self) -> None:
        cfg, args = self.model.config, self.args
        p = []
        steps = args.num_steps or cfg.total_ut_steps
        if args.exit_at_step is not None and args.exit_at_step > steps:
            p.append(f"exit_at_step ({args.exit_at_step}) exceeds the model's {steps} steps")
        if args.max_length is not None and args.max_length > cfg.max_position_embeddings:
            p.append(
                f"max_length ({args.max_length}) exceeds the model's max_position_embeddings "
                f"({cfg.max_position_embeddings})"
            )
        if self.tokenizer.get_vocab_size() > cfg.vocab_size:
            p.append(
                f"tokenizer {self._tokenizer_name} has {self.tokenizer.get_vocab_size()} tokens, "
                f"more than the model's vocab_size ({cfg.vocab_size})"
            )
        if not cfg.eos_token_ids and self.tokenizer.token_to_id(ENDOFTEXT) is None:
            p.append(f"the model has no eos_token_id and the tokenizer no {ENDOFTEXT}")
        if p:
            raise ValueError("bad looplm model_args:\n  - " + "\n  - ".join(p))

    @classmethod
    def create_from_arg_obj(
        cls, arg_dict: dict[str, Any], additional_config: dict[str, Any] | None = None
    ) -> LoopLMEval:
        """lm-eval's constructor: ``model_args`` win over its ``--batch_size``/``--device``."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        if extra.pop("max_batch_size", None) is not None:
            logger.warning("max_batch_size is ignored: looplm has no automatic batch size")
        return cls(**{**extra, **arg_dict})

    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: dict[str, Any] | None = None
    ) -> LoopLMEval:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # ---- what lm-eval reads ----------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        eos = self.model.config.eos_token_ids
        return eos[0] if eos else self.tokenizer.token_to_id(ENDOFTEXT)

    @property
    def prefix_token_id(self) -> int:
        bos = self.model.config.bos_token_id
        return self.eot_token_id if bos is None else bos

    @property
    def max_length(self) -> int:
        return self.args.max_length or self.model.config.max_position_embeddings

    @property
    def max_gen_toks(self) -> int:
        return self.args.max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.args.batch_size

    @property
    def num_steps(self) -> int:
        return self.args.num_steps or self.model.config.total_ut_steps

    @property
    def tokenizer_name(self) -> str:
        return self._tokenizer_name

    def get_model_info(self) -> dict[str, Any]:
        """What lm-eval records in the results' config: the model and its exit rule."""
        args = {k: v for k, v in asdict(self.args).items() if k not in ("pretrained", "device")}
        return {
            "model_num_parameters": self.model.num_parameters(),
            "model_dtype": str(next(self.model.parameters()).dtype),
            "looplm": {**args, "num_steps": self.num_steps, "tokenizer": self._tokenizer_name},
        }

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
    ) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens)).ids

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # ---- scoring ---------------------------------------------------------------------------

    def _exit_kwargs(self) -> dict[str, Any]:
        args = self.args
        return dict(
            num_steps=self.num_steps,
            exit_at_step=args.exit_at_step,
            exit_threshold=args.exit_threshold,
            early_exit=args.early_exit,
        )

    @torch.no_grad()
    def _loglikelihood_tokens(
        self, requests: list[TokenRequest], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probs, whether greedy decoding yields it) per request,
        in the order given; computed longest first, ``batch_size`` at a time."""
        collator = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])))
        results: list[tuple[float, bool]] = []
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="looplm loglikelihood")
        for chunk in collator.get_batched(n=self.batch_size):
            for (strings, _, _), answer in zip(chunk, self._score_batch(chunk), strict=True):
                results.append(answer)
                if strings is not None:
                    self.cache_hook.add_partial("loglikelihood", strings, answer)
            progress.update(len(chunk))
        progress.close()
        return collator.get_original(results)

    def _score_batch(self, chunk: Sequence[TokenRequest]) -> list[tuple[float, bool]]:
        """One right-padded forward over the requests of ``chunk``."""
        inputs, continuations = [], []
        for _, context, continuation in chunk:
            if not 0 < len(continuation) <= self.max_length:
                raise ValueError(
                    f"a continuation of {len(continuation)} tokens cannot be scored within "
                    f"max_length {self.max_length}"
                )
            inputs.append((context + continuation)[-(self.max_length + 1) : -1])
            continuations.append(continuation)
        width = max(len(row) for row in inputs)
        ids_BS = torch.full((len(inputs), width), self.eot_token_id, dtype=torch.long)
        for i, row in enumerate(inputs):
            ids_BS[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        logits_BSV = self.model(ids_BS.to(self.device), **self._exit_kwargs()).logits
        answers = []
        for logits_SV, row, continuation in zip(logits_BSV, inputs, continuations, strict=True):
            scored_CV = logits_SV[len(row) - len(continuation) : len(row)]
            log_probs_CV = torch.log_softmax(
                scored_CV.to(torch.promote_types(scored_CV.dtype, torch.float32)), dim=-1
            )
            target_C = torch.tensor(continuation, device=log_probs_CV.device)
            log_prob = log_probs_CV.gather(1, target_C[:, None]).sum()
            answers.append((float(log_prob), bool((log_probs_CV.argmax(-1) == target_C).all())))
        return answers

    def loglikelihood_rolling(
        self, requests: list[Instance], disable_tqdm: bool = False
    ) -> list[float]:
        """The log-likelihood of each whole text after the prefix token, over disjoint windows
        of at most ``max_length`` tokens that each keep the fullest context."""
        windows: list[TokenRequest] = []
        owners: list[int] = []
        texts = [request.args[0] for request in requests]
        for index, text in enumerate(texts):
            rolling = get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(make_disjoint_window, rolling):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(texts)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        for owner, (log_prob, _) in zip(owners, scores, strict=True):
            totals[owner] += log_prob
        for text, total in zip(texts, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
        return totals

    # ---- generation ------------------------------------------------------------------------

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or, when a task asks, sampled) continuations, cut at the first stop
        sequence; requests with the same generation kwargs are decoded together."""
        collator = Collator(
            [request.args for request in requests],
            sort_fn=lambda a: (-len(self.tok_encode(a[0])), a[0]),
            group_by="gen_kwargs",
            group_fn=lambda a: a[1],
        )
        texts: list[str] = []
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="looplm generate_until")
        for chunk in collator.get_batched(n=self.batch_size):
            contexts = [context for context, _ in chunk]
            gen_kwargs = chunk[0][1]
            generated = self._generate_batch(contexts, gen_kwargs)
            for context, text in zip(contexts, generated, strict=True):
                texts.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            progress.update(len(chunk))
        progress.close()
        return collator.get_original(texts)

    def _decode_settings(self, gen_kwargs: dict[str, Any]) -> tuple[list[str], int, dict]:
        """(stop sequences, new tokens, sampling options) of a task's generation kwargs."""
        kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
        max_gen_toks = kwargs.pop("max_gen_toks")
        ignored = sorted(kwargs.keys() - set(SAMPLING_KWARGS))
        if ignored:
            logger.warning("generation kwargs %s are ignored by looplm", ignored)
        sampling = {k: kwargs[k] for k in SAMPLING_KWARGS if k in kwargs}
        sampling["do_sample"] = bool(sampling.get("do_sample", False))
        if not sampling["do_sample"]:
            sampling.pop("temperature", None)
        return until, max_gen_toks, sampling

    @torch.no_grad()
    def _generate_batch(self, contexts: list[str], gen_kwargs: dict[str, Any]) -> list[str]:
        until, max_gen_toks, sampling = self._decode_settings(gen_kwargs)
        max_context = self.max_length - max_gen_toks
        if max_context < 1:
            raise ValueError(
                f"max_gen_toks ({max_gen_toks}) leaves no room for a prompt within max_length "
                f"({self.max_length})"
            )
        prompts = [self.tok_encode(c)[-max_context:] or [self.prefix_token_id] for c in contexts]
        ids_BS, mask_BS = _left_padded(prompts, self.eot_token_id)
        single_token_stops = [ids[0] for ids in map(self.tok_encode, until) if len(ids) == 1]
        eos_ids = self.model.config.eos_token_ids or [self.eot_token_id]
        stop_ids = list(dict.fromkeys([*eos_ids, *single_token_stops]))
        args = self.args
        out_BS = generate(
            self.model,
            ids_BS.to(self.device),
            max_gen_toks,
            eos_token_id=stop_ids,
            pad_token_id=self.eot_token_id,
            kv_sharing=args.kv_sharing,
            attention_mask=mask_BS.to(self.device),
            **self._exit_kwargs(),
            **sampling,
        )
        texts = []
        for new in out_BS[:, ids_BS.shape[1] :].tolist():
            text = self.tok_decode(_until_first(new, set(stop_ids)))
            texts.append(postprocess_generated_text(text, until, think_end_token=None))
        return texts


@contextmanager
def _argv(argv: list[str]) -> Iterator[None]:
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


def main(argv: list[str] | None = None) -> int:
    """lm-eval's command line (``lm_eval.__main__.cli_evaluate``) with ``looplm`` registered."""
    from lm_eval.__main__ import cli_evaluate

    with _argv(["looplm-lm-eval", *(sys.argv[1:] if argv is None else argv)]):
        cli_evaluate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
