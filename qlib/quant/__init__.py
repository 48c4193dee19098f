"""Quantizers, one file each: ptq (torch.ao INT8 dynamic/static), qat (torch.ao QAT INT8, fake-quant weights at low
bits), uniform (symmetric absmax grids), nf4 (the NF4 codebook, for the ladder), bitnet (b1.58 BitLinear, packed
ternary), ladder (the post-training rungs of study 05)."""
