"""Chat rendering (Tokenizer.render_conversation / render_for_completion), pinned token by token."""

from __future__ import annotations

import pytest

from nanochat.tokenizer import SPECIAL_TOKENS, Tokenizer

USER, ASSISTANT = "user", "assistant"


def chat(*messages: tuple[str, object]) -> dict:
    return {"messages": [{"role": role, "content": content} for role, content in messages]}


def expected(tok: Tokenizer, *pieces: tuple[str, int]) -> tuple[list[int], list[int]]:
    """Ids and mask from (special token or text, mask) pieces; text is encoded on its own, as the renderer does."""
    ids: list[int] = []
    mask: list[int] = []
    for piece, trained in pieces:
        new = [tok.special_id(piece)] if piece in SPECIAL_TOKENS else tok.encode(piece)
        ids += new
        mask += [trained] * len(new)
    return ids, mask


def user_turn(text: str) -> list[tuple[str, int]]:
    return [("<|user_start|>", 0), (text, 0), ("<|user_end|>", 0)]


def test_two_turn_chat(tokenizer: Tokenizer) -> None:
    conv = chat((USER, "What is 2+2?"), (ASSISTANT, "4."), (USER, "And 3+3?"), (ASSISTANT, "It is 6."))
    ids, mask = tokenizer.render_conversation(conv, max_tokens=1000)
    want = expected(
        tokenizer,
        ("<|bos|>", 0),
        *user_turn("What is 2+2?"),
        ("<|assistant_start|>", 0),
        ("4.", 1),
        ("<|assistant_end|>", 1),
        *user_turn("And 3+3?"),
        ("<|assistant_start|>", 0),
        ("It is 6.", 1),
        ("<|assistant_end|>", 1),
    )
    assert (ids, mask) == want
    assert tokenizer.decode(ids) == (
        "<|bos|><|user_start|>What is 2+2?<|user_end|><|assistant_start|>4.<|assistant_end|>"
        "<|user_start|>And 3+3?<|user_end|><|assistant_start|>It is 6.<|assistant_end|>"
    )
    assert tokenizer.visualize(ids, mask).endswith("<|assistant_start|>⟦It is 6.<|assistant_end|>⟧")


def test_system_message_is_folded_into_the_first_user_turn(tokenizer: Tokenizer) -> None:
    conv = {
        "messages": [{"role": "system", "content": "Be brief."}, *chat((USER, "Hi"), (ASSISTANT, "Hello"))["messages"]]
    }
    ids, mask = tokenizer.render_conversation(conv, max_tokens=1000)
    want = expected(
        tokenizer,
        ("<|bos|>", 0),
        *user_turn("Be brief.\n\nHi"),
        ("<|assistant_start|>", 0),
        ("Hello", 1),
        ("<|assistant_end|>", 1),
    )
    assert (ids, mask) == want


def test_calculator_call_is_trained_and_its_output_is_not(tokenizer: Tokenizer) -> None:
    parts = [
        {"type": "text", "text": "3 boxes of 12 is "},
        {"type": "python", "text": "12*3"},
        {"type": "python_output", "text": "36"},
        {"type": "text", "text": " eggs.\n#### 36"},
    ]
    ids, mask = tokenizer.render_conversation(chat((USER, "How many eggs?"), (ASSISTANT, parts)), max_tokens=1000)
    want = expected(
        tokenizer,
        ("<|bos|>", 0),
        *user_turn("How many eggs?"),
        ("<|assistant_start|>", 0),
        ("3 boxes of 12 is ", 1),
        ("<|python_start|>", 1),
        ("12*3", 1),
        ("<|python_end|>", 1),
        ("<|output_start|>", 0),
        ("36", 0),
        ("<|output_end|>", 0),
        (" eggs.\n#### 36", 1),
        ("<|assistant_end|>", 1),
    )
    assert (ids, mask) == want
    assert "<|python_start|>12*3<|python_end|>⟧<|output_start|>36<|output_end|>⟦ eggs." in tokenizer.visualize(
        ids, mask
    )


def test_truncation_cuts_at_max_tokens(tokenizer: Tokenizer) -> None:
    conv = chat((USER, "Tell me a long story please."), (ASSISTANT, "Once upon a time there was a tokenizer."))
    full_ids, full_mask = tokenizer.render_conversation(conv, max_tokens=10_000)
    for limit in (1, 5, len(full_ids) - 1, len(full_ids), len(full_ids) + 7):
        ids, mask = tokenizer.render_conversation(conv, max_tokens=limit)
        assert ids == full_ids[:limit] and mask == full_mask[:limit]
    with pytest.raises(ValueError, match="max_tokens must be at least 1"):
        tokenizer.render_conversation(conv, max_tokens=0)


def test_render_for_completion_ends_with_assistant_start(tokenizer: Tokenizer) -> None:
    conv = chat((USER, "What is 2+2?"), (ASSISTANT, "4."), (USER, "And 3+3?"), (ASSISTANT, "6."))
    ids, _ = tokenizer.render_conversation(conv, max_tokens=1000)
    start = tokenizer.special_id("<|assistant_start|>")
    last_start = max(i for i, t in enumerate(ids) if t == start)
    prompt = tokenizer.render_for_completion(conv)
    assert prompt == ids[: last_start + 1]
    # a conversation that ends with the user's turn is a prompt as it is
    assert tokenizer.render_for_completion(chat(*[(m["role"], m["content"]) for m in conv["messages"][:3]])) == prompt
    assert (
        tokenizer.render_for_completion(chat((USER, "Hi")))
        == expected(tokenizer, ("<|bos|>", 0), *user_turn("Hi"), ("<|assistant_start|>", 0))[0]
    )


BAD = [
    ({"messages": []}, "the conversation has no messages"),
    ([{"role": "user", "content": "hi"}], "a conversation is a dict with a 'messages' list"),
    (chat((USER, "hi")), "no assistant turn"),
    (chat(("system", "Be brief."), (USER, "hi")), "no assistant turn"),
    (chat(("system", "Be brief.")), "only a system message"),
    (chat((ASSISTANT, "hello"), (USER, "hi")), "message 0 is from the assistant but the user should speak next"),
    (chat((USER, "a"), (USER, "b"), (ASSISTANT, "c")), "message 1 is from the user but the assistant should speak"),
    (chat((USER, "a"), (ASSISTANT, "b"), (ASSISTANT, "c")), "message 2 is from the assistant but the user should"),
    (chat((USER, "a"), ("tool", "b")), "message 1 has unknown role 'tool'"),
    (chat((USER, "a"), (ASSISTANT, "b"), ("system", "c")), "message 2 is a system message, but only the first"),
    (chat((USER, "a"), (ASSISTANT, [{"type": "image", "text": "x"}])), "message 1 part 0 has unknown type 'image'"),
    (chat((USER, "a"), (ASSISTANT, [{"type": "text"}])), "message 1 part 0 (text) has no 'text' string"),
    (chat((USER, [{"type": "text", "text": "a"}]), (ASSISTANT, "b")), "message 0 (user) content must be a string"),
    (chat((USER, "a"), (ASSISTANT, None)), "message 1 (assistant) content must be a string or a list of parts"),
]


@pytest.mark.parametrize(("conversation", "message"), BAD, ids=[m for _, m in BAD])
def test_malformed_conversations_get_a_one_line_error(tokenizer: Tokenizer, conversation, message: str) -> None:
    with pytest.raises(ValueError) as info:
        tokenizer.render_conversation(conversation, max_tokens=100)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_render_for_completion_validates_too(tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="message 1 has unknown role 'robot'"):
        tokenizer.render_for_completion(chat((USER, "a"), ("robot", "b")))
    with pytest.raises(ValueError, match="no messages"):
        tokenizer.render_for_completion({"messages": []})
