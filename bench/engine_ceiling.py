"""The engine's own ceiling for a shape: vLLM's offline `LLM.generate` with every prompt at once, no server,
no HTTP, no streaming: the most output tokens a second this engine makes on this GPU for these prompts.

A server in front of the same engine (`vllm serve`, the fleet) can approach it, not pass it (unless it
schedules better than vLLM's own scheduler, e.g. by never letting it preempt). So a fleet/`vllm serve` ratio
is bounded by ceiling/`vllm serve`: this says how much room a shape leaves (issue #12's c=1000 targets).

Run on the GPU machine (bench/gpu_setup.sh), same engine options as bench/vllm_vs_fleet.py:
  python bench/engine_ceiling.py --model smollm2-135m --shape 256/256 --shape 1024/128 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="smollm2-135m or llama-8b-shape (in /tmp/models)")
    parser.add_argument("--shape", action="append", required=True, help="IN/OUT, e.g. 256/256")
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from vllm import LLM, SamplingParams  # on the GPU machine only

    model_dir = Path("/tmp/models") / args.model
    tokenizer = model_dir if (model_dir / "tokenizer.json").exists() else Path("/tmp/models/smollm2-135m")
    # The scheduler limits `vllm serve` (and so the fleet) gets on an H200 (its log), not the offline defaults.
    llm = LLM(model=str(model_dir), tokenizer=str(tokenizer), load_format="dummy", seed=0, max_num_seqs=1024,
              max_num_batched_tokens=8192)
    vocab = llm.get_tokenizer().vocab_size
    rows = []
    for shape in args.shape:
        input_len, output_len = (int(part) for part in shape.split("/"))
        rng = random.Random(0)
        prompts = [{"prompt_token_ids": [rng.randrange(1000, vocab - 1) for _ in range(input_len)]}
                   for _ in range(args.num_prompts)]
        params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.0)
        llm.generate(prompts[:64], params, use_tqdm=False)  # warm up: compiled graphs, allocator
        started = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - started
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        rows.append({"model": args.model, "shape": shape, "prompts": args.num_prompts, "output_tokens": tokens,
                     "seconds": round(elapsed, 2), "output_tokens_per_s": round(tokens / elapsed)})
        print(f"[ceiling] {args.model} {shape}: {tokens / elapsed:,.0f} output tok/s ({elapsed:.1f} s)", flush=True)
    table = ["| model | shape | prompts at once | output tok/s |", "|---|---|---|---|"]
    table += [f"| {r['model']} | {r['shape']} | {r['prompts']} | {r['output_tokens_per_s']:,} |" for r in rows]
    print("\n".join(table))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / f"ceiling-{args.model}.json").write_text(json.dumps({"rows": rows, "table": table}, indent=1))


if __name__ == "__main__":
    main()
