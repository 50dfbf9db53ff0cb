"""write_plots: readable PNG files, written atomically."""

from __future__ import annotations

import torch

from moefy.data.blocks import TokenBlocks
from moefy.profiling import ProfileConfig, profile, write_plots
from tiny_models import VOCAB, tiny_model

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_write_plots(tmp_path) -> None:
    gen = torch.Generator().manual_seed(0)
    blocks = TokenBlocks(torch.randint(3, VOCAB, (4, 16), generator=gen))
    result = profile(tiny_model("t5"), blocks, ProfileConfig(batch_size=4))
    paths = write_plots(result, tmp_path / "plots")
    assert [p.name for p in paths] == [
        "sparsity_by_layer.png",
        "contribution_curves.png",
        "active_count_histograms.png",
        "neuron_frequency.png",
    ]
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == sorted(p.name for p in paths)
