"""The training loss against the mixers' soft targets."""
import torch


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits`` against ``(B, K)`` target distributions.

    With mixed targets ``lam * y_t + (1 - lam) * y_s`` this equals the paper's
    ``lam * CE(out, y_t) + (1 - lam) * CE(out, y_s)``.
    """
    return torch.sum(-targets * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean()
