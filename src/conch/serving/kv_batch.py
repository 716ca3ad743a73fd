"""The running batch's model state for `conch.serving.engine.Engine`: the KV cache and what goes with it.

Every running request is one row of a left-padded batch: its row of transformers' KV cache, of the
attention mask (0 on the padding), its length (the next position) and the logits for its next token.

- `KVBatch.prefill`: new prompts, left-padded, through the model: a batch of their own;
- `join`: stack a prefilled batch under the running one (the narrower one padded on the left);
- `keep`: only these rows stay (finished requests leave), then the columns that are padding for
  every remaining row go too;
- `decode`: one token for every row through the model.

The engine owns the requests, the order of the rows is theirs; this class only knows tensors.
"""

from __future__ import annotations

import torch


class KVBatch:
    def __init__(self, cache, mask: torch.Tensor, lengths: torch.Tensor, next_logits: torch.Tensor):
        self.cache, self.mask, self.lengths, self.next_logits = cache, mask, lengths, next_logits

    @property
    def width(self) -> int:
        """Columns of the cache (the longest row, with its padding)."""
        return self.mask.shape[1]

    @classmethod
    def prefill(cls, model, prompts: list[list[int]], pad_id: int) -> KVBatch:
        """Run the prompts (left-padded to the longest) through the model: their cache and next logits."""
        from transformers import DynamicCache

        device = model.device
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                    use_cache=True)
        return cls(cache, mask, mask.sum(-1), out.logits[:, -1, :].float())

    def join(self, other: KVBatch) -> None:
        """Append the rows of `other` (a prefilled batch) below these; the narrower side is padded on the left."""
        width = max(self.width, other.width)
        pa, pb = width - self.width, width - other.width
        for la, lb in zip(self.cache.layers, other.cache.layers):
            la.keys = torch.cat([pad_left(la.keys, pa, 2), pad_left(lb.keys, pb, 2)])
            la.values = torch.cat([pad_left(la.values, pa, 2), pad_left(lb.values, pb, 2)])
        self.mask = torch.cat([pad_left(self.mask, pa, 1), pad_left(other.mask, pb, 1)])
        self.lengths = torch.cat([self.lengths, other.lengths])
        self.next_logits = torch.cat([self.next_logits, other.next_logits])

    def keep(self, rows: torch.Tensor) -> None:
        """Only these rows stay (``next_logits`` is left as it is: `decode` replaces it)."""
        self.cache.batch_select_indices(rows)
        self.mask, self.lengths = self.mask[rows], self.lengths[rows]
        self.trim()

    def trim(self) -> None:
        """Drop cache columns that are padding for every remaining row."""
        real = self.mask.any(0).nonzero()
        start = int(real[0]) if len(real) else 0
        if start > 0:
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]

    def decode(self, model, tokens: torch.Tensor) -> None:
        """One token per row (``tokens``, in row order) through the model; the next logits are ready after."""
        ones = torch.ones((len(tokens), 1), dtype=self.mask.dtype, device=model.device)
        self.mask = torch.cat([self.mask, ones], -1)
        out = model(input_ids=tokens[:, None], attention_mask=self.mask, position_ids=self.lengths[:, None],
                    past_key_values=self.cache, use_cache=True)
        self.lengths = self.lengths + 1
        self.next_logits = out.logits[:, -1, :].float()


def pad_left(t: torch.Tensor, n: int, dim: int) -> torch.Tensor:
    """``t`` with ``n`` zeros before it along ``dim``."""
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([torch.zeros(shape, dtype=t.dtype, device=t.device), t], dim)
