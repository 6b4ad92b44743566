"""The chat format of rodin, ChatML, in one place: what SFT trains on, what generation prompts
with, and what the exports carry (transformers/GGUF Jinja template, Ollama Go template).

    <s><|im_start|>system\\n…<|im_end|>\\n<|im_start|>user\\n…<|im_end|>\\n<|im_start|>assistant\\n…<|im_end|>\\n

<|im_start|> and <|im_end|> are control tokens inserted by id, never parsed from text, so a user
typing "<|im_start|>" cannot forge a turn. The loss covers assistant content and its <|im_end|>.
"""

ROLES = ("system", "user", "assistant")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Ollama's Go template for the same text (Ollama adds no BOS of its own beyond llama.cpp's)
OLLAMA_TEMPLATE = (
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
)


def validate(messages):
    """Raises ValueError with the reason when a conversation is not trainable."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ValueError(f"message {i}: unknown role {m.get('role') if isinstance(m, dict) else m!r}")
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise ValueError(f"message {i}: empty {m['role']} turn")
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn")


def render(messages, add_generation_prompt=False, bos_token="<s>"):
    """The conversation as text, exactly as CHAT_TEMPLATE renders it."""
    text = bos_token + "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def encode(tokenizer, messages, add_generation_prompt=False):
    """Token ids of the conversation and, for each, whether it is trained (assistant content and
    its <|im_end|>). Text between control tokens is encoded as one segment, as llama.cpp and
    transformers do when they tokenize the rendered template."""
    if not tokenizer.has_chat_tokens:
        raise ValueError(f"{tokenizer.path}: the vocabulary has no <|im_start|>/<|im_end|> tokens; "
                         "retrain the tokenizer with rodin (data/train_tokenizer.py) to chat")
    ids, trained = [tokenizer.bos_id], [False]
    for i, m in enumerate(messages):
        header = tokenizer.encode(m["role"] + "\n")
        segment = tokenizer.encode(m["role"] + "\n" + m["content"])
        assert segment[: len(header)] == header, "a newline always ends a piece"
        is_assistant = m["role"] == "assistant"
        ids += [tokenizer.im_start_id] + segment + [tokenizer.im_end_id]
        trained += [False] * (1 + len(header)) + [is_assistant] * (len(segment) - len(header) + 1)
        newline = tokenizer.encode("\n")
        ids += newline
        trained += [False] * len(newline)
    if add_generation_prompt:
        prompt = [tokenizer.im_start_id] + tokenizer.encode("assistant\n")
        ids += prompt
        trained += [False] * len(prompt)
    return ids, trained
