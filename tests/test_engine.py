"""The KV cache and the inference engine, on tiny random models (CPU, in-process)."""

from __future__ import annotations

import time

import pytest
import torch

from nanochat.calculator import calculate
from nanochat.engine import PAD, Engine, sample_next
from nanochat.gpt import GPTConfig, KVCache
from nanochat.tokenizer import Tokenizer
from tests.helpers import ScriptedGPT, random_model, without_specials

# ---- the KV cache --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_kv_head", [4, 2])  # plain attention and GQA
def test_cached_logits_equal_a_full_forward(n_kv_head: int):
    cfg = GPTConfig(sequence_len=32, vocab_size=64, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=128)
    model = random_model(64, cfg=cfg)
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 64, (1, 5), generator=gen)
    rest = torch.randint(0, 64, (2, 7), generator=gen)  # a different continuation per row
    full = model(torch.cat([prompt.expand(2, -1), rest], dim=1))

    with torch.no_grad():
        cache = KVCache(cfg.n_layer, max_len=12)
        parts = [model(prompt, kv_cache=cache).expand(2, -1, -1)]  # prefill at batch 1, then share it
        cache.expand(2)
        parts.append(model(rest[:, :3], kv_cache=cache))  # a chunk appended to a non-empty cache: needs the mask
        parts += [model(rest[:, t : t + 1], kv_cache=cache) for t in range(3, 7)]  # one token at a time
    assert cache.pos == 12
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-5, atol=1e-5)


def test_cache_overflow_is_refused():
    model = random_model(64)
    cache = KVCache(model.config.n_layer, max_len=4)
    model(torch.zeros(1, 4, dtype=torch.long), kv_cache=cache)
    with pytest.raises(AssertionError, match="KV cache full"):
        model(torch.zeros(1, 1, dtype=torch.long), kv_cache=cache)


# ---- cached generation equals the uncached reference -------------------------------------------------------


@pytest.mark.parametrize("text", ["", " The quick brown fox jumps"])
def test_greedy_generation_matches_uncached(tokenizer: Tokenizer, text: str):
    model = without_specials(random_model(tokenizer.vocab_size), tokenizer)
    prompt = [tokenizer.bos_id, *tokenizer.encode(text)]
    expected = model.generate(prompt, max_tokens=40, temperature=0)  # no cache: the whole sequence every step
    assert len(set(expected)) > 5  # the model is not stuck on one token: the context matters

    engine = Engine(model, tokenizer)
    completions, masks = engine.generate_batch(prompt, num_samples=1, max_tokens=40, temperature=0)
    assert completions == [expected] and masks == [[1] * 40]
    completions, _ = engine.generate_batch(prompt, num_samples=3, max_tokens=40, temperature=0)
    assert completions == [expected] * 3


def test_generation_stops_when_the_context_is_full(tokenizer: Tokenizer):
    model = without_specials(random_model(tokenizer.vocab_size, seq=64), tokenizer)
    prompt = [tokenizer.bos_id, *range(300, 359)]  # 60 tokens of a 64-token context
    completions, _ = Engine(model, tokenizer).generate_batch(prompt, max_tokens=20, temperature=0)
    # the last token is predicted from a full context of 64: 5 new tokens
    assert completions == [model.generate(prompt, max_tokens=5, temperature=0)]


# ---- sampling --------------------------------------------------------------------------------------------------


def test_top_k():
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next(logits, 1.0, 1, gen), logits.argmax(dim=-1))
    top5 = logits.topk(5, dim=-1).indices
    draws = torch.stack([sample_next(logits, 2.0, 5, gen) for _ in range(200)], dim=1)  # (4, 200)
    assert all(set(draws[i].tolist()) <= set(top5[i].tolist()) for i in range(4))
    assert len(set(draws[0].tolist())) > 1  # it does sample, not just take the max


def test_top_k_1_equals_greedy_and_seeds_are_deterministic(tokenizer: Tokenizer):
    engine = Engine(random_model(tokenizer.vocab_size), tokenizer)
    prompt = [tokenizer.bos_id, *tokenizer.encode(" Once upon a time")]
    greedy, _ = engine.generate_batch(prompt, num_samples=2, max_tokens=20, temperature=0)
    assert engine.generate_batch(prompt, num_samples=2, max_tokens=20, temperature=1.0, top_k=1)[0] == greedy

    a, _ = engine.generate_batch(prompt, num_samples=3, max_tokens=20, temperature=1.0, seed=1)
    b, _ = engine.generate_batch(prompt, num_samples=3, max_tokens=20, temperature=1.0, seed=1)
    c, _ = engine.generate_batch(prompt, num_samples=3, max_tokens=20, temperature=1.0, seed=2)
    assert a == b
    assert a != c
    assert len({tuple(s) for s in a}) > 1  # the samples of one call differ too


# ---- the calculator ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expr, result",
    [
        ("12*3", "36"),
        ("2+3*4", "14"),
        (" (2+3)*4 ", "20"),
        ("7/2", "3.5"),
        ("8/2", "4"),
        ("17//5", "3"),
        ("17%5", "2"),
        ("-(3-5)**2", "-4"),
        ("2**10", "1024"),
        ("2**-2", "0.25"),
        ("0.1+0.2", "0.3"),
        ("1/3", "0.3333333333"),
        ("1,200*3", "3600"),  # thousands separators, as GSM8K writes them
        ("1.5*4", "6"),
    ],
)
def test_calculator_evaluates_arithmetic(expr: str, result: str):
    assert calculate(expr) == result


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os')",
        "__import__('os').system('echo hi')",
        "os",
        "x + 1",
        "(1).__class__",
        "'a' * 3",
        "[1, 2]",
        "lambda: 1",
        "True + 1",
        "9**9**9",
        "10**1000",
        "(10**40)**2",
        "(-8)**(1/3)",  # complex
        "1e400",  # inf
        "1/0",
        "5 % 0",
        "2 +",
        "",
        "1+" * 100 + "1",  # too long
        "(" * 300 + "1" + ")" * 300,
    ],
)
def test_calculator_rejects_everything_else(expr: str):
    start = time.monotonic()
    assert calculate(expr) is None
    assert time.monotonic() - start < 1  # rejected up front, not after computing a huge power


# ---- the tool in the engine --------------------------------------------------------------------------------


def test_tool_output_is_forced_with_mask_0_and_generation_stops(tokenizer: Tokenizer):
    special = tokenizer.special_id
    py_start, py_end = special("<|python_start|>"), special("<|python_end|>")
    out_start, out_end, end = special("<|output_start|>"), special("<|output_end|>"), special("<|assistant_end|>")
    enc = tokenizer.encode
    forced = [out_start, *enc("36"), out_end]
    filler = enc("x")  # what the script says while the tool writes: the engine must override it
    call, answer = [py_start, *enc("12*3"), py_end], enc(" so 36")
    scripts = [
        [*call, *filler * len(forced), *answer, end, *enc(" junk after the end")],
        # an error gives no output; this row finishes first and then rides along until the other one ends
        [py_start, *enc("1/0"), py_end, end, *filler * 100],
    ]
    model = ScriptedGPT(tokenizer.vocab_size, scripts)
    engine = Engine(model, tokenizer)
    prompt = [tokenizer.bos_id, special("<|user_start|>"), *enc("What is 12*3?"), special("<|user_end|>")]

    steps = list(engine.generate(prompt, num_samples=2, max_tokens=100, temperature=1.0, top_k=3))
    row0 = [*call, *forced, *answer, end]
    assert len(steps) == len(row0)  # it ended right after the last sample finished
    assert [s.tokens[0] for s in steps] == row0
    assert [s.forced[0] for s in steps] == [False] * len(call) + [True] * len(forced) + [False] * (len(answer) + 1)
    row1 = [py_start, *enc("1/0"), py_end, end]
    assert [s.tokens[1] for s in steps] == row1 + [PAD] * (len(row0) - len(row1))
    assert [s.done[1] for s in steps] == [False] * len(row1) + [True] * (len(row0) - len(row1))
    assert not any(s.forced[1] for s in steps)

    model.calls = 0
    completions, masks = engine.generate_batch(prompt, num_samples=2, max_tokens=100)
    assert completions == [[*call, *forced, *answer], row1[:-1]]  # no prompt, no terminating token
    assert masks == [[1] * len(call) + [0] * len(forced) + [1] * len(answer), [1] * (len(row1) - 1)]


def test_bad_arguments_are_refused(tokenizer: Tokenizer):
    engine = Engine(random_model(tokenizer.vocab_size), tokenizer)
    for kwargs in ({"num_samples": 0}, {"temperature": -1.0}, {"top_k": 0}):
        with pytest.raises(ValueError):
            next(engine.generate([tokenizer.bos_id], **kwargs))
    with pytest.raises(ValueError, match="context"):
        next(engine.generate([tokenizer.bos_id] * 65))
