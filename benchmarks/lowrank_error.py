"""How much of TEAL's error the low-rank correction of ``lowrank`` (R-Sparse) takes back, per
factorisation: on SmolLM2-135M's up and down projections of five blocks, the inputs' entries
below the threshold of a target sparsity are dropped, and the output error of the dropped part
with the rank-r correction is divided by the error without it (1: no help; factors fitted on
half the BBC News tokens, measured on the other half).

    python benchmarks/lowrank_error.py
"""

from __future__ import annotations

import torch

from moefy.data.text import load_text
from moefy.models.load import load_model
from moefy.sparsify.lowrank import SecondMoment, dense_weight, low_rank_factors

LAYERS = (1, 8, 15, 22, 29)
ROLES = ("up_proj", "down_proj")
SINKS = 4  # leading positions left out (attention sinks)
# factorisation -> (share of each token's entries the reference keeps, full second moment)
MOMENTS = {"rms": (1.0, False), "dropped": (0.5, False), "whitened": (0.5, True)}


def layer_inputs(model, blocks) -> dict[tuple[int, str], torch.Tensor]:
    """(N, I) float64 inputs of each (layer, role), sinks left out."""
    caught: dict[tuple[int, str], list[torch.Tensor]] = {}
    hooks = []
    for i in LAYERS:
        for role in ROLES:
            module = getattr(model.model.layers[i].mlp, role)
            caught[(i, role)] = []

            def grab(_m, args, key=(i, role)):
                x = args[0].detach()[:, SINKS:]
                caught[key].append(x.reshape(-1, x.shape[-1]))

            hooks.append(module.register_forward_pre_hook(grab))
    with torch.no_grad():
        for input_ids in blocks.batches(4):
            model(input_ids=input_ids, use_cache=False)
    for hook in hooks:
        hook.remove()
    return {key: torch.cat(xs).double() for key, xs in caught.items()}


def main() -> None:
    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2-135m")
    blocks = load_text("bbc-news").blocks(tokenizer, "calibration", block_len=256, n_tokens=4096)
    results: dict[tuple[float, int, str], list[float]] = {}
    for (i, role), x in layer_inputs(model, blocks).items():
        fit, held = x[: x.shape[0] // 2], x[x.shape[0] // 2 :]
        weight = dense_weight(getattr(model.model.layers[i].mlp, role))
        moments: dict[str, torch.Tensor | None] = {"svd": None}
        for name, (share, full) in MOMENTS.items():
            moment = SecondMoment(weight.shape[1], full=full, reference_share=share)
            moment.add(fit)
            moments[name] = moment.total / moment.count
        for sparsity in (0.5, 0.65):
            threshold = torch.quantile(held.abs().flatten()[:2_000_000].float(), sparsity)
            dropped = held.masked_fill(held.abs() > threshold.double(), 0.0)
            base = ((dropped @ weight.t()) ** 2).sum()
            for rank in (8, 16, 32):
                for name, moment in moments.items():
                    u, v = low_rank_factors(weight, rank, moment)
                    left = ((dropped @ (weight - u @ v).t()) ** 2).sum() / base
                    results.setdefault((sparsity, rank, name), []).append(float(left))
    print("sparsity rank factorisation: share of TEAL's error left (mean over layers)")
    for (sparsity, rank, name), errors in sorted(results.items()):
        print(f"{sparsity} {rank} {name}: {sum(errors) / len(errors):.3f}")


if __name__ == "__main__":
    main()
