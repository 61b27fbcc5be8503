"""Answer scoring requests with vLLM: runs *inside the vLLM environment*, so it imports nothing
from gamma (and nothing but the standard library and vLLM).

    python vllm_worker.py --model CHECKPOINT --requests in.json --out out.json [--device cuda]

``in.json`` holds ``{"requests": [[token_ids, n_scored], ...]}``; ``out.json`` receives
``{"scores": [[sum_logprob, all_greedy], ...], "engine": {...}}``: for each request the summed
prompt log-probability of its last ``n_scored`` tokens and whether each was the top-ranked token.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--requests", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    args = p.parse_args(argv)

    import vllm
    from vllm import LLM, SamplingParams

    requests = json.load(open(args.requests))["requests"]
    t0 = time.perf_counter()
    # on vLLM's CPU build the "gpu" memory utilization is the fraction of RAM it reserves
    engine = {"model": args.model, "max_model_len": args.max_model_len, "enforce_eager": True,
              "gpu_memory_utilization": args.gpu_memory_utilization}
    llm = LLM(**engine)
    load_seconds = time.perf_counter() - t0
    prompts = [{"prompt_token_ids": ids} for ids, _ in requests]
    params = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0)
    outputs = llm.generate(prompts, params)
    scores = []
    for (ids, n_scored), out in zip(requests, outputs):
        total, greedy = 0.0, True
        for pos in range(len(ids) - n_scored, len(ids)):
            entry = out.prompt_logprobs[pos][ids[pos]]
            total += entry.logprob
            greedy = greedy and entry.rank == 1
        scores.append([total, greedy])
    result = {"scores": scores, "engine": {"vllm": vllm.__version__, "device": args.device,
                                           "load_seconds": load_seconds,
                                           "score_seconds": time.perf_counter() - t0 - load_seconds}}
    json.dump(result, open(args.out, "w"))
    print(f"scored {len(scores)} requests in {result['engine']['score_seconds']:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
