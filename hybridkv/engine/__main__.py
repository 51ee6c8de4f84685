"""``python -m hybridkv.engine --demo``: a tiny random model through the engine.

Runs chat-like requests sharing a system prompt (two rounds, so the second hits the
cache), then prints tokens/s, the prefix hit rate and the largest logit difference from
transformers' own no-cache forward over the same sequences.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(prog="python -m hybridkv.engine", description=__doc__)
    p.add_argument("--demo", action="store_true", help="run the tiny random-model demo")
    p.add_argument(
        "--family", default="gemma3_text", help="tiny model family (default %(default)s)"
    )
    p.add_argument("--window", type=int, default=8, help="sliding window, tokens (default 8)")
    p.add_argument("--requests", type=int, default=16, help="requests per round (default 16)")
    p.add_argument("--new-tokens", type=int, default=16, help="tokens per request (default 16)")
    p.add_argument("--page-size", type=int, default=4, help="tokens per page (default 4)")
    p.add_argument("--full-tokens", type=int, default=2048, help="full pool, tokens (default 2048)")
    p.add_argument("--swa-tokens", type=int, default=512, help="SWA pool, tokens (default 512)")
    p.add_argument(
        "--backend",
        choices=["triton", "torch"],
        default=None,
        help="manager kernels (default: Triton on CUDA, the torch references on CPU; "
        "triton on CPU runs the interpreter)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not args.demo:
        p.print_help()
        return {}
    import torch

    if not torch.cuda.is_available():
        if args.backend == "triton":
            # NOTE: before any kernel module is imported: @triton.jit reads it then.
            os.environ.setdefault("TRITON_INTERPRET", "1")
        else:
            args.backend = "torch"
        torch.set_num_threads(args.threads)

    from hybridkv.engine import Engine
    from hybridkv.engine.tiny import compare_with_transformers, tiny_model

    model = tiny_model(args.family, seed=args.seed, window=args.window)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    eng = Engine(
        model, record_logits=True, page_size=args.page_size, full_tokens=args.full_tokens,
        swa_tokens=args.swa_tokens, dtype=torch.float32, device=device, backend=args.backend,
        chunked_prefill_size=max(8, args.page_size), max_context_len=1024,
    )  # fmt: skip
    rng = random.Random(args.seed)
    vocab = model.config.vocab_size
    system = [rng.randrange(vocab) for _ in range(4 * args.window)]
    users = [
        [rng.randrange(vocab) for _ in range(rng.randint(1, 24))] for _ in range(args.requests)
    ]
    start = time.perf_counter()
    first = eng.generate([system + u for u in users], args.new_tokens)
    # Round two: each conversation's next turn extends its first turn and its answer.
    eng.generate([system + u + o + [1] for u, o in zip(users, first, strict=True)], args.new_tokens)
    elapsed = time.perf_counter() - start
    st = eng.stats()
    cmp = compare_with_transformers(eng, model)
    result = {
        "tokens_per_s": st["generated_tokens"] / elapsed,
        "hit_rate": st["hit_rate"],
        "max_diff": cmp.max_diff,
        "token_mismatches": len(cmp.token_mismatches),
    }
    print(f"model: tiny random {args.family}, window {args.window}, on {device}")
    print(f"requests: {2 * args.requests} in two rounds, {st['generated_tokens']} tokens generated")
    print(f"tokens/s: {result['tokens_per_s']:.1f}  (prefill + decode, {elapsed:.2f} s)")
    print(f"hit rate: {st['hit_rate']:.1%} of prompt tokens from the cache")
    print(f"max |diff| from transformers: {cmp.max_diff:.2e} over {cmp.positions} positions, "
          f"{len(cmp.token_mismatches)} greedy tokens differ")  # fmt: skip
    eng.close()
    return result


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
