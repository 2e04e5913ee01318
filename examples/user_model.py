"""A user-defined model for shardrun: a byte-level LSTM language model.

shardrun calls `build(**model.args)` and trains what it returns. The one contract:
`forward(inputs, targets)` returns the scalar loss. See examples/user-model.yaml.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


class ByteLSTM(nn.Module):
    def __init__(self, hidden: int, layers: int, vocab_size: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden)
        self.lstm = nn.LSTM(hidden, hidden, num_layers=layers, batch_first=True)
        self.head = nn.Linear(hidden, vocab_size)

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(self.embed(inputs))
        logits = self.head(out)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1))


def build(hidden: int = 128, layers: int = 1, vocab_size: int = 256) -> nn.Module:
    return ByteLSTM(hidden, layers, vocab_size)
