"""How long one summary call takes on this machine's CPU: a random-init model of the built-in
text model's shape (Qwen2.5-0.5B-Instruct: 24 layers, width 896, 151,936 tokens), reading
`--tokens` prompt tokens per window and writing `--new` tokens, one window to a call and four
(the summariser puts up to four windows in one call). Random weights: the speed is a real
checkpoint's, the text is not. Tells whether a text model's `timeout_s` (600 s) holds a call.

    .venv/bin/python -m tests.text_speed [--tokens 3800] [--new 256]

Prints one markdown table (docs/http.md quotes a run).
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=3800, help="prompt tokens per window")
    parser.add_argument("--new", type=int, default=256, help="tokens written per window")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4], help="windows per call")
    args = parser.parse_args()

    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32_768,
                         tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config).eval()
    print("| windows per call | prompt tokens each | new tokens each | prefill s | call s | threads |")
    print("| --- | --- | --- | --- | --- | --- |")
    for batch in args.batches:
        ids = torch.randint(100, 150_000, (batch, args.tokens))
        with torch.inference_mode():
            started = time.perf_counter()
            model(input_ids=ids)  # the prompt alone: how much of the call reading it takes
            prefill = time.perf_counter() - started
            started = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new,
                           min_new_tokens=args.new, do_sample=False, eos_token_id=None, pad_token_id=0)
            call = time.perf_counter() - started
        print(f"| {batch} | {args.tokens} | {args.new} | {prefill:.0f} | {call:.0f} | {torch.get_num_threads()} |",
              flush=True)


if __name__ == "__main__":
    main()
