"""Build a tiny random Qwen2 chat model locally: no hub, a few seconds, deterministic per seed.

    python tests/tiny_model.py OUT_DIR [--seed 0] [--tied] [--hidden-size 128 --num-layers 2]

What it writes (about 2 MB at the default size): `model.safetensors`, `config.json`,
`generation_config.json`, `tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`.

- Tokenizer: byte-level BPE trained on text that ships with CPython (so every machine trains
  the same vocabulary), 1024 merges-vocab + special tokens `<|endoftext|>` (pad, id 0),
  `<|im_start|>`, `<|im_end|>` (eos) and added tokens `<tool_call>`, `</tool_call>`,
  `<tool_response>`, `</tool_response>` (vLLM's hermes tool parser needs `<tool_call>` in the vocab).
- Chat template: Qwen2.5 style; renders `tools`, assistant `tool_calls` and `tool` messages.
- Model: `Qwen2ForCausalLM` in float32 with head_dim 32 (vLLM's CPU attention refuses < 32).
"""

import argparse
import json
import os
import pathlib
import sysconfig

VOCAB_SIZE = 1024  # BPE vocabulary, before the added tokens
LONGEST_CONTEXT = 1 << 17  # max_position_embeddings: rope has no weights, so this costs nothing until a
#                            server asks for that --max-model-len (tests do, for requests that cannot finish)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ADDED_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
STDLIB_TEXTS = ["json/__init__.py", "json/decoder.py", "json/encoder.py", "textwrap.py", "string.py",
                "this.py", "shlex.py", "glob.py"]
EXTRA_TEXT = "What is 2 + 2? The weather in Paris is sunny. Call a tool with JSON arguments.\n"

CHAT_TEMPLATE = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}
{{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
{%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
{{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- elif messages[0]['role'] == 'system' %}
{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) or (message.role == 'assistant' and not message.tool_calls) %}
{{- '<|im_start|>' + message.role + '\\n' + (message.content or '') + '<|im_end|>' + '\\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>' + message.role }}
{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
{%- for tool_call in message.tool_calls %}
{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}
{{- '\\n<tool_call>\\n{"name": "' }}{{- tool_call.name }}{{- '", "arguments": ' }}
{%- if tool_call.arguments is string %}{{- tool_call.arguments }}{%- else %}{{- tool_call.arguments | tojson }}{%- endif %}
{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}
"""


def train_tokenizer():
    """Byte-level BPE trained on CPython's own sources: identical on every machine."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text() for name in STDLIB_TEXTS] + [EXTRA_TEXT]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                                        bos_token=None, unk_token=None, model_max_length=4096)
    tokenizer.add_tokens(ADDED_TOKENS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build(out_dir, seed=0, tied=False, hidden_size=128, num_layers=2, intermediate_size=None):
    """Write a random Qwen2ForCausalLM + tokenizer to `out_dir`; same seed → same bytes."""
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    out_dir = pathlib.Path(out_dir)
    tokenizer = train_tokenizer()
    num_heads = hidden_size // 32  # head_dim 32: the smallest vLLM's CPU attention accepts
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=max(1, num_heads // 2),
        head_dim=32, max_position_embeddings=LONGEST_CONTEXT, tie_word_embeddings=tied, torch_dtype="float32",
        bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32)
    with torch.no_grad():  # the default init (std 0.02) makes near-uniform logits; wider weights make seeds differ
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.5 if "embed" in name or "lm_head" in name else 0.1)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return out_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (the tokenizer is always the same)")
    parser.add_argument("--tied", action="store_true", help="tie lm_head to the input embedding")
    parser.add_argument("--hidden-size", type=int, default=128, help="multiple of 32")
    parser.add_argument("--num-layers", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = build(args.out_dir, args.seed, args.tied, args.hidden_size, args.num_layers)
    print(json.dumps({"model": str(out), "seed": args.seed, "tied": args.tied}))


if __name__ == "__main__":
    main()
