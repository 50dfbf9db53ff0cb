"""Write a small random Qwen2-MoE checkpoint, to check the engines before a real export exists.

Runs in moefy's ``.venv``::

    .venv/bin/python serving/tiny_qwen2moe.py --tokenizer ~/.cache/moefy/models/smollm2-135m \
        --out runs/serving/tiny-qwen2moe

The model has SmolLM2's vocabulary (its tokenizer files are copied), shared and routed experts
and a linear router: the same layout ``moefy export --format hf`` writes. Its weights are drawn
with a larger spread than transformers' default so that greedy choices have clear margins.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
INIT_STD = 0.1
SEED = 0


def build(
    tokenizer_folder: Path,
    out: Path,
    *,
    expert_size: int = 64,
    experts: int = 8,
    top_k: int = 2,
    norm_topk_prob: bool = False,
) -> None:
    """Save a random ``Qwen2MoeForCausalLM`` (float32) with the tokenizer of ``tokenizer_folder``.

    Args:
        tokenizer_folder: a folder whose ``tokenizer.json`` (49,152 tokens, SmolLM2's) is copied.
        out: the folder to create; it must not exist.
        expert_size: ``moe_intermediate_size`` (moefy's carved experts are 8 neurons wide).
        experts: routed experts per layer (``num_experts``).
        top_k: experts per token (``num_experts_per_tok``).
        norm_topk_prob: renormalise the chosen experts' probabilities.
    """
    import torch
    from transformers import AutoTokenizer, Qwen2MoeConfig, Qwen2MoeForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    config = Qwen2MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        moe_intermediate_size=expert_size,
        shared_expert_intermediate_size=128,
        num_experts=experts,
        num_experts_per_tok=top_k,
        norm_topk_prob=norm_topk_prob,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=INIT_STD,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(SEED)
    model = Qwen2MoeForCausalLM(config).eval()
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    for name in TOKENIZER_FILES:
        if (tokenizer_folder / name).exists():
            shutil.copy(tokenizer_folder / name, partial / name)
    partial.rename(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", type=Path, required=True, help="folder with tokenizer.json")
    parser.add_argument("--out", type=Path, required=True, help="folder to create")
    parser.add_argument("--expert-size", type=int, default=64, help="moe_intermediate_size")
    parser.add_argument("--experts", type=int, default=8, help="routed experts per layer")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token")
    parser.add_argument("--norm-topk-prob", action="store_true", help="renormalise top-k")
    args = parser.parse_args(argv)
    if args.out.exists():
        print(f"error: {args.out} exists: remove it or pick another --out", file=sys.stderr)
        return 2
    build(
        args.tokenizer,
        args.out,
        expert_size=args.expert_size,
        experts=args.experts,
        top_k=args.top_k,
        norm_topk_prob=args.norm_topk_prob,
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
