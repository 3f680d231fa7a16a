"""The model the script trains (imported from beside it, as tutorials do)."""

from torch import nn

HIDDEN = 10


class ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.net1 = nn.Linear(10, HIDDEN)
        self.relu = nn.ReLU()
        self.net2 = nn.Linear(HIDDEN, 5)

    def forward(self, x):
        return self.net2(self.relu(self.net1(x)))
