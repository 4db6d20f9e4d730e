"""Chat templates: which one renders a model's chats, for training, evaluation, the card's probe and serving.

A model directory's own template (``chat_template.jinja``, or ``chat_template`` in ``tokenizer_config.json``)
is used when it has one: that is the format an instruct model was tuned in, and vLLM's chat completions render
with it too. A model without one (``builtin:tiny``) gets :data:`FALLBACK_CHAT_TEMPLATE`, which the service also
passes to vLLM with each chat request, so training and serving always agree on the text a chat becomes.

The fallback renders each turn as ``<|role|>`` on its own line, the content and a newline, after the
tokenizer's BOS; an assistant turn ends with EOS before its newline, so a model learns where an answer stops.
This module stays free of torch and transformers: the serving layer reads it.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["FALLBACK_CHAT_TEMPLATE", "model_chat_template"]

FALLBACK_CHAT_TEMPLATE = (
    # Every newline is a string literal: the template engine trims a newline that follows a block tag.
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{{ '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def model_chat_template(model_dir: Path) -> str | None:
    """The model directory's own chat template, or None when it has none (or its files cannot be read)."""
    try:
        jinja = model_dir / "chat_template.jinja"
        if jinja.is_file():
            return jinja.read_text()
        config = json.loads((model_dir / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return None
    template = config.get("chat_template") if isinstance(config, dict) else None
    return template if isinstance(template, str) and template.strip() else None
