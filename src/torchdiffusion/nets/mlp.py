"""A residual MLP for low-dimensional data (2-D toy sets, tabular arrays)."""

from __future__ import annotations

from torch import Tensor, nn

from .embeddings import SinusoidalEmbedding, check_embedding


class _Block(nn.Module):
    """h <- h + W2 SiLU(W1 LN(h) + emb): a pre-norm residual block conditioned on the time."""

    def __init__(self, width: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.emb = nn.Linear(emb_dim, width)
        self.fc2 = nn.Linear(width, width)
        self.drop = nn.Dropout(dropout)
        self.act = nn.SiLU()

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        z = self.act(self.fc1(self.norm(h)) + self.emb(emb))
        return h + self.fc2(self.drop(z))


class MLP(nn.Module):
    """Time-conditioned residual MLP: (x (B, D), c_noise (B,), [class_labels (B,)]) -> (B, D).

    Args:
        dim: data dimension D.
        width: hidden width.                     depth: number of residual blocks.
        time_embedding: "sinusoidal" or "fourier".  emb_dim: its size.
        num_classes: enables a class embedding (label ``num_classes`` is "unconditional").
        dropout: inside each block.
        out_dim: the output size (default D); e.g. K logits for a noise-conditional classifier.
    The last layer starts at zero, so an untrained eps-network predicts 0 (the prior mean).
    """

    def __init__(
        self,
        dim: int = 2,
        width: int = 256,
        depth: int = 4,
        time_embedding: type[nn.Module] = SinusoidalEmbedding,
        emb_dim: int = 64,
        num_classes: int | None = None,
        dropout: float = 0.0,
        out_dim: int | None = None,
    ):
        super().__init__()
        check_embedding(time_embedding)
        self.config = dict(
            dim=dim,
            width=width,
            depth=depth,
            time_embedding=getattr(time_embedding, "name", time_embedding.__name__),  # JSON: the name
            emb_dim=emb_dim,
            num_classes=num_classes,
            dropout=dropout,
            out_dim=out_dim,
        )
        self.time = nn.Sequential(time_embedding(emb_dim), nn.Linear(emb_dim, emb_dim), nn.SiLU())
        self.label = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        self.inp = nn.Linear(dim, width)
        self.blocks = nn.ModuleList(_Block(width, emb_dim, dropout) for _ in range(depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.SiLU(), nn.Linear(width, out_dim or dim))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def forward(self, x: Tensor, c_noise: Tensor, class_labels: Tensor | None = None) -> Tensor:
        emb = self.time(c_noise)
        if self.label is not None:
            labels = (
                class_labels
                if class_labels is not None
                else x.new_full((x.shape[0],), self.label.num_embeddings - 1, dtype=int)
            )
            emb = emb + self.label(labels)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h)
