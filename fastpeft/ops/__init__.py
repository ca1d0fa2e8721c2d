"""Custom ops (torch.library) with autograd; each picks the Triton launcher or the reference."""
