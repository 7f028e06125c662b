import torch

# The toys are tiny: one thread is fastest, and CI machines are small.
torch.set_num_threads(1)
