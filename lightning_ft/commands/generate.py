"""``lightning_ft generate`` and ``lightning_ft chat``: try a base or fine-tuned model from the command line.

::

    SYSTEM="You are a support triage assistant. Reply with one line of JSON with keys category, urgency, summary."
    lightning_ft generate --adapter runs/quickstart/lightning_logs/version_0/hf_model --system "$SYSTEM" \\
        --prompt "My parcel never arrived." --prompt "I cannot log in since the update."
    lightning_ft chat --checkpoint runs/quickstart/lightning_logs/version_0/checkpoints/last.ckpt

``generate`` prints the answer (one prompt) or ``> prompt`` / answer blocks (several; ``--json`` for a
list of ``{"prompt", "output"}``). ``chat`` reads one user turn per line from stdin until EOF or ``exit``,
keeps the history (``/reset`` clears it) and prints each answer. Exit code 1 when the model cannot be loaded.
Give the system prompt the model was trained with (``--system``): fine-tuning teaches the behaviour under it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROG = "lightning_ft"


def _parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"{PROG} {command}", allow_abbrev=False, description=(
        "Answer prompts greedily with the chat template applied." if command == "generate" else
        "Chat with a model: one user turn per line on stdin; 'exit' or EOF ends, '/reset' clears the history."))
    parser.add_argument("--model", default=None, help="base model spec (default: the base recorded with the "
                                                     "adapter or checkpoint, else smollm2-135m-instruct)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--adapter", help="PEFT adapter directory, e.g. <run>/hf_model")
    source.add_argument("--checkpoint", help="Lightning checkpoint (.ckpt) written by fit")
    source.add_argument("--merged", help="complete Hugging Face model directory (merged or fully fine-tuned)")
    parser.add_argument("--system", default=None, help="system message")
    parser.add_argument("--max_new_tokens", type=int, default=256)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--chat_template", default=None, help="Jinja chat template overriding the tokenizer's")
    if command == "generate":
        parser.add_argument("--prompt", action="append", default=[], help="a user message (repeatable)")
        parser.add_argument("--prompts_file", default=None,
                            help="text file with one prompt per line (a line that is a JSON string may hold newlines)")
        parser.add_argument("--batch_size", type=int, default=8)
        parser.add_argument("--json", action="store_true", help="print a JSON list of {prompt, output}")
    return parser


def _fail(parser: argparse.ArgumentParser, message: str) -> int:
    print(f"{parser.prog}: error: {message}", file=sys.stderr)
    return 1


def _load(options: argparse.Namespace):
    from transformers.utils import logging as transformers_logging

    from lightning_ft.loading import load_for_generation

    transformers_logging.disable_progress_bar()  # "Loading weights" bars would clutter the answers

    return load_for_generation(options.model, options.adapter, options.checkpoint, options.merged,
                               options.dtype, options.chat_template)


def _read_prompts(path: str) -> list[str]:
    file = Path(path).expanduser()
    if file.is_dir():
        raise ValueError(f"{path}: is a directory, expected a text file with one prompt per line")
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ValueError(f"{path}: file not found") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path}: is not UTF-8 text") from None
    prompts = []
    for line in filter(str.strip, lines):
        prompts.append(json.loads(line) if line.startswith('"') and line.rstrip().endswith('"') else line)
    return prompts


def _with_system(system: str | None, messages: list[dict[str, str]]) -> list[dict[str, str]]:
    return ([{"role": "system", "content": system}] if system else []) + messages


def run(argv: list[str]) -> int:
    """Entry point of ``lightning_ft generate``; returns the exit code."""
    parser = _parser("generate")
    options = parser.parse_args(argv)
    if options.max_new_tokens < 1 or options.batch_size < 1:
        parser.error("--max_new_tokens and --batch_size must be >= 1")
    try:
        prompts = options.prompt + (_read_prompts(options.prompts_file) if options.prompts_file else [])
    except ValueError as error:
        return _fail(parser, str(error))
    if not prompts:
        parser.error("give at least one --prompt or a --prompts_file")
    from lightning_ft.generation import generate

    try:
        model, tokenizer = _load(options)
    except (OSError, ValueError) as error:
        return _fail(parser, str(error).splitlines()[0])
    conversations = [_with_system(options.system, [{"role": "user", "content": p}]) for p in prompts]
    outputs = generate(model, tokenizer, conversations, options.max_new_tokens, options.batch_size,
                       options.chat_template)
    if options.json:
        print(json.dumps([{"prompt": p, "output": o} for p, o in zip(prompts, outputs)], indent=2, ensure_ascii=False))
    elif len(prompts) == 1:
        print(outputs[0].strip())
    else:
        print("\n\n".join(f"> {p}\n{o.strip()}" for p, o in zip(prompts, outputs)))
    return 0


def _fit_context(model, tokenizer, history: list[dict[str, str]], system: str | None, reserve: int,
                 chat_template: str | None) -> list[dict[str, str]]:
    """Drop the oldest exchanges until the prompt plus ``reserve`` new tokens fits the model's context."""
    from lightning_ft.generation import encode_prompt

    limit = getattr(model.config, "max_position_embeddings", None)
    while limit and len(history) > 1 and \
            len(encode_prompt(tokenizer, _with_system(system, history), chat_template)) + reserve > limit:
        history = history[2:]
    return history


def chat(argv: list[str]) -> int:
    """Entry point of ``lightning_ft chat``: an interactive loop that keeps the conversation; returns the exit code."""
    parser = _parser("chat")
    options = parser.parse_args(argv)
    if options.max_new_tokens < 1:
        parser.error("--max_new_tokens must be >= 1")
    from lightning_ft.generation import generate

    try:
        model, tokenizer = _load(options)
    except (OSError, ValueError) as error:
        return _fail(parser, str(error).splitlines()[0])
    interactive = sys.stdin.isatty()
    if interactive:
        print("Type a message; '/reset' clears the conversation, 'exit' or Ctrl-D quits.")
    history: list[dict[str, str]] = []
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        text = line.strip()
        if text in ("exit", "quit"):
            break
        if text == "/reset":
            history = []
            continue
        if not text:
            continue
        history = _fit_context(model, tokenizer, history + [{"role": "user", "content": text}], options.system,
                               options.max_new_tokens, options.chat_template)
        answer = generate(model, tokenizer, [_with_system(options.system, history)], options.max_new_tokens,
                          1, options.chat_template)[0].strip()
        print(answer, flush=True)
        history.append({"role": "assistant", "content": answer})
    return 0
