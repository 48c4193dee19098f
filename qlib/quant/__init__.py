"""Quantizers, one file each: ptq (torch.ao INT8), and more to come (uniform, nf4, bitnet, qat)."""
