"""Each reply and its stop marker located inside the full render, for templates with every known quirk.

The templates are written for these tests, each reproducing one behaviour of real model families; the
trained text is asserted exactly, and the input ids against the template's own tokenisation.
"""

from __future__ import annotations

import copy

import pytest

from helpers import chat_template_ids, trained_spans
from lightning_ft.data.collate import (
    _WARNED,
    IGNORE_INDEX,
    EmptyLabelsError,
    encode_conversation,
    encode_conversations,
)
from lightning_ft.data import labels
from lightning_ft.data.labels import TemplateRefusedError, render_plain

CONVERSATION = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "Six, of course!"},
]
WITH_SYSTEM = [{"role": "system", "content": "Be brief."}, *CONVERSATION]
REASONING = [
    {"role": "user", "content": "Sum 1+1"},
    {"role": "assistant", "content": "<think>\nEasy: two.\n</think>\n\n2"},
    {"role": "user", "content": "Sum 2+2"},
    {"role": "assistant", "content": "<think>\nFour it is.\n</think>\n\n4"},
]

# The end-of-turn marker is written only when the next message opens: nothing follows the final reply.
BETWEEN_TURNS = (
    "{% for m in messages %}{% if not loop.first %}<|sep|>{% endif %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
    "{% if add_generation_prompt %}<|sep|><|assistant|>{% endif %}"
)
# GLM-style: no end marker at all; the model stops by emitting the next role tag.
ROLE_TAG_STOP = (
    "[gMASK]{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
# The next turn's header is written after the final reply even without a generation prompt.
HEADER_AFTER_LAST = "{% for m in messages %}<|turn|>{{ m.role }}\n{{ m.content }}<|eot|>{% endfor %}<|turn|>assistant\n"
# Qwen3-style: reasoning only in the last turn (an empty block when there is none), stripped from history.
REASONING_STRIPPED = (
    "{% for m in messages %}{% if m.role == 'assistant' %}"
    "{% set answer = m.content.split('</think>')[-1].strip() %}"
    "{% set thought = m.content.split('</think>')[0].split('<think>')[-1].strip() if '</think>' in m.content else '' %}"
    "<|im_start|>assistant\n{% if loop.last %}<think>\n{{ thought }}\n</think>\n\n{% endif %}{{ answer }}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Mistral-Nemo-style: the system prompt is folded into the last user turn; replies end with the eos text.
SYSTEM_IN_LAST_USER = (
    "{% set ns = namespace(last=0, system='') %}{% for m in messages %}{% if m.role == 'user' %}"
    "{% set ns.last = loop.index0 %}{% elif m.role == 'system' %}{% set ns.system = m.content %}{% endif %}{% endfor %}"
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}[INST]"
    "{% if loop.index0 == ns.last and ns.system %}{{ ns.system }}\n\n{% endif %}{{ m.content }}[/INST]"
    "{% elif m.role == 'assistant' %}{{ m.content }}{{ eos_token }}{% endif %}{% endfor %}"
)
# gpt-oss-style: earlier turns end <|end|>, the last one <|return|>.
LAST_MARKER_DIFFERS = (
    "{% for m in messages %}<|start|>{{ m.role }}<|message|>{{ m.content }}"
    "{% if m.role == 'assistant' and loop.last %}<|return|>{% else %}<|end|>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|start|>assistant<|message|>{% endif %}"
)
# Phi-3.5-style: turns end <|end|>, and one eos closes the whole conversation.
EOS_AT_END = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% else %}{{ eos_token }}{% endif %}"
)
# Gemma-2-style: a system message is refused by the template itself.
NO_SYSTEM = (
    "{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content | trim }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# DeepSeek-R1-distill-style: history loses its reasoning; the generation prompt opens a think block.
R1_LIKE = (
    "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}<|User|>{{ m.content }}"
    "{% elif m.role == 'assistant' %}<|Assistant|>{{ m.content.split('</think>')[-1] }}{{ eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|Assistant|><think>\n{% endif %}"
)
# Llama-2-style: bos and eos written as text inside the render, content trimmed.
LLAMA2_LIKE = (
    "{% for m in messages %}{% if m.role == 'user' %}{{ bos_token }}[INST] {{ m.content | trim }} [/INST]"
    "{% elif m.role == 'assistant' %} {{ m.content | trim }} {{ eos_token }}{% endif %}{% endfor %}"
)
# Llama-3-style with a date from strftime_now in the system header, content trimmed.
LLAMA3_LIKE = (
    "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nToday: {{ strftime_now('%d %b %Y') }}"
    "{% if messages[0].role == 'system' %}\n{{ messages[0].content }}{% endif %}<|eot_id|>"
    "{% for m in messages if m.role != 'system' %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    "{{ m.content | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@pytest.fixture(autouse=True)
def warn_afresh():
    """Each warning is given once per template and process: let every test see its own."""
    _WARNED.clear()


def make_tokenizer(tiny_tokenizer, template: str, specials: list[str], eos: str | None = None,
                   bos: str | None = None):
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    if eos is not None:
        tokenizer.eos_token = eos
    if bos is not None:
        tokenizer.bos_token = bos
    tokenizer.chat_template = template
    return tokenizer




def check(tokenizer, messages, expected, appended_eos=False, appended=None, **kwargs):
    example = encode_conversation(messages, tokenizer, **kwargs)
    appended = [tokenizer.convert_tokens_to_ids(appended)] if appended else [tokenizer.eos_token_id] * appended_eos
    reference = chat_template_ids(tokenizer, messages) + appended
    assert example["input_ids"] == reference
    assert trained_spans(tokenizer, example) == expected
    # The batched encoder (one render call, one tokenisation of the batch) gives each conversation the same.
    assert encode_conversations([messages, messages], tokenizer, **kwargs) == [example, example]
    return example


def test_chatml_trains_reply_and_im_end_not_the_newline(tiny_tokenizer):
    check(tiny_tokenizer, WITH_SYSTEM, ["It is 4.<|im_end|>", "Six, of course!<|im_end|>"])


def test_llama3_like_with_strftime_and_trim(tiny_tokenizer):
    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tokenizer = make_tokenizer(tiny_tokenizer, LLAMA3_LIKE, specials, eos="<|eot_id|>")
    messages = [*WITH_SYSTEM[:-1], {"role": "assistant", "content": "  Six, of course!\n"}]
    check(tokenizer, messages, ["It is 4.<|eot_id|>", "Six, of course!<|eot_id|>"])


def test_marker_only_between_turns_trains_it_and_appends_the_given_stop_at_the_end(tiny_tokenizer):
    tokenizer = make_tokenizer(tiny_tokenizer, BETWEEN_TURNS, ["<|sep|>", "<|user|>", "<|assistant|>"])
    with pytest.warns(UserWarning, match=r"writes no stop marker after the final reply: a stop token \('<\|sep\|>'\)"):
        check(tokenizer, CONVERSATION, ["It is 4.<|sep|>", "Six, of course!<|sep|>"], appended="<|sep|>",
              stop_tokens=["<|sep|>"])


def test_without_a_given_stop_the_tokenizers_eos_is_appended(tiny_tokenizer):
    tokenizer = make_tokenizer(tiny_tokenizer, BETWEEN_TURNS, ["<|sep|>", "<|user|>", "<|assistant|>"])
    with pytest.warns(UserWarning, match=r"a stop token \('<\|im_end\|>'\) is appended"):
        check(tokenizer, CONVERSATION, ["It is 4.<|sep|>", "Six, of course!<|im_end|>"], appended_eos=True)


def test_the_familys_stop_is_appended_not_the_tokenizers_eos(tiny_tokenizer):
    """Apertus-style: the template writes nothing after the final reply; the family stops on its own token."""
    template = ("{% for m in messages %}<|{{ m.role }}_start|>{{ m.content }}"
                "{% if m.role != 'assistant' %}<|{{ m.role }}_end|>{% elif not loop.last %}<|assistant_end|>{% endif %}"
                "{% endfor %}")
    specials = ["<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>"]
    tokenizer = make_tokenizer(tiny_tokenizer, template, specials, eos="<|endoftext|>")
    stop = tokenizer.convert_tokens_to_ids("<|assistant_end|>")
    for stop_tokens in ([stop], ["<|assistant_end|>"]):
        check(tokenizer, CONVERSATION, ["It is 4.<|assistant_end|>", "Six, of course!<|assistant_end|>"],
              appended="<|assistant_end|>", stop_tokens=stop_tokens)
    # A stop given as text this tokenizer splits is appended as its tokens.
    plain = make_tokenizer(tiny_tokenizer, template, [], eos="<|endoftext|>")
    example = encode_conversation(CONVERSATION, plain, stop_tokens=["<|assistant_end|>"])
    assert plain.decode(example["input_ids"][len(chat_template_ids(plain, CONVERSATION)):]) == "<|assistant_end|>"
    assert trained_spans(plain, example)[-1] == "Six, of course!<|assistant_end|>"


def test_without_the_models_stop_tokens_the_special_token_opening_the_next_turn_is_the_stop(tiny_tokenizer):
    tokenizer = make_tokenizer(tiny_tokenizer, BETWEEN_TURNS, ["<|sep|>", "<|user|>", "<|assistant|>"])
    check(tokenizer, CONVERSATION, ["It is 4.<|sep|>", "Six, of course!<|im_end|>"], appended_eos=True)
    tokenizer = make_tokenizer(tiny_tokenizer, ROLE_TAG_STOP, ["[gMASK]", "<|user|>", "<|assistant|>", "<|system|>"])
    check(tokenizer, CONVERSATION, ["It is 4.<|user|>", "Six, of course!<|im_end|>"], appended_eos=True)


def test_plain_text_turns_train_earlier_replies_without_a_stop_and_say_so(tiny_tokenizer):
    plain = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n\n{% endfor %}"
    tokenizer = make_tokenizer(tiny_tokenizer, plain, [])
    with pytest.warns(UserWarning, match="after replies other than the last: those replies are trained without"):
        check(tokenizer, CONVERSATION, [" It is 4.", " Six, of course!\n\n<|im_end|>"], appended_eos=True)


def test_next_role_tag_is_the_stop_when_the_model_declares_it(tiny_tokenizer):
    tokenizer = make_tokenizer(tiny_tokenizer, ROLE_TAG_STOP, ["[gMASK]", "<|user|>", "<|assistant|>", "<|system|>"],
                               eos="<|endoftext|>")
    user_tag = tokenizer.convert_tokens_to_ids("<|user|>")
    with pytest.warns(UserWarning, match=r"a stop token \('<\|endoftext\|>'\) is appended"):
        check(tokenizer, WITH_SYSTEM, ["It is 4.<|user|>", "Six, of course!<|endoftext|>"], appended_eos=True,
              stop_tokens=[tokenizer.eos_token_id, user_tag])


def test_header_written_after_the_last_reply_is_not_trained(tiny_tokenizer):
    tokenizer = make_tokenizer(tiny_tokenizer, HEADER_AFTER_LAST, ["<|turn|>", "<|eot|>"], eos="<|endoftext|>")
    check(tokenizer, WITH_SYSTEM, ["It is 4.<|eot|>", "Six, of course!<|eot|>"])


def test_reasoning_stripped_from_history_and_empty_block_in_last_turn(tiny_tokenizer):
    tokenizer = make_tokenizer(tiny_tokenizer, REASONING_STRIPPED, ["<think>", "</think>"])
    check(tokenizer, WITH_SYSTEM, ["It is 4.<|im_end|>", "Six, of course!<|im_end|>"])
    check(tokenizer, REASONING, ["2<|im_end|>", "<think>\nFour it is.\n</think>\n\n4<|im_end|>"])
    check(tokenizer, REASONING, ["2<|im_end|>", "4<|im_end|>"], train_reasoning=False)


def test_system_folded_into_last_user_turn_even_when_it_repeats_a_reply(tiny_tokenizer):
    tokenizer = make_tokenizer(tiny_tokenizer, SYSTEM_IN_LAST_USER, ["<s>", "</s>"], eos="</s>", bos="<s>")
    messages = [{"role": "system", "content": "Six, of course!"}, *CONVERSATION]
    check(tokenizer, messages, ["It is 4.</s>", "Six, of course!</s>"])


def test_different_markers_for_earlier_and_last_turns(tiny_tokenizer):
    specials = ["<|start|>", "<|message|>", "<|end|>", "<|return|>"]
    tokenizer = make_tokenizer(tiny_tokenizer, LAST_MARKER_DIFFERS, specials, eos="<|return|>")
    check(tokenizer, WITH_SYSTEM, ["It is 4.<|end|>", "Six, of course!<|return|>"])


def test_eos_only_at_the_very_end_is_not_trained_past_the_turn_marker(tiny_tokenizer):
    specials = ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"]
    tokenizer = make_tokenizer(tiny_tokenizer, EOS_AT_END, specials, eos="<|endoftext|>")
    check(tokenizer, WITH_SYSTEM, ["It is 4.<|end|>", "Six, of course!<|end|>"])
    check(tokenizer, WITH_SYSTEM, ["It is 4.<|end|>", "Six, of course!<|end|>"], stop_tokens=["<|end|>"])


def test_template_that_raises_is_refused_with_its_own_message(tiny_tokenizer):
    tokenizer = make_tokenizer(tiny_tokenizer, NO_SYSTEM, ["<|user|>", "<|assistant|>", "<|end|>"])
    check(tokenizer, CONVERSATION, ["It is 4.<|end|>", "Six, of course!<|end|>"])
    with pytest.raises(TemplateRefusedError, match=r"refuses this conversation: System role not supported\. "
                                                   r"To train on it, set `data.system_prompt: null`"):
        encode_conversation(WITH_SYSTEM, tokenizer)
    # In a batch only the refused conversation fails; the others are encoded as alone.
    alone, refused, again = encode_conversations([CONVERSATION, WITH_SYSTEM, CONVERSATION], tokenizer)
    assert alone == again == encode_conversation(CONVERSATION, tokenizer)
    assert isinstance(refused, TemplateRefusedError) and "System role not supported" in str(refused)


@pytest.mark.parametrize("template", [None, LLAMA3_LIKE, LLAMA2_LIKE, R1_LIKE, REASONING_STRIPPED],
                         ids=["chatml", "llama3", "llama2", "r1", "reasoning-stripped"])
def test_direct_render_is_apply_chat_template_text(tiny_tokenizer, template, monkeypatch):
    monkeypatch.setattr(labels, "_DIRECT_RENDER", {})
    tokenizer = make_tokenizer(tiny_tokenizer, template or tiny_tokenizer.chat_template, ["<s>", "</s>"], eos="</s>",
                               bos="<s>")
    chats = [WITH_SYSTEM, REASONING, CONVERSATION]
    for prompt in (False, True):
        expected = tokenizer.apply_chat_template(
            [[{"role": m["role"], "content": m["content"]} for m in chat] for chat in chats], tokenize=False,
            add_generation_prompt=prompt)
        assert render_plain(tokenizer, chats, None, add_generation_prompt=prompt) == expected
    assert list(labels._DIRECT_RENDER.values()) == [True, True]  # transformers' renderer, checked, then used


def test_direct_render_that_differs_is_not_used(tiny_tokenizer, monkeypatch):
    monkeypatch.setattr(labels, "_DIRECT_RENDER", {})
    monkeypatch.setattr(labels, "_render_jinja", lambda **kwargs: (["not the template's text"], None))
    expected = tiny_tokenizer.apply_chat_template([CONVERSATION, CONVERSATION], tokenize=False)
    assert render_plain(tiny_tokenizer, [CONVERSATION, CONVERSATION], None) == expected
    assert list(labels._DIRECT_RENDER.values()) == [False]


def test_r1_like_generation_prompt_the_finished_turn_never_contains(tiny_tokenizer):
    specials = ["<|User|>", "<|Assistant|>", "<think>", "</think>", "<s>", "</s>"]
    tokenizer = make_tokenizer(tiny_tokenizer, R1_LIKE, specials, eos="</s>", bos="<s>")
    check(tokenizer, CONVERSATION, ["It is 4.</s>", "Six, of course!</s>"])
    check(tokenizer, REASONING, ["2</s>", "4</s>"])


def test_llama2_like_bos_and_eos_in_the_text(tiny_tokenizer):
    tokenizer = make_tokenizer(tiny_tokenizer, LLAMA2_LIKE, ["<s>", "</s>"], eos="</s>", bos="<s>")
    # The reply's first token carries the space after [/INST]: that token is what the model generates.
    example = check(tokenizer, CONVERSATION, [" It is 4. </s>", " Six, of course! </s>"])
    assert example["input_ids"].count(tokenizer.bos_token_id) == 2


def test_masking_strategies_and_per_message_opt_out(tiny_tokenizer):
    check(tiny_tokenizer, WITH_SYSTEM, ["Six, of course!<|im_end|>"], masking="last_assistant")
    everything = encode_conversation(WITH_SYSTEM, tiny_tokenizer, masking="all")
    assert everything["labels"] == everything["input_ids"]
    opted_out = [*WITH_SYSTEM[:2], {**WITH_SYSTEM[2], "train": False}, *WITH_SYSTEM[3:]]
    check(tiny_tokenizer, opted_out, ["Six, of course!<|im_end|>"])
    weighted = [*WITH_SYSTEM[:4], {**WITH_SYSTEM[4], "weight": 0}]
    check(tiny_tokenizer, weighted, ["It is 4.<|im_end|>"])
    with pytest.raises(EmptyLabelsError, match="every reply is opted out"):
        encode_conversation(weighted, tiny_tokenizer, masking="last_assistant")
    with pytest.raises(ValueError, match="masking='some' is not one of: assistant, last_assistant, all"):
        encode_conversation(WITH_SYSTEM, tiny_tokenizer, masking="some")


def test_reply_equal_to_the_system_prompt_is_found_in_its_own_turn(tiny_tokenizer):
    messages = [{"role": "system", "content": "It is 4."}, *CONVERSATION]
    example = check(tiny_tokenizer, messages, ["It is 4.<|im_end|>", "Six, of course!<|im_end|>"])
    first = next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
    prompt = tiny_tokenizer.decode(example["input_ids"][:first])
    assert prompt.endswith("What is 2+2?<|im_end|>\n<|im_start|>assistant\n")


# A fixed preamble that mentions words the conversation uses, before a ChatML body.
PREAMBLE = (
    "<|im_start|>system\nYou are an assistant. Answer yes or no to the user."
    "{% if messages[0].role == 'system' %} {{ messages[0].content }}{% endif %}<|im_end|>\n"
    "{% for m in messages if m.role != 'system' %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize("template", [None, LLAMA3_LIKE, PREAMBLE], ids=["chatml", "llama3", "preamble"])
def test_replies_that_repeat_header_words_the_preamble_or_the_system_prompt(tiny_tokenizer, template):
    specials = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    tokenizer = make_tokenizer(tiny_tokenizer, template or tiny_tokenizer.chat_template, specials)
    end = "<|eot_id|>" if template is LLAMA3_LIKE else "<|im_end|>"
    messages = [{"role": "system", "content": "Say yes."}, {"role": "user", "content": "yes"},
                {"role": "assistant", "content": "yes"}, {"role": "user", "content": "user"},
                {"role": "assistant", "content": "assistant"}, {"role": "user", "content": "no"},
                {"role": "assistant", "content": "Say yes."}]
    check(tokenizer, messages, [f"yes{end}", f"assistant{end}", f"Say yes.{end}"])


@pytest.mark.slow
@pytest.mark.parametrize(("template", "specials", "eos", "expected"), [
    (LAST_MARKER_DIFFERS, ["<|start|>", "<|message|>", "<|end|>", "<|return|>"], "<|return|>",
     ["It is 4.<|end|>", "Six, of course!<|return|>"]),
    (REASONING_STRIPPED, ["<think>", "</think>"], None, ["It is 4.<|im_end|>", "Six, of course!<|im_end|>"]),
    (EOS_AT_END, ["<|user|>", "<|assistant|>", "<|system|>", "<|end|>"], "<|endoftext|>",
     ["It is 4.<|end|>", "Six, of course!<|end|>"]),
    (LLAMA2_LIKE, ["<s>", "</s>"], "</s>", [" It is 4. </s>", " Six, of course! </s>"]),
], ids=["last-marker-differs", "reasoning-stripped", "eos-at-end", "llama2-like"])
def test_real_default_tokenizer_with_our_templates(template, specials, eos, expected):
    from lightning_ft.models import load_tokenizer

    tokenizer = make_tokenizer(load_tokenizer("smollm2-135m-instruct"), template, specials, eos=eos,
                               bos="<s>" if "<s>" in specials else None)
    messages = WITH_SYSTEM if template is not LLAMA2_LIKE else CONVERSATION
    check(tokenizer, messages, expected)
