"""The runtimes qlib writes artifacts for and measures them in, one file each: onnx (ONNX Runtime: FP32 and INT8
encoders), gguf (llama.cpp: convert, quantize, read back, run), bnb (bitsandbytes: what its 4-/8-bit layers store)."""
