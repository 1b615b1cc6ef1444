"""Token sequences of a frozen tokenizer: what stages B and D train their priors on."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset
from tqdm.auto import tqdm

from wartok.runtime import autocast, ignore_stop_signals
from wartok.stream import EpochSampler


@torch.no_grad()
def extract_tokens(tokenizer: torch.nn.Module, dataset: Dataset, batch_size: int, device: torch.device,
                   precision: str, desc: str = "tokens", num_workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode every image once, in order: returns tokens (N, T) long and labels (N,) long, on the CPU.

    num_workers > 0 decodes images in worker processes (data.num_workers): an ImageNet split is
    1.28M JPEGs, hours for the main process alone."""
    was_training = tokenizer.training
    tokenizer.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers,
                        worker_init_fn=ignore_stop_signals)
    tokens, labels = [], []
    for images, targets in tqdm(loader, desc=desc, disable=None, leave=False):
        with autocast(device, precision):
            quant = tokenizer.quantize(tokenizer.encode(images.to(device)))
        tokens.append(quant.indices.cpu())  # (B, T)
        labels.append(torch.as_tensor(targets))
    tokenizer.train(was_training)
    return torch.cat(tokens), torch.cat(labels).long()


def token_loader(tokens: torch.Tensor, labels: torch.Tensor, batch_size: int, seed: int) -> DataLoader:
    """Shuffled, seeded batches of (tokens, labels) for prior training (iterate with a BatchStream)."""
    dataset = TensorDataset(tokens, labels)
    return DataLoader(dataset, batch_size=min(batch_size, len(dataset)), sampler=EpochSampler(len(dataset), seed),
                      drop_last=True)
