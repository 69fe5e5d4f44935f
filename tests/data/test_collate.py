"""Assistant-only labels located in the full render, truncation and padding, on hand-written inputs."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from helpers import chat_template_ids, trained_spans
from lightning_ft.data.collate import (
    IGNORE_INDEX,
    ChatCollator,
    EmptyLabelsError,
    collate,
    count_trained,
    encode_conversation,
    truncate_example,
)

# Llama-3's layout: header tokens around the role, a blank line, then the content and <|eot_id|>.
LLAMA3_TEMPLATE = (
    "{{ '<|begin_of_text|>' }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# Announces the number of turns up front, so rendering a prefix of the conversation changes its start
# (labels from diffing prefix renders could not mask it).
UNSTABLE_TEMPLATE = (
    "{{ 'A chat with ' + (messages | length | string) + ' messages.\n' }}{% for message in messages %}"
    "{{ message['role'] + ': ' + message['content'] + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)

MULTI_TURN = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "Six, of course!"},
]


@pytest.fixture(scope="module")
def llama3_tokenizer(tiny_tokenizer):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": LLAMA3_SPECIALS})
    tokenizer.chat_template = LLAMA3_TEMPLATE
    return tokenizer




def test_chatml_single_turn_trains_content_and_end_of_turn(tiny_tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! {\"a\": 1}"}]
    example = encode_conversation(messages, tiny_tokenizer)
    assert example["input_ids"] == chat_template_ids(tiny_tokenizer, messages)
    assert trained_spans(tiny_tokenizer, example) == ['Hello! {"a": 1}<|im_end|>']
    # Labels align with input_ids (the model shifts): each trained label is the token at its position.
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(example["input_ids"], example["labels"]))


def test_chatml_multi_turn_never_trains_system_or_user(tiny_tokenizer):
    example = encode_conversation(MULTI_TURN, tiny_tokenizer)
    assert example["input_ids"] == chat_template_ids(tiny_tokenizer, MULTI_TURN)
    assert trained_spans(tiny_tokenizer, example) == ["It is 4.<|im_end|>", "Six, of course!<|im_end|>"]
    # Everything before the first trained token, the assistant header included, is masked.
    first = next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
    prompt = tiny_tokenizer.decode(example["input_ids"][:first])
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )


def test_llama3_template_trains_content_and_eot(llama3_tokenizer):
    example = encode_conversation(MULTI_TURN, llama3_tokenizer)
    assert example["input_ids"] == chat_template_ids(llama3_tokenizer, MULTI_TURN)
    assert trained_spans(llama3_tokenizer, example) == ["It is 4.<|eot_id|>", "Six, of course!<|eot_id|>"]


def test_chat_template_argument_overrides_tokenizer(tiny_tokenizer, llama3_tokenizer):
    # llama3_tokenizer knows the special tokens; give it ChatML's template through the argument.
    chatml = tiny_tokenizer.chat_template
    example = encode_conversation(MULTI_TURN[1:3], llama3_tokenizer, chat_template=chatml)
    assert trained_spans(llama3_tokenizer, example) == ["It is 4.<|im_end|>"]


def test_bpe_merge_across_boundary_trains_the_straddling_token(tiny_tokenizer):
    # The tiny vocab merges "\n" + two spaces into one token, so content starting with three spaces fuses
    # with the header's newline. That token carries two of the reply's spaces, which the model must write:
    # it is trained, header newline and all (every character of a reply is a target).
    messages = [{"role": "user", "content": "Code?"}, {"role": "assistant", "content": "   indented"}]
    example = encode_conversation(messages, tiny_tokenizer)
    assert "ĊĠĠ" in tiny_tokenizer.convert_ids_to_tokens(example["input_ids"])
    assert trained_spans(tiny_tokenizer, example) == ["\n   indented<|im_end|>"]


def test_template_that_is_not_prefix_stable_is_masked_from_its_full_render(tiny_tokenizer):
    # No marker and no stop token after any reply: the earlier ones train bare (with a warning), the
    # final one gets an appended eos.
    with pytest.warns(UserWarning):
        example = encode_conversation(MULTI_TURN, tiny_tokenizer, chat_template=UNSTABLE_TEMPLATE)
    assert trained_spans(tiny_tokenizer, example) == [" It is 4.", " Six, of course!\n<|im_end|>"]


def test_invalid_conversation_raises(tiny_tokenizer):
    with pytest.raises(ValueError, match=r"Invalid conversation: messages\[1\]\.role: unknown role 'bot'"):
        encode_conversation([{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Yo"}], tiny_tokenizer)


def test_truncation_inside_an_assistant_turn(tiny_tokenizer):
    full = encode_conversation(MULTI_TURN, tiny_tokenizer)
    trained_at = [i for i, label in enumerate(full["labels"]) if label != IGNORE_INDEX]
    second = next(i for previous, i in zip(trained_at, trained_at[1:]) if i != previous + 1)  # the last span's start
    cut = encode_conversation(MULTI_TURN, tiny_tokenizer, max_length=second + 2)
    assert cut["input_ids"] == full["input_ids"][: second + 2]
    assert cut["labels"] == full["labels"][: second + 2]
    assert trained_spans(tiny_tokenizer, cut) == ["It is 4.<|im_end|>", tiny_tokenizer.decode(cut["input_ids"][-2:])]


def test_truncation_that_removes_every_trained_token(tiny_tokenizer):
    with pytest.raises(EmptyLabelsError, match=r"conversation yields no trained token after truncation to "
                                               r"max_length=10: its first trained token is at position \d+"):
        encode_conversation(MULTI_TURN, tiny_tokenizer, max_length=10)


def test_template_without_assistant_content_raises(tiny_tokenizer):
    drops_assistant = (
        "{% for message in messages %}{% if message['role'] != 'assistant' %}"
        "{{ message['role'] + ': ' + message['content'] + '\n' }}{% endif %}{% endfor %}"
    )
    with pytest.raises(EmptyLabelsError, match=r"conversation yields no trained token"):
        encode_conversation(MULTI_TURN[1:3], tiny_tokenizer, chat_template=drops_assistant)


def test_truncate_example_modes():
    example = {"input_ids": [1, 2, 3, 4], "labels": [IGNORE_INDEX, IGNORE_INDEX, 3, 4]}
    assert truncate_example(example, 4, "drop") is example
    assert truncate_example(example, 3, "drop") is None
    assert truncate_example(example, 3, "cut") == {"input_ids": [1, 2, 3], "labels": [IGNORE_INDEX, IGNORE_INDEX, 3]}
    assert count_trained(example["labels"]) - count_trained(truncate_example(example, 3)["labels"]) == 1
    with pytest.raises(ValueError, match=r"mode='keep' is not one of: cut, drop"):
        truncate_example(example, 3, "keep")


def test_collate_pads_right_with_ignored_labels():
    examples = [
        {"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]},
        {"input_ids": [8], "labels": [8]},
    ]
    batch = collate(examples, pad_token_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(tensor.dtype == torch.long for tensor in batch.values())


@pytest.mark.parametrize(("longest", "multiple", "expected"), [(8, 8, 8), (9, 8, 16), (1, 8, 8), (5, None, 5)])
def test_collate_pad_to_multiple_of(longest, multiple, expected):
    examples = [{"input_ids": [3] * longest, "labels": [3] * longest}, {"input_ids": [4], "labels": [4]}]
    batch = collate(examples, pad_token_id=9, pad_to_multiple_of=multiple)
    assert batch["input_ids"].shape == (2, expected)
    assert batch["attention_mask"].sum(dim=1).tolist() == [longest, 1]
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_collate_rejects_empty_batch():
    with pytest.raises(ValueError, match="collate needs at least one example"):
        collate([], pad_token_id=0)


def test_chat_collator_is_picklable_and_matches_collate(tiny_tokenizer):
    examples = [encode_conversation(MULTI_TURN, tiny_tokenizer), encode_conversation(MULTI_TURN[1:3], tiny_tokenizer)]
    collator = pickle.loads(pickle.dumps(ChatCollator(pad_token_id=0, pad_to_multiple_of=8)))
    batch = collator(examples)
    expected = collate(examples, 0, 8)
    assert all(torch.equal(batch[key], expected[key]) for key in expected)
    assert batch["input_ids"].shape[1] % 8 == 0
