"""The ceiling: one in-process `vllm.LLM` (what each of our DP workers owns), driven by JSON commands.

    python bench/inprocess.py --model M --max-model-len L --kv-bytes B --reply-fd FD

Reads one JSON command per line on stdin, answers one JSON line on file descriptor FD (stdout is
vLLM's log). Commands: {"prompts": [str | [int]] or "conversations": [[message]], "max_tokens",
"temperature", "ignore_eos", "logprobs"} (chat prompts are rendered before the clock starts) → {"seconds", "prompt_tokens", "completion_tokens"}. EOF on stdin: exit.
Run as a subprocess by bench/run_all.py so its memory is released when it ends.
"""

import argparse
import json
import os
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "tests"))
from support import chat_prompt_ids  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--max-model-len", type=int, required=True)
    parser.add_argument("--kv-bytes", type=int, required=True)
    parser.add_argument("--max-num-seqs", type=int, required=True)
    parser.add_argument("--reply-fd", type=int, required=True)
    args = parser.parse_args()
    replies = os.fdopen(args.reply_fd, "w")

    def reply(obj):
        replies.write(json.dumps(obj) + "\n")
        replies.flush()

    try:
        from vllm import LLM, SamplingParams

        llm = LLM(model=args.model, dtype="float32", enforce_eager=True, max_model_len=args.max_model_len,
                  kv_cache_memory_bytes=args.kv_bytes, max_num_seqs=args.max_num_seqs, seed=0, max_logprobs=-1,
                  logprobs_mode="processed_logprobs")
    except Exception as exc:
        reply({"error": f"{type(exc).__name__}: {exc}"})
        raise
    reply({"ready": True})
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            sp = SamplingParams(max_tokens=cmd["max_tokens"], temperature=cmd.get("temperature", 1.0),
                                ignore_eos=cmd.get("ignore_eos", True), logprobs=cmd.get("logprobs"))
            if "conversations" in cmd:  # rendered as the servers render chat: template text → ids
                tok = llm.get_tokenizer()
                prompts = [{"prompt_token_ids": chat_prompt_ids(tok, c)} for c in cmd["conversations"]]
            else:
                prompts = [{"prompt_token_ids": p} if isinstance(p, list) else p for p in cmd["prompts"]]
            start = time.perf_counter()
            outputs = llm.generate(prompts, sp, use_tqdm=False)
            seconds = time.perf_counter() - start
            reply({"seconds": seconds, "prompt_tokens": sum(len(o.prompt_token_ids) for o in outputs),
                   "completion_tokens": sum(len(c.token_ids) for o in outputs for c in o.outputs)})
        except Exception as exc:
            reply({"error": f"{type(exc).__name__}: {exc}"})


if __name__ == "__main__":
    main()
