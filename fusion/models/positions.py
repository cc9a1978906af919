"""A learned 2-D position embedding for the cells of an image grid (both families).

Factorised as row(i) + column(j), ViT's "2-D" variant (Dosovitskiy et al. 2021, appendix D.4).
The backbone's RoPE positions are 1-D over the whole sequence, so on their own they say how far
back a token is, not which cell of which row it fills; this table says the latter. Transfusion's
linear patchifier adds it to every patch (Transfusion sec. 3.2); Chameleon can add it to the
embedding of every image code (``ChameleonConfig.image_pos_embed``).

Shape legend: h/w = grid rows/columns, N = h·w cells (row-major), D = d_model, ... = any
leading shape.
"""

from __future__ import annotations

import torch
from torch import nn


class GridPositionEmbedding(nn.Module):
    """``table() -> (N, D)``; ``forward(cell (...) int64) -> (..., D)``, zero where cell < 0."""

    def __init__(self, grid: tuple[int, int], d_model: int, init_std: float = 0.02):
        super().__init__()
        gh, gw = grid
        if gh <= 0 or gw <= 0:
            raise ValueError(f"grid must be positive, got {grid}")
        self.grid = (gh, gw)
        self.row = nn.Parameter(torch.randn(gh, d_model) * init_std)
        self.col = nn.Parameter(torch.randn(gw, d_model) * init_std)

    @property
    def cells(self) -> int:
        return self.grid[0] * self.grid[1]

    def table(self) -> torch.Tensor:
        """(N, D), row-major: cell k is row k // w, column k % w."""
        return (self.row[:, None, :] + self.col[None, :, :]).flatten(0, 1)

    def forward(self, cell: torch.Tensor) -> torch.Tensor:
        """cell (...) in [-1, N) -> (..., D); -1 (not an image cell) gives zeros."""
        if cell.numel() and int(cell.max()) >= self.cells:
            raise ValueError(f"grid cell {int(cell.max())} is outside the {self.grid[0]}x"
                             f"{self.grid[1]} grid")
        table = torch.cat([self.table(), self.row.new_zeros(1, self.row.shape[1])])
        return table[torch.where(cell < 0, self.cells, cell)]
